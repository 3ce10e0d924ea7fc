"""AVA v7.5.4 behaviours on the real server: rollback after barge-in, tool calling end to end, formats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from local_ai_server.audio import is_silent, mulaw_decode, pcm16_to_float32

from .conftest import Client, ServerProc, silence

HANGUP = {"name": "hangup_call", "description": "End the call when the caller says goodbye.",
          "parameters": {"type": "object", "properties": {"farewell_message": {"type": "string"}}, "required": []}}
TRANSFER = {"name": "transfer_call", "description": "Transfer the caller to a department or a human agent.",
            "parameters": {"type": "object", "properties": {"destination": {"type": "string",
                                                                             "enum": ["sales", "support"]}},
                           "required": ["destination"]}}


def requests_of(server: ServerProc, call_id: str) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e.get("event") == "llm.request" and e.get("call_id") == call_id]


def audio_after(c: Client, start: int) -> list[tuple[dict[str, Any], bytes]]:
    """(tts_audio header, binary) pairs received from item `start` on; each binary right after its header."""
    items = c.got.items
    pairs = []
    for i in range(max(start, 1), len(items)):
        if items[i][0] == "binary":
            assert items[i - 1][0] == "json" and items[i - 1][1]["type"] == "tts_audio"
            pairs.append((items[i - 1][1], items[i][1]))
    return pairs


async def test_rollback_after_an_answer_forgets_it_and_flags_the_next_prompt(
        client_factory: Callable[..., Any], server: ServerProc) -> None:
    c = await client_factory()
    await c.request({"type": "llm_request", "text": "My name is Zorblax. Say OK.", "call_id": "rb1"}, "llm_response")
    await c.request({"type": "llm_request", "text": "Say OK again.", "call_id": "rb1"}, "llm_response")
    assert requests_of(server, "rb1")[-1]["history"] == 2
    ack = await c.request({"type": "barge_in", "call_id": "rb1", "request_id": "b1", "rollback_assistant": True,
                           "protocol_version": 2}, "barge_in_ack")
    assert ack == {"type": "barge_in_ack", "status": "ok", "call_id": "rb1", "request_id": "b1"}
    await c.request({"type": "llm_request", "text": "Hello?", "call_id": "rb1"}, "llm_response")
    last = requests_of(server, "rb1")[-1]
    # The second exchange is gone (history 4 -> 2), and the prompt says the caller interrupted.
    assert last["history"] == 2 and last["interrupted"] is True
    await c.request({"type": "llm_request", "text": "And now?", "call_id": "rb1"}, "llm_response")
    assert requests_of(server, "rb1")[-1]["interrupted"] is False  # one answer later the note is gone


async def test_rollback_of_a_spoken_answer_cut_mid_way_leaves_no_trace(
        client_factory: Callable[..., Any], server: ServerProc, speak: Callable[[str], np.ndarray]) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "rb2", "output_encoding": "linear16",
                     "output_sample_rate_hz": 16000}, "mode_ready")
    await c.request({"type": "llm_request", "text": "Tell me a very long story about a dragon.", "call_id": "rb2"},
                    "llm_response")
    await c.stream(np.concatenate([silence(0.3), speak("Tell me a long story about a brave knight."),
                                   silence(1.0)]))
    await c.wait_type("tts_audio", timeout=60)
    await c.request({"type": "barge_in", "request_id": "cut", "rollback_assistant": True}, "barge_in_ack")
    mark = len(c.got.items)
    await c.request({"type": "llm_request", "text": "What did I ask?", "call_id": "rb2"}, "llm_response")
    # Only the first exchange (the llm_request) is left: the cut voice turn recorded nothing.
    last = requests_of(server, "rb2")[-1]
    assert last["history"] == 2 and last["interrupted"] is True
    assert not audio_after(c, mark), "audio of the cut answer arrived after the ack"


async def test_tool_calls_in_llm_mode_parser_heuristic_and_structured(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    await c.send({"type": "tool_context", "protocol_version": 2, "call_id": "t1", "tools": [HANGUP, TRANSFER],
                  "allowed_tools": ["hangup_call", "transfer_call"], "tool_policy": "compatible"})
    written = await c.request({
        "type": "llm_tool_request", "protocol_version": 2, "request_id": "g1", "call_id": "t1", "mode": "llm",
        "text": 'Sure. <tool_call>{"name": "transfer_call", "arguments": {"destination": "sales"}}</tool_call>',
        "latest_user_text": "Put me through to sales.", "tool_choice": "auto"}, "llm_tool_response")
    assert written["request_id"] == "g1" and written["call_id"] == "t1" and written["protocol_version"] == 2
    assert written["tool_calls"] == [{"name": "transfer_call", "parameters": {"destination": "sales"}}]
    assert written["tool_path"] == "parser" and written["finish_reason"] == "tool_calls"
    bye = await c.request({"type": "llm_tool_request", "request_id": "g2", "call_id": "t1",
                           "text": "You're welcome. Have a nice day!", "latest_user_text": "Thanks, goodbye."},
                          "llm_tool_response")
    assert bye["tool_path"] == "heuristic"
    assert bye["tool_calls"] == [{"name": "hangup_call", "parameters": {"farewell_message": "You're welcome."}}]
    # A hangup is never guessed: not without the caller's words.
    none = await c.request({"type": "llm_tool_request", "request_id": "g3", "call_id": "t1", "tool_choice": "none",
                            "text": "Paris is the capital.", "latest_user_text": "Capital of France?"},
                           "llm_tool_response")
    assert none["tool_calls"] == [] and none["finish_reason"] == "stop" and none["tool_path"] == "none"
    # Structured: the model decides, held by the grammar to a declared tool with valid arguments.
    forced = await c.request({"type": "llm_tool_request", "request_id": "g4", "call_id": "t1",
                              "text": "", "latest_user_text": "Transfer me to support please.",
                              "tool_choice": "required"}, "llm_tool_response", timeout=60)
    assert forced["tool_path"] == "structured" and forced["structured_attempts"] == 1
    assert [t["name"] for t in forced["tool_calls"]] == ["transfer_call"]
    assert forced["tool_calls"][0]["parameters"]["destination"] in ("sales", "support")


async def test_tool_result_is_answered_and_spoken_in_llm_mode(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "llm", "call_id": "t2"}, "mode_ready")
    mark = len(c.got.items)
    reply = await c.request({
        "type": "tool_result", "protocol_version": 2, "request_id": "tr1", "call_id": "t2",
        "function_call_id": "generated-1", "tool_name": "get_business_hours",
        "result": {"open": "9 am", "close": "5 pm"}, "is_error": False, "tool_policy": "compatible",
        "output_encoding": "linear16", "output_sample_rate_hz": 16000}, "llm_response", timeout=60)
    assert reply["mode"] == "tool_result" and reply["tool_result_final"] is True
    assert reply["tool_gateway_done"] is True and reply["tool_path"] == "none" and reply["request_id"] == "tr1"
    assert reply["text"]
    pairs = audio_after(c, mark)
    assert pairs and all(h["mode"] == "tool_result" and h["encoding"] == "linear16" for h, _ in pairs)
    assert not is_silent(pcm16_to_float32(b"".join(p for _, p in pairs)))


async def test_full_mode_goodbye_is_gated_to_a_hangup_and_the_farewell_spoken(
        client_factory: Callable[..., Any], server: ServerProc, speak: Callable[[str], np.ndarray]) -> None:
    """user speech -> the server decides on hangup_call (nothing spoken) -> tool_result -> farewell spoken."""
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "t3"}, "mode_ready")
    await c.send({"type": "tool_context", "call_id": "t3", "tools": [HANGUP], "allowed_tools": ["hangup_call"],
                  "tool_policy": "off"})
    await c.stream(np.concatenate([silence(0.3), speak("Thank you, that's all. Goodbye."), silence(1.2)]))
    gated = await c.wait_type("llm_tool_response", timeout=60)
    assert gated["server_gated"] is True and "request_id" not in gated and gated["call_id"] == "t3"
    assert gated["tool_calls"][0]["name"] == "hangup_call" and gated["tool_path"] == "heuristic"
    farewell_text = gated["tool_calls"][0]["parameters"]["farewell_message"]
    assert farewell_text
    assert not c.got.json("tts_audio") and not c.got.json("llm_response"), "the gated answer was spoken"
    mark = len(c.got.items)
    await c.send({"type": "tool_result", "request_id": "tr2", "call_id": "t3", "tool_name": "hangup_call",
                  "result": {"status": "success", "will_hangup": True, "farewell_message": farewell_text},
                  "is_error": False})
    final = await c.wait_type("llm_response", timeout=60, request_id="tr2")
    assert final["text"] == farewell_text and final["tool_path"] == "terminal_farewell"
    assert final["tool_result_final"] is True and final["mode"] == "tool_result"
    pairs = audio_after(c, mark)
    assert pairs and all(h["mode"] == "tool_result" and h["request_id"] == "tr2" for h, _ in pairs)
    assert pairs[-1][0]["is_final"] is True
    assert not is_silent(pcm16_to_float32(mulaw_decode(b"".join(p for _, p in pairs))))


async def test_full_mode_answer_without_a_tool_says_the_gate_ran(
        client_factory: Callable[..., Any], speak: Callable[[str], np.ndarray]) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "t4"}, "mode_ready")
    await c.send({"type": "tool_context", "call_id": "t4", "tools": [HANGUP], "allowed_tools": ["hangup_call"],
                  "tool_policy": "off"})
    await c.stream(np.concatenate([silence(0.3), speak("What is the capital of France?"), silence(1.2)]))
    reply = await c.wait_type("llm_response", timeout=60)
    assert reply["tool_gateway_done"] is True and reply["mode"] == "llm"
    assert c.got.json("tts_audio") and not c.got.json("llm_tool_response")


async def test_barge_in_during_a_tool_result_answer_stops_it(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "t5"}, "mode_ready")
    await c.send({"type": "tool_result", "request_id": "tr3", "call_id": "t5", "tool_name": "get_weather",
                  "result": {"forecast": "rain all week, then sun, then storms, then a very long heat wave"}})
    await c.wait_type("tts_audio", timeout=60)
    await c.request({"type": "barge_in", "request_id": "b5", "rollback_assistant": True}, "barge_in_ack")
    mark = len(c.got.items)
    cancelled = await c.wait_for(lambda m: m.get("type") == "error" and m.get("request_id") == "tr3", timeout=10)
    assert cancelled["code"] == "cancelled"
    await c.request({"type": "status", "request_id": "after"}, "status_response")
    assert not audio_after(c, mark) and not [m for m in c.got.json("llm_response") if m.get("request_id") == "tr3"]


async def test_formats_capabilities_and_backends_as_ava_reads_them(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    ready = await c.request({"type": "set_mode", "mode": "tts", "call_id": "f1"}, "mode_ready")
    assert ready["output_encoding"] == "mulaw" and ready["output_sample_rate_hz"] == 8000
    ready = await c.request({"type": "set_mode", "output_encoding": "linear16", "output_sample_rate_hz": 24000},
                            "mode_ready")
    assert ready["output_encoding"] == "linear16" and ready["output_sample_rate_hz"] == 24000
    caps = (await c.request({"type": "capabilities"}, "capabilities_response"))["capabilities"]
    for key in ("vosk", "sherpa", "kroko_embedded", "faster_whisper", "whisper_cpp", "tone", "piper", "kokoro",
                "melotts", "silero", "matcha", "llama"):
        assert isinstance(caps[key], bool), key
    assert caps["faster_whisper"] and caps["piper"] and caps["llama"] and caps["tool_calling"]
    assert caps["silero"] is False and caps["silero_vad"] is True  # AVA's "silero" is a TTS
    backends = await c.request({"type": "backends"}, "backends_response")
    assert {b["name"]: b["available"] for b in backends["llm"]} == {"llama_cpp": True}
    assert {b["name"] for b in backends["stt"] if b["available"]} == {"faster_whisper"}
    schema = await c.request({"type": "backend_schema", "backend_type": "LLM", "backend_name": "llama_cpp"},
                             "backend_schema_response")
    assert schema["available"] is True and schema["schema"]["context"]["type"] == "integer"
    unknown = await c.request({"type": "backend_schema", "backend_type": "stt", "backend_name": "nope"},
                              "backend_schema_response")
    assert set(unknown) == {"type", "error"}
    status = await c.request({"type": "status"}, "status_response")
    assert status["models"]["llm"]["tool_capability"]["level"] == "partial"
    streamed = await c.request({"type": "llm_request", "text": "Say hi.", "stream": True, "request_id": "s"},
                               "llm_response")
    tokens = [m for m in c.got.json("llm_token") if m["request_id"] == "s"]
    assert tokens and all(m["token"] == m["delta"] for m in tokens)
    assert "".join(m["token"] for m in tokens).strip() == streamed["text"]
