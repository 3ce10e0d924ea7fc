"""Bad input gets the prescribed answer, changes nothing, and never disturbs other sessions."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServerProc, connect, start_server

CASES: list[tuple[str, Any, str]] = [
    ("malformed json", "{not json", "invalid_json"),
    ("non-object json", "[1, 2, 3]", "invalid_json"),
    ("json string", '"status"', "invalid_json"),
    ("no type", {"text": "hi"}, "invalid_field"),
    ("type not a string", {"type": 5}, "invalid_field"),
    ("unknown type", {"type": "launch_rockets", "request_id": "u1"}, "unknown_type"),
    ("llm_request without text", {"type": "llm_request", "request_id": "m1"}, "invalid_field"),
    ("llm_request text mistyped", {"type": "llm_request", "text": 42, "request_id": "m2"}, "invalid_field"),
    ("llm_request empty text", {"type": "llm_request", "text": "  ", "request_id": "m3"}, "invalid_field"),
    ("llm_request stream mistyped", {"type": "llm_request", "text": "hi", "stream": "maybe"}, "invalid_field"),
    ("llm_request bad context", {"type": "llm_request", "text": "hi", "context": [{"role": "x"}]}, "invalid_field"),
    ("tts_request without text", {"type": "tts_request"}, "invalid_field"),
    ("text too long", {"type": "tts_request", "text": "a" * 5000, "request_id": "big"}, "payload_too_large"),
    ("set_mode unknown mode", {"type": "set_mode", "mode": "karaoke"}, "invalid_field"),
    ("set_mode mistyped", {"type": "set_mode", "mode": "stt", "segment_silence_ms": "soon"}, "invalid_field"),
    ("request_id mistyped", {"type": "status", "request_id": {"a": 1}}, "invalid_field"),
    ("audio not base64", {"type": "audio", "data": "!!!not-base64!!!", "rate": 16000}, "invalid_field"),
    ("audio missing data", {"type": "audio", "rate": 16000}, "invalid_field"),
    ("audio odd length", {"type": "audio", "data": base64.b64encode(b"\x01\x02\x03").decode()}, "unsupported_audio"),
    ("audio bad rate", {"type": "audio", "data": base64.b64encode(b"\x00" * 320).decode(), "rate": 11025},
     "unsupported_audio"),
    ("audio bad format", {"type": "audio", "data": base64.b64encode(b"\x00" * 320).decode(), "format": "opus"},
     "unsupported_audio"),
    ("mulaw at 16k", {"type": "audio", "data": base64.b64encode(b"\xff" * 320).decode(), "format": "mulaw",
                      "rate": 16000}, "unsupported_audio"),
    ("switch_model bad scope", {"type": "switch_model", "scope": "galaxy"}, "invalid_field"),
]


@pytest.mark.parametrize("name,payload,code", CASES, ids=[c[0] for c in CASES])
async def test_bad_message_gets_error_and_connection_stays_usable(
    client_factory: Callable[..., Any], name: str, payload: Any, code: str
) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "stt", "call_id": "bad"}, "mode_ready")
    await c.send(payload if isinstance(payload, str) else json.dumps(payload))
    err = await c.wait_type("error")
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and "/" not in err["message"]
    if isinstance(payload, dict) and isinstance(payload.get("request_id"), str):
        assert err["request_id"] == payload["request_id"]
    # Nothing changed: the session keeps its mode, and it still answers.
    status = await c.request({"type": "status"}, "status_response")
    assert status["status"] == "ok"
    ready = await c.request({"type": "set_mode", "mode": "stt"}, "mode_ready")
    assert ready["call_id"] == "bad"


async def test_odd_length_binary_frame(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    await c.send(b"\x00\x01\x02")
    err = await c.wait_type("error")
    assert err["code"] == "unsupported_audio"
    assert (await c.request({"type": "status"}, "status_response"))["status"] == "ok"


async def test_oversized_frame_closes_1009_others_unaffected(client_factory: Callable[..., Any]) -> None:
    victim = await client_factory()
    bystander = await client_factory()
    await victim.send(b"\x00" * (8 * 1024 * 1024 + 2))
    for _ in range(300):
        if victim.closed_code is not None:
            break
        await asyncio.sleep(0.05)
    assert victim.closed_code == 1009
    reply = await bystander.request({"type": "llm_request", "text": "Say hi."}, "llm_response")
    assert reply["text"]


async def test_a_frame_at_the_limit_is_accepted(client_factory: Callable[..., Any]) -> None:
    """Some clients send whole utterances: a 6 MiB base64 JSON frame is decoded off the loop and accepted."""
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "stt"}, "mode_ready")
    pcm = b"\x00\x00" * (16000 * 140)  # 140 s of silence: 4.5 MB of PCM, 6 MB of base64
    await c.send({"type": "audio", "data": base64.b64encode(pcm).decode(), "rate": 16000})
    status = await c.request({"type": "status"}, "status_response")
    assert status["status"] == "ok"
    assert not c.got.json("error")


async def test_garbage_audio_never_breaks_the_session(client_factory: Callable[..., Any]) -> None:
    import numpy as np

    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "stt", "call_id": "noise"}, "mode_ready")
    rng = np.random.default_rng(1)
    noise = rng.integers(-32768, 32767, 16000, dtype=np.int16).tobytes()
    for i in range(0, len(noise), 640):
        await c.send(noise[i:i + 640])
    reply = await c.request({"type": "tts_request", "text": "Still here."}, "tts_response")
    assert reply["byte_length"] > 0


async def test_server_without_models_starts_and_says_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    srv = start_server(tmp_path, empty, wait="listening")
    try:
        status, ready = await asyncio.to_thread(srv.wait_settled)
        assert status == 503
        assert ready["status"] == "not_ready"
        assert any(m.startswith("stt") for m in ready["missing"])
        assert any(m.startswith("llm") for m in ready["missing"])
        assert any(m.startswith("tts") for m in ready["missing"])
        assert "model_setup.py download" in ready["hint"]
        assert (await asyncio.to_thread(srv.http, "/health"))[0] == 200
        c = await connect(srv)
        s = await c.request({"type": "status"}, "status_response")
        assert s["degraded"] is True and s["missing"] == ready["missing"] and "model_setup.py" in s["hint"]
        assert s["models"]["llm"]["loaded"] is False and s["models"]["stt"]["loaded"] is False
        err = await c.request({"type": "llm_request", "text": "hi", "request_id": "x"}, "error")
        assert err["code"] == "not_ready" and err["request_id"] == "x"
        err = await c.request({"type": "tts_request", "text": "hi", "request_id": "y"}, "error")
        assert err["code"] == "not_ready"
        # The AVA-compatible fallback too: an empty tts_response for that text, so no client waits it out.
        fallback = await c.wait_type("tts_response", request_id="y")
        assert fallback["text"] == "hi" and fallback["byte_length"] == 0 and fallback["audio_data"] == ""
        await c.request({"type": "set_mode", "mode": "stt"}, "mode_ready")
        await c.send(b"\x00\x00" * 3200)
        res = await c.wait_type("stt_result")
        assert res["error"] == "stt_unavailable" and res["text"] == "" and res["is_final"] is True
        await c.close()
    finally:
        assert srv.stop() == 0


def test_non_loopback_bind_without_token_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import ROOT

    env = {"PATH": "/usr/bin:/bin", "LOCAL_WS_HOST": "0.0.0.0", "LOCAL_MODELS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "local_ai_server"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "LOCAL_WS_AUTH_TOKEN" in proc.stderr


async def test_other_sessions_unaffected_by_a_flood_of_bad_messages(server: ServerProc) -> None:
    bad = await connect(server)
    good = await connect(server)
    try:
        flood = asyncio.gather(*(bad.send("{oops") for _ in range(300)))
        reply = await good.request({"type": "llm_request", "text": "What color is the sky?"}, "llm_response")
        await flood
        assert reply["text"]
        await bad.wait_for(lambda m: len(bad.got.json("error")) >= 300, timeout=30)
    finally:
        await bad.close()
        await good.close()


async def test_corrupt_model_at_start_serves_the_rest_and_says_why(models_dir: Path, tmp_path: Path) -> None:
    """A corrupt GGUF at start: the server still starts, /ready is 503 naming the LLM, STT/TTS still work."""
    import shutil

    from local_ai_server.setup.selection import read_selection

    sel = read_selection(models_dir)
    assert sel is not None
    broken = tmp_path / "models"
    for role in ("stt", "tts"):
        dest = broken / sel.model(role).path
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = sel.path(role)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
            shutil.copy(f"{src}.json", f"{dest}.json")
    llm = broken / sel.model("llm").path
    llm.parent.mkdir(parents=True, exist_ok=True)
    llm.write_bytes(b"GGUF" + b"\x07" * 65536)
    shutil.copy(models_dir / "selected.json", broken / "selected.json")
    srv = start_server(tmp_path, broken, wait="listening")
    try:
        status, ready = await asyncio.to_thread(srv.wait_settled)
        assert status == 503 and ready["status"] == "not_ready"
        assert [m for m in ready["missing"] if m.startswith("llm:") and "could not be loaded" in m], ready
        assert not [m for m in ready["missing"] if m.startswith(("stt", "tts"))], ready
        c = await connect(srv)
        s = await c.request({"type": "status"}, "status_response")
        assert s["models"]["llm"]["loaded"] is False and s["models"]["llm"]["state"] == "failed"
        assert s["degraded"] is True and s["models"]["tts"]["loaded"] is True
        assert "/" not in " ".join(s["missing"])
        err = await c.request({"type": "llm_request", "text": "hi", "request_id": "x"}, "error")
        assert err["code"] == "not_ready"
        tts = await c.request({"type": "tts_request", "text": "The voice still works."}, "tts_response")
        assert tts["byte_length"] > 0
        await c.close()
    finally:
        assert srv.stop() == 0
