"""The Realtime client-event parser: GA and beta shapes accepted, bad fields refused with their param."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from local_ai_server.fronts.realtime_input import (
    ManualBuffer,
    authorized,
    core_input,
    is_realtime_path,
    model_of,
    subprotocol,
)
from local_ai_server.fronts.realtime_parse import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    FunctionOutput,
    Invalid,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    Limits,
    OutputAudioClear,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    TurnDetection,
    decode,
    parse,
)

pytestmark = pytest.mark.unit


def update(session: dict[str, Any]) -> SessionConfig:
    ev = parse({"type": "session.update", "session": session})
    assert isinstance(ev, SessionUpdate)
    return ev.patch.apply(SessionConfig())


def refused(obj: dict[str, Any]) -> Invalid:
    with pytest.raises(Invalid) as info:
        parse(obj, Limits(max_text_chars=50, max_instructions_chars=100))
    return info.value


def test_ga_session_update() -> None:
    cfg = update({"type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"],
                  "audio": {"input": {"format": {"type": "audio/pcmu"},
                                      "turn_detection": {"type": "server_vad", "threshold": 0.7,
                                                         "prefix_padding_ms": 300, "silence_duration_ms": 800,
                                                         "create_response": False, "interrupt_response": False}},
                            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}}})
    assert cfg == SessionConfig(instructions="Be brief.", input_format="audio/pcmu", output_format="audio/pcm",
                                turn_detection=TurnDetection(0.7, 300, 800, False, False), audio_output=False)


def test_beta_flat_fields_and_null_turn_detection() -> None:
    cfg = update({"modalities": ["text", "audio"], "input_audio_format": "g711_alaw",
                  "output_audio_format": "g711_ulaw", "turn_detection": None, "voice": "alloy"})
    assert (cfg.input_format, cfg.output_format, cfg.turn_detection, cfg.audio_output) == \
        ("audio/pcma", "audio/pcmu", None, True)


def test_absent_fields_change_nothing_and_unknown_ones_are_ignored() -> None:
    start = SessionConfig(instructions="x", turn_detection=None, audio_output=False)
    ev = parse({"type": "session.update", "session": {"type": "realtime", "tracing": "auto", "new_thing": [1]}})
    assert isinstance(ev, SessionUpdate) and ev.patch.apply(start) == start
    # Turn detection given without its fields: the defaults (a whole replacement, as OpenAI's).
    assert update({"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}).turn_detection == TurnDetection()
    # semantic_vad is the turn detector; its eagerness (default auto) becomes the detector's threshold.
    semantic = {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}
    assert update(semantic).turn_detection == TurnDetection(eagerness="high")


@pytest.mark.parametrize(("session", "param"), [
    ({"type": "transcription"}, "session.type"),
    ({"instructions": 3}, "session.instructions"),
    ({"instructions": "x" * 101}, "session.instructions"),
    ({"output_modalities": ["video"]}, "session.output_modalities"),
    ({"output_modalities": []}, "session.output_modalities"),
    ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.output.format.rate"),
    ({"audio": {"input": {"turn_detection": {"type": "near_field_vad"}}}}, "session.audio.input.turn_detection.type"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}}},
     "session.audio.input.turn_detection.eagerness"),
    ({"audio": {"input": {"turn_detection": {"threshold": 1.5}}}}, "session.audio.input.turn_detection.threshold"),
    ({"audio": {"input": {"turn_detection": {"threshold": True}}}}, "session.audio.input.turn_detection.threshold"),
    ({"audio": {"input": {"turn_detection": {"silence_duration_ms": "500"}}}},
     "session.audio.input.turn_detection.silence_duration_ms"),
    ({"audio": {"input": {"turn_detection": {"create_response": 1}}}},
     "session.audio.input.turn_detection.create_response"),
    ({"audio": {"input": {"turn_detection": "server_vad"}}}, "session.audio.input.turn_detection"),
    ({"audio": "pcm"}, "session.audio"),
    ({"input_audio_format": "mp3"}, "session.input_audio_format"),
])
def test_bad_session_fields_name_their_param(session: dict[str, Any], param: str) -> None:
    err = refused({"type": "session.update", "event_id": "ev_9", "session": session})
    assert err.param == param and err.event_id == "ev_9"
    assert "/" not in err.message.replace("audio/", "") and err.message


def test_audio_events() -> None:
    ev = parse({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02").decode()})
    assert isinstance(ev, AudioAppend) and ev.audio() == b"\x01\x02"
    bad = parse({"type": "input_audio_buffer.append", "event_id": "a", "audio": "not base64!"})
    assert isinstance(bad, AudioAppend)
    with pytest.raises(Invalid) as info:
        bad.audio()
    assert info.value.param == "audio" and info.value.event_id == "a"
    assert refused({"type": "input_audio_buffer.append"}).code == "missing_required_parameter"
    assert refused({"type": "input_audio_buffer.append", "audio": 5}).code == "invalid_type"
    assert isinstance(parse({"type": "input_audio_buffer.commit"}), AudioCommit)
    assert isinstance(parse({"type": "input_audio_buffer.clear"}), AudioClear)


def test_items() -> None:
    ev = parse({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Hello"}, {"type": "input_text", "text": "there"}]}})
    assert ev == ItemCreate(None, "Hello\nthere")
    out = parse({"type": "conversation.item.create", "event_id": "o1",
                 "item": {"type": "function_call_output", "call_id": "call_1", "output": "{}"}})
    assert out == FunctionOutput("o1", "call_1", "{}")
    missing = refused({"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "{}"}})
    assert (missing.code, missing.param) == ("missing_required_parameter", "item.call_id")
    assert refused({"type": "conversation.item.create", "item": {"type": "function_call", "name": "f",
                                                                "arguments": "{}"}}).code == "unsupported_parameter"
    assert refused({"type": "conversation.item.create", "item": {"role": "system", "content": [
        {"type": "input_text", "text": "x"}]}}).param == "item.role"
    assert refused({"type": "conversation.item.create", "item": {"role": "user", "content": [
        {"type": "input_audio", "audio": "AAAA"}]}}).param == "item.content[0]"
    assert refused({"type": "conversation.item.create", "item": {"role": "user", "content": [
        {"type": "input_text", "text": "y" * 51}]}}).param == "item.content"
    assert refused({"type": "conversation.item.create"}).code == "missing_required_parameter"
    trunc = parse({"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0,
                   "audio_end_ms": 1500})
    assert trunc == ItemTruncate(None, "item_1", 0, 1500)
    assert refused({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": -1}).param == "audio_end_ms"
    assert parse({"type": "conversation.item.delete", "event_id": "d1", "item_id": "item_1"}) == \
        ItemDelete("d1", "item_1")
    gone = refused({"type": "conversation.item.delete", "event_id": "d2"})
    assert (gone.code, gone.param, gone.event_id) == ("missing_required_parameter", "item_id", "d2")
    assert parse({"type": "output_audio_buffer.clear", "event_id": "c1"}) == OutputAudioClear("c1")


def test_responses() -> None:
    assert parse({"type": "response.create"}) == ResponseCreate(None)
    ev = parse({"type": "response.create", "event_id": "r1", "response": {
        "instructions": "Shout.", "output_modalities": ["text"], "conversation": "none", "metadata": {"k": "v"}}})
    assert ev == ResponseCreate("r1", "Shout.", False, out_of_band=True)
    assert parse({"type": "response.create", "response": {"modalities": ["audio", "text"]}}) == \
        ResponseCreate(None, None, True)
    assert refused({"type": "response.create", "response": {"conversation": "conv_x"}}).param == \
        "response.conversation"
    assert refused({"type": "response.create", "response": {"input": []}}).code == "unsupported_parameter"
    assert parse({"type": "response.cancel", "response_id": "resp_1"}) == ResponseCancel(None, "resp_1")
    assert parse({"type": "response.cancel"}) == ResponseCancel(None, None)


def test_unknown_unsupported_and_malformed() -> None:
    assert refused({"type": "nope", "event_id": "x"}).code == "invalid_event_type"
    assert refused({"type": "conversation.item.retrieve", "item_id": "i"}).code == "unsupported_event"
    assert refused({"event_id": "x"}).code == "missing_required_parameter"
    with pytest.raises(Invalid) as info:
        decode("{oops")
    assert info.value.code == "invalid_json"
    with pytest.raises(Invalid):
        decode("[1, 2]")
    # A non-string event_id is not echoed (it could be anything).
    assert refused({"type": "nope", "event_id": {"a": 1}}).event_id is None


def test_endpoint_helpers() -> None:
    assert is_realtime_path("/v1/realtime") and is_realtime_path("/v1/realtime/?model=gpt-realtime")
    assert not is_realtime_path("/") and not is_realtime_path("/v1/realtimex")
    assert model_of("/v1/realtime?model=gpt-realtime&x=1") == "gpt-realtime" and model_of("/v1/realtime") is None
    assert authorized({}, None)
    assert authorized({"Authorization": "Bearer s3cret"}, "s3cret")
    assert not authorized({"Authorization": "Bearer nope"}, "s3cret") and not authorized({}, "s3cret")
    assert not authorized({"Authorization": "Basic s3cret"}, "s3cret")
    # A browser's key, offered as a subprotocol (it cannot set an Authorization header on a WebSocket).
    assert authorized({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.s3cret"}, "s3cret")
    assert not authorized({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.nope"}, "s3cret")
    assert not authorized({"Sec-WebSocket-Protocol": "s3cret"}, "s3cret")
    assert subprotocol("/v1/realtime?model=x", ["realtime", "openai-insecure-api-key.k"]) == "realtime"
    assert subprotocol("/v1/realtime", []) is None and subprotocol("/", ["realtime"]) is None


def test_input_formats_and_manual_buffer() -> None:
    assert core_input("audio/pcm", b"\x00\x00") == (b"\x00\x00", "pcm16le", 24000)
    assert core_input("audio/pcmu", b"\xff") == (b"\xff", "mulaw", 8000)
    pcm, fmt, rate = core_input("audio/pcma", b"\xd5\xd5")
    assert (fmt, rate, len(pcm)) == ("pcm16le", 8000, 4)
    buf = ManualBuffer(max_s=1.0)
    assert buf.add(b"\x00" * 24000, "pcm16le", 24000)  # 0.5 s
    assert not buf.add(b"\x00" * 4800, "mulaw", 8000)  # 0.6 s more: refused, nothing kept
    assert buf.seconds == pytest.approx(0.5)
    assert len(buf.take()) == 1 and buf.seconds == 0.0
