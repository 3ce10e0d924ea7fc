"""Every message of the protocol against the real server, with field-level assertions."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from local_ai_server.audio import is_silent, mulaw_decode, pcm16_to_float32
from local_ai_server.config import DEFAULT_SYSTEM_PROMPT

from .conftest import ServerProc, connect


async def test_set_mode_echoes_effective_values(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    ready = await c.request({"type": "set_mode", "mode": "llm", "call_id": "c1", "segment_energy_threshold": 900,
                             "segment_silence_ms": 400, "output_encoding": "linear16",
                             "output_sample_rate_hz": 24000}, "mode_ready")
    # The turn detection fields (ext) echo the server's defaults: plain VAD endpointing unless asked.
    assert ready == {"type": "mode_ready", "mode": "llm", "call_id": "c1", "segment_energy_threshold": 900,
                     "segment_silence_ms": 400, "output_encoding": "linear16", "output_sample_rate_hz": 24000,
                     "turn_detection": "vad", "turn_threshold": 0.5, "turn_short_ms": 200, "turn_long_ms": 1000}
    # Defaults are null; an unsupported output format falls back to mulaw/8000.
    ready = await c.request({"type": "SET-MODE ", "mode": "tts", "output_encoding": "opus",
                             "output_sample_rate_hz": 12345}, "mode_ready")
    assert ready["mode"] == "tts" and ready["call_id"] == "c1"
    assert ready["output_encoding"] == "mulaw" and ready["output_sample_rate_hz"] == 8000
    assert ready["segment_energy_threshold"] == 900
    # Without `mode` the mode stays; a rate alone (not 8000) means linear16.
    ready = await c.request({"type": "set_mode", "output_sample_rate_hz": 16000}, "mode_ready")
    assert ready["mode"] == "tts" and ready["output_encoding"] == "linear16"
    assert ready["output_sample_rate_hz"] == 16000


async def test_llm_request_plain_and_streamed(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    reply = await c.request({"type": "llm_request", "text": "What is the capital of France?", "call_id": "l1",
                             "request_id": "r1"}, "llm_response")
    assert reply["type"] == "llm_response" and reply["call_id"] == "l1" and reply["request_id"] == "r1"
    assert reply["mode"] == "llm" and "paris" in reply["text"].lower()
    assert not c.got.json("llm_token"), "tokens streamed without stream: true"

    reply = await c.request({"type": "llm_request", "text": "Name three colors.", "call_id": "l1",
                             "request_id": "r2", "stream": True}, "llm_response")
    tokens = [m for m in c.got.json("llm_token") if m["request_id"] == "r2"]
    assert len(tokens) >= 2
    assert all(t["call_id"] == "l1" and isinstance(t["delta"], str) and t["tokens"] >= 1 for t in tokens)
    assert "".join(t["delta"] for t in tokens).strip() == reply["text"]
    # Tokens come before the response.
    idx = [i for i, (k, v) in enumerate(c.got.items) if k == "json" and v.get("request_id") == "r2"]
    assert c.got.items[idx[-1]][1]["type"] == "llm_response"


async def test_llm_history_and_context(client_factory: Callable[..., Any], server: ServerProc) -> None:
    """History grows per call, resets on a new call_id, and `context` replaces it (seen in the server's log)."""
    c = await client_factory()

    def sent_messages(call_id: str) -> list[int]:
        return [e["messages"] for e in server.log_events() if e.get("event") == "llm.request"
                and e.get("call_id") == call_id]

    await c.request({"type": "llm_request", "text": "My name is Zorblax. Just say OK.", "call_id": "h1"},
                    "llm_response")
    await c.request({"type": "llm_request", "text": "What is my name?", "call_id": "h1"}, "llm_response")
    # system + user, then system + user + assistant + user
    assert sent_messages("h1") == [2, 4]
    await c.request({"type": "llm_request", "text": "What is my name?", "call_id": "h2"}, "llm_response")
    assert sent_messages("h2") == [2]
    await c.request({"type": "llm_request", "text": "What is my name?", "call_id": "h2", "context": [
        {"role": "user", "content": "My name is Quintessa."}, {"role": "assistant", "content": "Hello Quintessa."}]},
        "llm_response")
    assert sent_messages("h2") == [2, 4]
    # A session system prompt applies to the next request of that call.
    await c.request({"type": "switch_model", "scope": "session", "call_id": "h2", "request_id": "p",
                     "llm_config": {"system_prompt": "Answer only with the word banana."}}, "switch_response")
    await c.request({"type": "llm_request", "text": "Hi", "call_id": "h2"}, "llm_response")
    # the context request did not enter the history: system + (user, assistant) + user
    assert sent_messages("h2") == [2, 4, 4]


async def test_tts_request(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    text = "Hello there, how can I help you today?"
    reply = await c.request({"type": "tts_request", "text": text, "call_id": "t1", "request_id": 7},
                            "tts_response")
    assert reply["text"] == text and reply["call_id"] == "t1" and reply["request_id"] == 7
    assert reply["encoding"] == "mulaw" and reply["sample_rate_hz"] == 8000
    audio = base64.b64decode(reply["audio_data"])
    assert reply["byte_length"] == len(audio) > 8000  # over one second at 8 kHz mu-law
    assert not is_silent(pcm16_to_float32(mulaw_decode(audio)))

    reply = await c.request({"type": "tts_request", "text": text, "encoding": "linear16", "sample_rate_hz": 22050},
                            "tts_response")
    assert reply["encoding"] == "linear16" and reply["sample_rate_hz"] == 22050
    audio = base64.b64decode(reply["audio_data"])
    assert len(audio) % 2 == 0 and len(audio) / 2 / 22050 > 1.0
    assert not c.got.binaries(), "tts_request must not also send binary audio"


async def test_switch_model_session_scope(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    reply = await c.request({"type": "switch_model", "scope": "session", "call_id": "s1", "request_id": "sw1",
                             "llm_config": {"system_prompt": "You are a pirate. Always say Arr."}},
                            "switch_response")
    assert reply == {"type": "switch_response", "status": "success", "message": reply["message"],
                     "scope": "session", "call_id": "s1", "request_id": "sw1", "changed": ["system_prompt"]}


async def test_switch_model_global_and_reload(client_factory: Callable[..., Any], server: ServerProc,
                                              models_dir: Path) -> None:
    c = await client_factory()
    status = await c.request({"type": "status"}, "status_response")
    llm_path = status["models"]["llm"]["path"]
    # Same path: no_change.
    reply = await c.request({"type": "switch_model", "llm_model_path": llm_path, "request_id": "g1"},
                            "switch_response")
    assert reply["status"] == "no_change" and reply["changed"] == [] and reply["request_id"] == "g1"
    # A path that does not exist: error, old model keeps serving.
    reply = await c.request({"type": "switch_model", "llm_config": {"model_path": "llm/nope.gguf"},
                             "request_id": "g2"}, "switch_response")
    assert reply["status"] == "error" and "/" not in reply["message"]
    # Outside the models directory: refused.
    reply = await c.request({"type": "switch_model", "llm_model_path": "/etc/passwd", "request_id": "g3"},
                            "switch_response")
    assert reply["status"] == "error"
    # A corrupt model file inside the models dir: error, and the old model still answers.
    bad = models_dir / "llm" / "corrupt-test.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 4096)
    try:
        reply = await c.request({"type": "switch_model", "llm_model_path": str(bad), "request_id": "g4"},
                                "switch_response", timeout=60)
        assert reply["status"] == "error", reply
        # reload_llm onto the same corrupt file: reload_response error, then the error envelope.
        reply = await c.request({"type": "reload_llm", "model_path": str(bad), "request_id": "rl0"},
                                "reload_response", timeout=60)
        assert reply["status"] == "error" and reply["request_id"] == "rl0", reply
        assert "/" not in reply["message"]
        err = await c.wait_type("error", request_id="rl0")
        assert err["code"] == "engine_error", err
    finally:
        bad.unlink()
    status = await c.request({"type": "status"}, "status_response")
    assert status["models"]["llm"]["path"] == llm_path and status["models"]["llm"]["loaded"] is True
    answer = await c.request({"type": "llm_request", "text": "Say hello."}, "llm_response")
    assert answer["text"]
    # A global system prompt applies to every session without its own, even with dry_run (AVA's engine
    # sends its prompt exactly so); dry_run only keeps model files from loading.
    reply = await c.request({"type": "switch_model", "dry_run": True, "request_id": "g5",
                             "llm_config": {"system_prompt": "Be terse."}}, "switch_response")
    assert reply["status"] == "success" and reply["changed"] == ["system_prompt"]
    other = await connect(server)
    await other.request({"type": "llm_request", "text": "Hi", "call_id": "g-prompt"}, "llm_response")
    sent = [e for e in server.log_events() if e.get("event") == "llm.request" and e.get("call_id") == "g-prompt"]
    assert sent[-1]["system_prompt_chars"] == len("Be terse.")
    await other.close()
    reply = await c.request({"type": "switch_model", "request_id": "g6",
                             "llm_config": {"system_prompt": DEFAULT_SYSTEM_PROMPT}}, "switch_response")
    assert reply["status"] == "success"
    # dry_run with a model path validates it but loads nothing.
    reply = await c.request({"type": "switch_model", "dry_run": True, "request_id": "g7",
                             "llm_config": {"model_path": "llm/nope.gguf"}}, "switch_response")
    assert reply["status"] == "error"
    # reload_llm reloads off the loop and answers reload_response.
    reply = await c.request({"type": "reload_llm", "request_id": "rl1"}, "reload_response", timeout=60)
    assert reply["status"] == "success" and reply["request_id"] == "rl1"
    answer = await c.request({"type": "llm_request", "text": "Say hello."}, "llm_response")
    assert answer["text"]


async def test_status_and_capabilities(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    s = await c.request({"type": "status", "request_id": "st"}, "status_response")
    assert s["status"] == "ok" and s["request_id"] == "st"
    assert s["stt_backend"] == "faster_whisper" and s["tts_backend"] == "piper"
    m = s["models"]
    assert m["stt"]["backend"] == "faster_whisper" and m["stt"]["loaded"] is True and m["stt"]["path"]
    assert m["tts"]["backend"] == "piper" and m["tts"]["loaded"] is True and m["tts"]["display"]
    assert m["llm"]["loaded"] is True and m["llm"]["path"].endswith(".gguf")
    assert set(m["llm"]["config"]) == {"context", "threads", "batch", "max_tokens", "temperature", "top_p",
                                       "repeat_penalty", "gpu_layers"}
    assert s["pool"]["workers"] >= 1 and s["pool"]["busy"] >= 0 and s["pool"]["queued"] == 0
    assert s["sessions"] >= 1 and s["uptime_s"] >= 0 and s["tier"] == "embedded"
    assert s["hardware"]["cpu_cores"] >= 1
    caps = await c.request({"type": "capabilities"}, "capabilities_response")
    cap = caps["capabilities"]
    assert cap["faster_whisper"] is True and cap["piper"] is True and cap["llama"] is True
    assert cap["vosk"] is False and all(isinstance(v, bool) for v in cap.values())


async def test_http_endpoints(server: ServerProc) -> None:
    status, body = await asyncio.to_thread(server.http, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = await asyncio.to_thread(server.http, "/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = await asyncio.to_thread(server.http, "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("las_sessions", "las_llm_pool_busy", "las_llm_pool_queued", "las_llm_pool_workers",
                 "las_errors_total", "las_turn_stage_seconds", "las_event_loop_lag_seconds_bucket",
                 'las_queue_wait_seconds_count{stage="stt"}', 'las_queue_wait_seconds_count{stage="llm"}',
                 'las_queue_wait_seconds_count{stage="tts"}'):
        assert name in text, name
    status, body = await asyncio.to_thread(server.http, "/nope")
    assert status == 404 and json.loads(body)["endpoints"][0] == "/"


async def test_get_root_is_the_browser_console_and_an_upgrade_is_still_ava(client_factory: Callable[..., Any],
                                                                             server: ServerProc) -> None:
    """`GET /` without `Upgrade: websocket` is the console page (and its assets); with it, AVA's protocol."""
    status, body = await asyncio.to_thread(server.http, "/")
    assert status == 200 and b'<script type="module" src="/console/console.js">' in body
    assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere
    for path, kind in (("/console/console.js", b"/v1/realtime"), ("/console/worklet.js", b"registerProcessor"),
                       ("/console/console.css", b"font")):
        status, body = await asyncio.to_thread(server.http, path)
        assert status == 200 and kind in body, path
    def headers() -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as resp:
            return resp.headers["Content-Type"], resp.headers["Content-Security-Policy"]

    content_type, csp = await asyncio.to_thread(headers)
    assert content_type == "text/html; charset=utf-8"
    assert "default-src 'none'" in csp and "script-src 'self';" in csp
    assert f"connect-src 'self' ws://127.0.0.1:{server.port} wss://127.0.0.1:{server.port};" in csp
    c = await client_factory()
    reply = await c.request({"type": "status"}, "status_response")
    assert reply["status"] == "ok"


async def test_tool_context_is_stored_without_reply(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    await c.send({"type": "tool_context", "call_id": "tc", "tools": ["transfer"]})
    reply = await c.request({"type": "status"}, "status_response")
    assert reply and [m["type"] for m in c.got.json()] == ["status_response"]


async def test_history_reset_is_not_undone_by_a_cancelled_answer(client_factory: Callable[..., Any],
                                                                  server: ServerProc) -> None:
    """A new call_id (or stop_session) while an answer streams: the cancelled answer stays out of the history."""
    c = await client_factory()

    def sent(call_id: str) -> list[int]:
        return [e["messages"] for e in server.log_events() if e.get("event") == "llm.request"
                and e.get("call_id") == call_id]

    await c.send({"type": "llm_request", "text": "Tell me a long story about a dragon.", "call_id": "old-call",
                  "request_id": "o1", "stream": True})
    await c.wait_type("llm_token", request_id="o1")
    await c.request({"type": "llm_request", "text": "Hello?", "call_id": "new-call", "request_id": "n1"},
                    "llm_response")
    assert not [m for m in c.got.json("llm_response") if m.get("request_id") == "o1"], "old answer not cancelled"
    err = await c.wait_for(lambda m: m.get("type") == "error" and m.get("request_id") == "o1")
    assert err["code"] == "cancelled"
    await c.request({"type": "llm_request", "text": "Again?", "call_id": "new-call", "request_id": "n2"},
                    "llm_response")
    assert sent("new-call") == [2, 4]

    await c.send({"type": "llm_request", "text": "Tell me a long story about a knight.", "call_id": "new-call",
                  "request_id": "n3", "stream": True})
    await c.wait_type("llm_token", request_id="n3")
    await c.request({"type": "barge_in", "call_id": "new-call", "reason": "stop_session", "request_id": "s"},
                    "barge_in_ack")
    await c.request({"type": "llm_request", "text": "Hi", "call_id": "new-call", "request_id": "n4"},
                    "llm_response")
    assert sent("new-call")[-1] == 2
