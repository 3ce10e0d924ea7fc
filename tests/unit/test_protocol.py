"""Tests for the sans-I/O wire protocol: client message parsing, error codes and server message builders."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from local_ai_server import protocol as P
from local_ai_server.errors import (
    InvalidField,
    InvalidJson,
    PayloadTooLarge,
    ProtocolError,
    ServerError,
    UnknownType,
)
from local_ai_server.protocol import (
    MESSAGE_TYPES,
    Audio,
    Auth,
    BargeIn,
    Capabilities,
    Limits,
    LlmRequest,
    Reload,
    SetMode,
    Status,
    SwitchModel,
    ToolContext,
    TtsRequest,
    normalize_type,
    parse_object,
    parse_text,
)

DEFAULT_LIMITS = Limits()


def parse(obj: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> P.Message:
    """Round-trip through JSON text, as the server receives it."""
    return parse_text(json.dumps(obj), limits)


def parse_error(obj: dict[str, Any] | str, limits: Limits = DEFAULT_LIMITS) -> ServerError:
    """The ServerError a message raises (fails the test if it parses)."""
    text = obj if isinstance(obj, str) else json.dumps(obj)
    with pytest.raises(ServerError) as info:
        parse_text(text, limits)
    return info.value


# ---------------------------------------------------------------- auth


def test_auth_token_field() -> None:
    assert parse({"type": "auth", "auth_token": "s3cret", "call_id": "c1"}) == Auth(token="s3cret", call_id="c1")


def test_auth_token_alias() -> None:
    assert parse({"type": "auth", "token": "t"}) == Auth(token="t", call_id=None)


def test_auth_token_preferred_over_alias() -> None:
    msg = parse({"type": "auth", "auth_token": "primary", "token": "alias"})
    assert isinstance(msg, Auth) and msg.token == "primary"


def test_auth_without_token_is_invalid_field() -> None:
    err = parse_error({"type": "auth"})
    assert isinstance(err, InvalidField) and err.code == "invalid_field"
    assert "auth_token" in err.message


def test_auth_token_must_be_string() -> None:
    assert parse_error({"type": "auth", "auth_token": 123}).code == "invalid_field"


# ---------------------------------------------------------------- set_mode


def test_set_mode_all_fields() -> None:
    msg = parse({
        "type": "set_mode", "mode": "STT", "call_id": "c-9", "segment_energy_threshold": 250,
        "segment_silence_ms": 700, "output_encoding": "linear16", "output_sample_rate_hz": 16000,
        "request_id": "r1",
    })
    assert msg == SetMode(mode="stt", call_id="c-9", segment_energy_threshold=250, segment_silence_ms=700,
                          output_encoding="linear16", output_sample_rate_hz=16000, request_id="r1")


def test_set_mode_without_mode_keeps_the_current_one() -> None:
    assert parse({"type": "set_mode"}) == SetMode(mode=None)


def test_set_mode_encoding_and_rate_aliases() -> None:
    msg = parse({"type": "set_mode", "encoding": "mulaw", "sample_rate_hz": 8000})
    assert isinstance(msg, SetMode)
    assert (msg.output_encoding, msg.output_sample_rate_hz) == ("mulaw", 8000)


def test_set_mode_canonical_names_win_over_aliases() -> None:
    msg = parse({"type": "set_mode", "output_encoding": "linear16", "encoding": "mulaw",
                 "output_sample_rate_hz": 24000, "sample_rate_hz": 8000})
    assert isinstance(msg, SetMode)
    assert (msg.output_encoding, msg.output_sample_rate_hz) == ("linear16", 24000)


def test_set_mode_numeric_strings_and_integral_floats_accepted() -> None:
    msg = parse({"type": "set_mode", "segment_silence_ms": " 800 ", "segment_energy_threshold": 300.0})
    assert isinstance(msg, SetMode)
    assert msg.segment_silence_ms == 800 and isinstance(msg.segment_silence_ms, int)
    assert msg.segment_energy_threshold == 300 and isinstance(msg.segment_energy_threshold, int)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("segment_silence_ms", 49),
        ("segment_silence_ms", 10001),
        ("segment_energy_threshold", -1),
        ("segment_energy_threshold", 32768),
        ("output_sample_rate_hz", 0),
        ("segment_silence_ms", True),
        ("segment_silence_ms", 500.5),
        ("segment_silence_ms", "fast"),
        ("segment_silence_ms", [500]),
        ("mode", "karaoke"),
        ("mode", 3),
        ("output_encoding", 7),
    ],
)
def test_set_mode_bad_fields_are_invalid_field(field: str, value: Any) -> None:
    err = parse_error({"type": "set_mode", field: value, "request_id": "r7"})
    assert isinstance(err, InvalidField) and err.code == "invalid_field"
    assert field in err.message
    assert err.request_id == "r7"


def test_set_mode_range_bounds_inclusive() -> None:
    msg = parse({"type": "set_mode", "segment_silence_ms": 50, "segment_energy_threshold": 32767})
    assert isinstance(msg, SetMode)
    assert (msg.segment_silence_ms, msg.segment_energy_threshold) == (50, 32767)
    msg = parse({"type": "set_mode", "segment_silence_ms": 10000, "segment_energy_threshold": 0})
    assert isinstance(msg, SetMode)
    assert (msg.segment_silence_ms, msg.segment_energy_threshold) == (10000, 0)


@pytest.mark.parametrize("value", ["--500", "²", "1²"])
def test_set_mode_digit_like_strings_raise_invalid_field(value: str) -> None:
    with pytest.raises(InvalidField):
        parse({"type": "set_mode", "segment_silence_ms": value})


# ---------------------------------------------------------------- audio


def test_audio_all_fields_and_payload() -> None:
    raw = bytes(range(256)) * 3
    msg = parse({
        "type": "audio", "data": base64.b64encode(raw).decode(), "rate": 8000, "format": "mulaw",
        "mode": "full", "call_id": "c", "request_id": 5, "output_encoding": "linear16",
        "output_sample_rate_hz": 16000,
    })
    assert isinstance(msg, Audio)
    assert (msg.rate, msg.format, msg.mode, msg.call_id, msg.request_id) == (8000, "mulaw", "full", "c", 5)
    assert (msg.output_encoding, msg.output_sample_rate_hz) == ("linear16", 16000)
    assert msg.payload() == raw


@pytest.mark.parametrize("rate_key", ["sample_rate", "sample_rate_hz"])
def test_audio_aliases(rate_key: str) -> None:
    msg = parse({"type": "audio", "audio": base64.b64encode(b"\x01\x02").decode(), rate_key: 16000,
                 "encoding": "pcm16le"})
    assert isinstance(msg, Audio)
    assert (msg.rate, msg.format, msg.payload()) == (16000, "pcm16le", b"\x01\x02")


def test_audio_bad_base64_is_invalid_field_with_request_id() -> None:
    msg = parse({"type": "audio", "data": "not*base64!", "request_id": 11})
    assert isinstance(msg, Audio)
    with pytest.raises(InvalidField) as info:
        msg.payload()
    assert info.value.code == "invalid_field" and info.value.request_id == 11


@pytest.mark.parametrize("obj", [{"type": "audio"}, {"type": "audio", "data": 12}, {"type": "audio", "data": None}])
def test_audio_without_string_data_is_invalid_field(obj: dict[str, Any]) -> None:
    assert parse_error(obj).code == "invalid_field"


# ---------------------------------------------------------------- llm_request


def test_llm_request_all_fields() -> None:
    msg = parse({
        "type": "llm_request", "text": "  hi there ", "call_id": "c", "request_id": "q", "mode": "llm",
        "stream": True,
        "context": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ],
    })
    assert msg == LlmRequest(
        text="  hi there ", call_id="c", request_id="q", mode="llm", stream=True,
        context=(("system", "be brief"), ("user", "a"), ("assistant", "b")),
    )


def test_llm_request_defaults() -> None:
    assert parse({"type": "llm_request", "text": "x"}) == LlmRequest(text="x")


def test_llm_request_empty_context_is_empty_tuple_not_none() -> None:
    msg = parse({"type": "llm_request", "text": "x", "context": []})
    assert isinstance(msg, LlmRequest) and msg.context == ()


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("no", False), (1, True), (0, False), (False, False)])
def test_llm_request_stream_bool_forms(value: Any, expected: bool) -> None:
    msg = parse({"type": "llm_request", "text": "x", "stream": value})
    assert isinstance(msg, LlmRequest) and msg.stream is expected


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "llm_request"},
        {"type": "llm_request", "text": 5},
        {"type": "llm_request", "text": "x", "stream": "maybe"},
        {"type": "llm_request", "text": "x", "stream": 2},
        {"type": "llm_request", "text": "x", "context": "hello"},
        {"type": "llm_request", "text": "x", "context": ["hello"]},
        {"type": "llm_request", "text": "x", "context": [{"role": "tool", "content": "x"}]},
        {"type": "llm_request", "text": "x", "context": [{"role": "user", "content": 3}]},
        {"type": "llm_request", "text": "x", "context": [{"role": "user"}]},
    ],
)
def test_llm_request_bad_fields_are_invalid_field(obj: dict[str, Any]) -> None:
    err = parse_error({**obj, "request_id": "rq", "call_id": "cc"})
    assert isinstance(err, InvalidField) and err.code == "invalid_field"
    assert err.message.startswith("llm_request.")
    assert err.request_id == "rq"


def test_llm_request_text_limit() -> None:
    limits = Limits(max_text_chars=10)
    ok = parse({"type": "llm_request", "text": "x" * 10}, limits)
    assert isinstance(ok, LlmRequest) and ok.text == "x" * 10
    err = parse_error({"type": "llm_request", "text": "x" * 11, "request_id": 3}, limits)
    assert isinstance(err, PayloadTooLarge) and err.code == "payload_too_large"
    assert err.request_id == 3


def test_default_text_limit_is_4000_chars() -> None:
    assert isinstance(parse({"type": "llm_request", "text": "é" * 4000}), LlmRequest)
    assert parse_error({"type": "llm_request", "text": "é" * 4001}).code == "payload_too_large"


# ---------------------------------------------------------------- tts_request


def test_tts_request_all_fields() -> None:
    msg = parse({"type": "tts_request", "text": "Hello, world.", "call_id": "c", "request_id": 9, "mode": "tts",
                 "output_encoding": "linear16", "output_sample_rate_hz": 22050})
    assert msg == TtsRequest(text="Hello, world.", call_id="c", request_id=9, mode="tts",
                             output_encoding="linear16", output_sample_rate_hz=22050)


def test_tts_request_encoding_and_rate_aliases() -> None:
    msg = parse({"type": "tts_request", "text": "x", "encoding": "mulaw", "sample_rate_hz": 8000})
    assert isinstance(msg, TtsRequest)
    assert (msg.output_encoding, msg.output_sample_rate_hz) == ("mulaw", 8000)


def test_tts_request_text_over_limit() -> None:
    err = parse_error({"type": "tts_request", "text": "abcdef"}, Limits(max_text_chars=5))
    assert isinstance(err, PayloadTooLarge) and err.code == "payload_too_large"


def test_tts_request_needs_text() -> None:
    assert parse_error({"type": "tts_request", "text": None}).code == "invalid_field"


# ---------------------------------------------------------------- switch_model


def test_switch_model_session_scope_with_nested_configs() -> None:
    msg = parse({
        "type": "switch_model", "scope": " Session ", "call_id": "c", "request_id": "s1", "dry_run": True,
        "llm_config": {"system_prompt": "You are terse.", "model_path": "llm/a.gguf"},
        "stt_config": {"model_path": "stt/b"},
        "tts_config": {"model_path": "tts/c.onnx"},
    })
    assert msg == SwitchModel(scope="session", call_id="c", request_id="s1", system_prompt="You are terse.",
                              llm_model_path="llm/a.gguf", stt_model_path="stt/b",
                              tts_model_path="tts/c.onnx", dry_run=True)


def test_switch_model_top_level_paths_win_over_nested() -> None:
    msg = parse({
        "type": "switch_model", "llm_model_path": "top.gguf", "stt_model_path": "top-stt",
        "tts_model_path": "top.onnx", "llm_config": {"model_path": "nested.gguf"},
        "stt_config": {"model_path": "nested-stt"}, "tts_config": {"model_path": "nested.onnx"},
    })
    assert isinstance(msg, SwitchModel)
    assert (msg.llm_model_path, msg.stt_model_path, msg.tts_model_path) == ("top.gguf", "top-stt", "top.onnx")


@pytest.mark.parametrize("scope", [None, "global", "GLOBAL"])
def test_switch_model_omitted_or_global_scope_is_none(scope: str | None) -> None:
    obj: dict[str, Any] = {"type": "switch_model", "system_prompt": "p"}
    if scope is not None:
        obj["scope"] = scope
    msg = parse(obj)
    assert isinstance(msg, SwitchModel)
    assert msg.scope is None and msg.system_prompt == "p" and msg.dry_run is False
    assert (msg.llm_model_path, msg.stt_model_path, msg.tts_model_path) == (None, None, None)


def test_switch_model_nested_prompt_wins_over_top_level() -> None:
    msg = parse({"type": "switch_model", "system_prompt": "top", "llm_config": {"system_prompt": "nested"}})
    assert isinstance(msg, SwitchModel) and msg.system_prompt == "nested"


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "switch_model", "scope": "planet"},
        {"type": "switch_model", "scope": 1},
        {"type": "switch_model", "llm_config": "x.gguf"},
        {"type": "switch_model", "stt_config": ["a"]},
        {"type": "switch_model", "llm_model_path": ""},
        {"type": "switch_model", "llm_model_path": "   "},
        {"type": "switch_model", "tts_model_path": 5},
        {"type": "switch_model", "stt_config": {"model_path": False}},
        {"type": "switch_model", "llm_config": {"system_prompt": 5}},
        {"type": "switch_model", "dry_run": "perhaps"},
    ],
)
def test_switch_model_bad_fields_are_invalid_field(obj: dict[str, Any]) -> None:
    err = parse_error(obj)
    assert isinstance(err, InvalidField) and err.code == "invalid_field"


def test_switch_model_prompt_over_limit() -> None:
    err = parse_error({"type": "switch_model", "llm_config": {"system_prompt": "p" * 11}, "request_id": "z"},
                      Limits(max_text_chars=10))
    assert isinstance(err, PayloadTooLarge) and err.code == "payload_too_large" and err.request_id == "z"


# ---------------------------------------------------------------- reload, status, capabilities, barge_in, tool_context


def test_reload_models() -> None:
    assert parse({"type": "reload_models", "request_id": 1, "call_id": "c"}) == Reload(
        what="all", request_id=1, call_id="c")


def test_reload_llm_model_path() -> None:
    assert parse({"type": "reload_llm", "model_path": "llm/x.gguf"}) == Reload(what="llm", model_path="llm/x.gguf")


def test_reload_llm_model_path_alias_and_none() -> None:
    assert parse({"type": "reload_llm", "llm_model_path": "y.gguf"}) == Reload(what="llm", model_path="y.gguf")
    assert parse({"type": "reload_llm"}) == Reload(what="llm", model_path=None)


def test_reload_llm_model_path_must_be_string() -> None:
    assert parse_error({"type": "reload_llm", "model_path": ["a"]}).code == "invalid_field"


def test_status_and_capabilities() -> None:
    assert parse({"type": "status", "request_id": "s", "call_id": "c"}) == Status(request_id="s", call_id="c")
    assert parse({"type": "capabilities", "request_id": 4}) == Capabilities(request_id=4)


def test_barge_in() -> None:
    assert parse({"type": "barge_in", "call_id": "c", "request_id": "b", "reason": "speech"}) == BargeIn(
        call_id="c", request_id="b", reason="speech")
    assert parse_error({"type": "barge_in", "reason": 1}).code == "invalid_field"


def test_tool_context_keeps_tools_names_and_policy() -> None:
    obj = {"type": "tool_context", "call_id": "c", "tools": [{"name": "transfer"}], "extra": {"a": 1},
           "allowed_tools": ["transfer"], "tool_policy": " Strict "}
    msg = parse(obj)
    assert isinstance(msg, ToolContext) and msg.call_id == "c" and msg.tool_policy == "strict"
    assert [t.name for t in msg.tools] == ["transfer"] and msg.allowed_tools == ("transfer",)


def test_every_message_type_is_parsed() -> None:
    minimal: dict[str, dict[str, Any]] = {
        "auth": {"token": "t"}, "audio": {"data": ""}, "llm_request": {"text": "x"}, "tts_request": {"text": "x"},
        "llm_tool_request": {"text": "x"}, "tool_result": {"tool_name": "t"},
    }
    expected: dict[str, type] = {
        "auth": Auth, "set_mode": SetMode, "audio": Audio, "llm_request": LlmRequest, "tts_request": TtsRequest,
        "switch_model": SwitchModel, "reload_models": Reload, "reload_llm": Reload, "status": Status,
        "capabilities": Capabilities, "barge_in": BargeIn, "tool_context": ToolContext,
        "llm_tool_request": P.LlmToolRequest, "tool_result": P.ToolResult, "backends": P.Backends,
        "backend_schema": P.BackendSchema,
    }
    assert set(MESSAGE_TYPES) == set(expected)
    for mtype in MESSAGE_TYPES:
        msg = parse({"type": mtype, **minimal.get(mtype, {}), "call_id": "c"})
        assert type(msg) is expected[mtype]
        assert msg.call_id == "c"


# ---------------------------------------------------------------- type normalisation, ids


@pytest.mark.parametrize(("raw", "expected"), [(" Set-Mode ", "set_mode"), ("LLM-REQUEST", "llm_request"),
                                                ("tts_request", "tts_request"), ("\tBarge-In\n", "barge_in")])
def test_normalize_type(raw: str, expected: str) -> None:
    assert normalize_type(raw) == expected


def test_type_is_normalised_before_dispatch() -> None:
    assert parse({"type": " Set-Mode ", "mode": "llm"}) == SetMode(mode="llm")
    assert isinstance(parse({"type": "LLM-Request", "text": "x"}), LlmRequest)


@pytest.mark.parametrize(("call_id", "expected"), [(42, "42"), (0, "0"), ("abc", "abc")])
def test_numeric_call_id_is_accepted_as_string(call_id: Any, expected: str) -> None:
    msg = parse({"type": "status", "call_id": call_id})
    assert isinstance(msg, Status) and msg.call_id == expected


@pytest.mark.parametrize("call_id", [True, [1], {"a": 1}])
def test_bad_call_id_is_invalid_field(call_id: Any) -> None:
    assert parse_error({"type": "status", "call_id": call_id}).code == "invalid_field"


def test_call_id_length_limit() -> None:
    assert parse_error({"type": "status", "call_id": "c" * 257}).code == "payload_too_large"
    msg = parse({"type": "status", "call_id": "c" * 256})
    assert isinstance(msg, Status) and msg.call_id == "c" * 256


@pytest.mark.parametrize("rid", ["abc", 7, 0, -3, ""])
def test_request_id_string_and_int_kept_with_their_type(rid: str | int) -> None:
    msg = parse({"type": "status", "request_id": rid})
    assert isinstance(msg, Status)
    assert msg.request_id == rid and type(msg.request_id) is type(rid)


@pytest.mark.parametrize("rid", [True, False, {"a": 1}, [1], 1.5])
def test_request_id_of_other_types_rejected(rid: Any) -> None:
    err = parse_error({"type": "status", "request_id": rid})
    assert isinstance(err, InvalidField) and err.code == "invalid_field" and "request_id" in err.message
    assert err.request_id is None


def test_errors_carry_request_id_and_call_id() -> None:
    err = parse_error({"type": "tts_request", "request_id": "r-1", "call_id": "call-1"})
    assert (err.request_id, err.call_id) == ("r-1", "call-1")


@pytest.mark.parametrize("obj", [{"request_id": True}, {"type": "nope", "request_id": False},
                                 {"type": 1, "request_id": {"a": 1}}, {"type": "nope", "request_id": 1.5}])
def test_unusable_request_id_not_echoed_on_type_errors(obj: dict[str, Any]) -> None:
    assert parse_error(obj).request_id is None


@pytest.mark.parametrize("rid", ["r-1", 42])
@pytest.mark.parametrize("obj", [{}, {"type": "nope"}, {"type": "llm_request"}, {"type": "audio", "data": 1},
                                 {"type": "llm_request", "text": "x" * 4001}])
def test_errors_echo_request_id_with_its_type(obj: dict[str, Any], rid: str | int) -> None:
    err = parse_error({**obj, "request_id": rid})
    assert err.request_id == rid and type(err.request_id) is type(rid)
    wire = json.loads(P.dumps(P.error_message(err)))
    assert wire["request_id"] == rid and type(wire["request_id"]) is type(rid)


# ---------------------------------------------------------------- error classes


@pytest.mark.parametrize("text", ["not json", "{", "", "{'type': 'status'}", "[1, 2]", '"status"', "42", "null",
                                  "true", "[" * 100000])
def test_invalid_json(text: str) -> None:
    err = parse_error(text)
    assert isinstance(err, InvalidJson) and err.code == "invalid_json"


def test_unknown_type_keeps_request_id() -> None:
    err = parse_error({"type": "dance", "request_id": 12})
    assert isinstance(err, UnknownType) and err.code == "unknown_type"
    assert err.request_id == 12 and "dance" in err.message


@pytest.mark.parametrize("obj", [{}, {"type": None}, {"type": 5}, {"type": ["status"]}])
def test_missing_or_non_string_type_is_invalid_field(obj: dict[str, Any]) -> None:
    err = parse_error({**obj, "request_id": "r"})
    assert isinstance(err, InvalidField) and err.code == "invalid_field" and err.request_id == "r"


def test_error_class_codes() -> None:
    assert issubclass(InvalidJson, ProtocolError) and issubclass(UnknownType, ProtocolError)
    assert issubclass(InvalidField, ProtocolError) and issubclass(PayloadTooLarge, ProtocolError)
    assert (InvalidJson.code, UnknownType.code, InvalidField.code, PayloadTooLarge.code) == (
        "invalid_json", "unknown_type", "invalid_field", "payload_too_large")


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "auth"},
        {"type": "set_mode", "mode": "x"},
        {"type": "set_mode", "segment_silence_ms": 1},
        {"type": "audio"},
        {"type": "llm_request", "text": "x" * 5000},
        {"type": "llm_request", "text": "x", "context": [{"role": "bot", "content": "x"}]},
        {"type": "switch_model", "scope": "x"},
        {"type": "switch_model", "llm_model_path": ""},
        {"type": "status", "request_id": {}},
        {"type": "status", "call_id": "c" * 300},
        {"type": "nope"},
        {},
    ],
)
def test_error_messages_never_contain_a_slash(obj: dict[str, Any]) -> None:
    assert "/" not in parse_error(obj).message


def test_invalid_json_messages_never_contain_a_slash() -> None:
    assert "/" not in parse_error("/etc/passwd").message
    assert "/" not in parse_error('["/etc/passwd"]').message


def test_unknown_type_message_does_not_echo_a_path() -> None:
    assert "/" not in parse_error({"type": "/etc/passwd"}).message


def test_parse_object_accepts_a_mapping() -> None:
    assert parse_object({"type": "status"}) == Status()


# ---------------------------------------------------------------- property: only ServerError escapes

_KEYS = ["type", "request_id", "call_id", "auth_token", "token", "mode", "segment_energy_threshold",
         "segment_silence_ms", "output_encoding", "encoding", "output_sample_rate_hz", "sample_rate_hz", "data",
         "audio", "rate", "sample_rate", "format", "text", "context", "stream", "scope", "llm_config",
         "stt_config", "tts_config", "llm_model_path", "stt_model_path", "tts_model_path", "system_prompt",
         "dry_run", "model_path", "reason", "role", "content"]


_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.text(max_size=20))
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6),
                                                                inner, max_size=4),
    max_leaves=12,
)
_objects = st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), _json_values, max_size=8)
_typed_objects = st.builds(lambda d, t: {**d, "type": t}, _objects,
                           st.sampled_from(MESSAGE_TYPES) | st.text(max_size=12))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_typed_objects, _objects, _json_values).map(json.dumps) | st.text(max_size=60))
@example('{"type": "set_mode", "segment_silence_ms": "abc"}')
@example('{"type": "llm_request", "text": "x", "context": [{"role": "user", "content": null}]}')
def test_parse_text_only_raises_server_errors(text: str) -> None:
    try:
        msg = parse_text(text)
    except ServerError as err:
        assert err.code in ("invalid_json", "unknown_type", "invalid_field", "payload_too_large")
        if not isinstance(err, UnknownType):
            assert "/" not in err.message
    else:
        assert isinstance(msg, (Auth, SetMode, Audio, LlmRequest, TtsRequest, SwitchModel, Reload, Status,
                                Capabilities, BargeIn, ToolContext, P.LlmToolRequest, P.ToolResult, P.Backends,
                                P.BackendSchema))


# ---------------------------------------------------------------- server message builders


def test_stt_result_final_and_partial() -> None:
    final = P.stt_result("hello", call_id="c", mode="stt", is_final=True, confidence=0.876543, request_id="r")
    assert final == {"type": "stt_result", "text": "hello", "call_id": "c", "mode": "stt", "is_final": True,
                     "is_partial": False, "stt_backend": "faster_whisper", "confidence": 0.8765, "request_id": "r"}
    partial = P.stt_result("he", call_id="c", mode="full", is_final=False)
    assert partial["is_partial"] is True and partial["is_final"] is False
    assert "confidence" not in partial and "request_id" not in partial and "error" not in partial
    assert P.stt_result("", call_id="c", mode="stt", is_final=True, error="no speech")["error"] == "no speech"


def test_tts_audio_header() -> None:
    msg = P.tts_audio(call_id="c", mode="full", encoding="mulaw", sample_rate_hz=8000, byte_length=1600,
                      utterance_id="u1", chunk_index=3, is_final=False, request_id=8)
    assert msg == {"type": "tts_audio", "call_id": "c", "mode": "full", "encoding": "mulaw", "sample_rate_hz": 8000,
                   "byte_length": 1600, "utterance_id": "u1", "chunk_index": 3, "is_final": False, "request_id": 8}
    assert "request_id" not in P.tts_audio(call_id="c", mode="tts", encoding="linear16", sample_rate_hz=16000,
                                           byte_length=0, utterance_id="u", chunk_index=0, is_final=True)


@pytest.mark.parametrize("text", ["  Hello,\n world!  ", "naïve café ☕", ""])
def test_tts_response_base64_and_exact_text(text: str) -> None:
    audio = bytes(range(256)) * 5 + b"\x00"
    msg = P.tts_response(text, audio, call_id="c", encoding="linear16", sample_rate_hz=16000, request_id="t")
    assert msg["type"] == "tts_response" and msg["text"] == text
    assert base64.b64decode(msg["audio_data"], validate=True) == audio
    assert msg["byte_length"] == len(audio) == 1281
    assert (msg["call_id"], msg["encoding"], msg["sample_rate_hz"], msg["request_id"]) == (
        "c", "linear16", 16000, "t")
    assert json.loads(P.dumps(msg))["text"] == text


def test_llm_response_and_token() -> None:
    assert P.llm_response("Hi.", call_id="c", request_id=3) == {
        "type": "llm_response", "text": "Hi.", "call_id": "c", "mode": "llm", "request_id": 3}
    assert "request_id" not in P.llm_response("Hi.", call_id="c")
    assert P.llm_token(" wor", call_id="c", request_id="r") == {
        "type": "llm_token", "call_id": "c", "request_id": "r", "token": " wor", "delta": " wor", "tokens": 1}
    assert P.llm_token(" world and", call_id="c", request_id="r", tokens=3)["tokens"] == 3
    flagged = P.llm_response("Bye.", call_id="c", request_id="t", mode="tool_result",
                             flags={"tool_result_final": True, "tool_gateway_done": True, "tool_path": "none"})
    assert flagged["mode"] == "tool_result" and flagged["tool_result_final"] is True and flagged["request_id"] == "t"


def test_llm_tool_response_names_parameters_and_path() -> None:
    msg = P.llm_tool_response(call_id="c", request_id="g", text="Bye.", tool_path="heuristic",
                              tool_calls=[{"name": "hangup_call", "parameters": {"farewell_message": "Bye."}}])
    assert msg["finish_reason"] == "tool_calls" and msg["protocol_version"] == 2 and "server_gated" not in msg
    gated = P.llm_tool_response(call_id="c", request_id=None, text="", tool_calls=[], tool_path="none",
                                server_gated=True)
    assert gated["finish_reason"] == "stop" and gated["server_gated"] is True and "request_id" not in gated


def test_barge_in_rollback_and_reason_normalised() -> None:
    msg = parse({"type": "barge_in", "rollback_assistant": True, "reason": " Stop_Session "})
    assert isinstance(msg, BargeIn) and msg.rollback_assistant and msg.reason == "stop_session"


def test_llm_request_empty_text_is_parsed_for_tool_continuations() -> None:
    msg = parse({"type": "llm_request", "text": "", "context": {"prior_messages": [
        {"role": "user", "content": "When do you open?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_hours", "arguments": "{}"}}]},
        {"role": "tool", "content": "9 to 5", "tool_call_id": "1"}]}})
    assert isinstance(msg, LlmRequest) and msg.text == ""
    assert msg.context == (("user", "When do you open?"), ("assistant", "(I used the tool get_hours.)"),
                           ("user", "(The tool returned: 9 to 5)"))


def test_tool_result_and_backend_schema() -> None:
    msg = parse({"type": "tool_result", "tool_name": "hangup_call", "result": {"farewell_message": "Bye"},
                 "is_error": False, "request_id": "t", "output_encoding": "mulaw", "output_sample_rate_hz": 8000})
    assert isinstance(msg, P.ToolResult) and msg.tool_name == "hangup_call"
    assert msg.result == {"farewell_message": "Bye"}
    with pytest.raises(PayloadTooLarge):
        parse({"type": "tool_result", "tool_name": "x", "result": "y" * 70000})
    schema = parse({"type": "backend_schema", "backend_type": " STT ", "backend_name": "/etc/passwd"})
    assert isinstance(schema, P.BackendSchema) and schema.backend_type == "stt" and schema.backend_name == "etcpasswd"


def test_mode_ready_keeps_nulls() -> None:
    msg = P.mode_ready(mode="full", call_id="c", segment_energy_threshold=None, segment_silence_ms=None,
                       output_encoding=None, output_sample_rate_hz=None)
    assert msg == {"type": "mode_ready", "mode": "full", "call_id": "c", "segment_energy_threshold": None,
                   "segment_silence_ms": None, "output_encoding": None, "output_sample_rate_hz": None}
    assert json.loads(P.dumps(msg))["segment_silence_ms"] is None
    with_rid = P.mode_ready(mode="stt", call_id="c", segment_energy_threshold=100, segment_silence_ms=500,
                            output_encoding="mulaw", output_sample_rate_hz=8000, request_id="m")
    assert with_rid["request_id"] == "m" and with_rid["segment_silence_ms"] == 500


def test_barge_in_ack() -> None:
    assert P.barge_in_ack(call_id="c", request_id=None) == {
        "type": "barge_in_ack", "status": "ok", "call_id": "c", "request_id": None}


def test_switch_response_session_scope_includes_ids() -> None:
    msg = P.switch_response("success", "prompt set", changed=["system_prompt"], scope="session", call_id="c")
    assert msg == {"type": "switch_response", "status": "success", "message": "prompt set",
                   "changed": ["system_prompt"], "scope": "session", "call_id": "c", "request_id": None}
    assert P.switch_response("success", "ok", changed=[], scope="session", call_id="c", request_id=4)[
        "request_id"] == 4


def test_switch_response_global_scope_omits_absent_ids() -> None:
    msg = P.switch_response("error", "nope", changed=[])
    assert msg == {"type": "switch_response", "status": "error", "message": "nope", "changed": []}
    assert P.switch_response("success", "ok", changed=["llm"], request_id="g")["request_id"] == "g"


def test_error_message() -> None:
    err = InvalidField("llm_request.text is required", request_id="r", call_id="c")
    assert P.error_message(err) == {"type": "error", "code": "invalid_field",
                                    "message": "llm_request.text is required", "request_id": "r", "call_id": "c"}
    assert P.error_message(ServerError("boom")) == {"type": "error", "code": "internal", "message": "boom"}


def test_error_message_from_parser_error() -> None:
    err = parse_error("nope")
    assert P.error_message(err) == {"type": "error", "code": "invalid_json", "message": err.message}


def test_auth_and_reload_responses() -> None:
    assert P.auth_response(True) == {"type": "auth_response", "status": "ok"}
    assert P.auth_response(False, "bad token") == {"type": "auth_response", "status": "error", "message": "bad token"}
    assert P.reload_response("success", "reloaded", request_id=2) == {
        "type": "reload_response", "status": "success", "message": "reloaded", "request_id": 2}


def test_dumps_is_compact_and_unicode() -> None:
    text = P.dumps({"type": "llm_response", "text": "héllo ☕", "n": [1, 2]})
    assert text == '{"type":"llm_response","text":"héllo ☕","n":[1,2]}'
    assert json.loads(text)["text"] == "héllo ☕"
