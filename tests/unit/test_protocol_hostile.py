"""Parse-time validity of client strings and the caps on everything that reaches a model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from local_ai_server import protocol as P
from local_ai_server.errors import InvalidField, PayloadTooLarge
from local_ai_server.protocol import Limits, LlmRequest, SwitchModel, TtsRequest, parse_text

SURROGATE = "\\ud800"  # a JSON escape that json.loads turns into an unencodable lone surrogate


def _frame(obj: dict[str, Any], raw_field: str | None = None) -> str:
    """Serialise obj; `raw_field` gets a lone surrogate spliced in as a JSON escape."""
    text = json.dumps(obj)
    if raw_field is not None:
        text = text.replace(f'"{raw_field}": "X"', f'"{raw_field}": "a{SURROGATE}b"')
    return text


@pytest.mark.parametrize("field,obj", [
    ("request_id", {"type": "status", "request_id": "X"}),
    ("call_id", {"type": "status", "call_id": "X", "request_id": "r"}),
    ("text", {"type": "tts_request", "text": "X", "request_id": "r"}),
    ("text", {"type": "llm_request", "text": "X", "request_id": "r"}),
    ("content", {"type": "llm_request", "text": "hi", "request_id": "r",
                 "context": [{"role": "user", "content": "X"}]}),
    ("model_path", {"type": "reload_llm", "model_path": "X", "request_id": "r"}),
    ("anything", {"type": "tool_context", "anything": {"deep": ["X"]}, "request_id": "r"}),
])
def test_lone_surrogates_anywhere_are_invalid_field_naming_it(field: str, obj: dict[str, Any]) -> None:
    frame = _frame(obj, field if field != "anything" else None)
    if field == "anything":
        frame = frame.replace('["X"]', f'["{SURROGATE}"]')
    with pytest.raises(InvalidField) as err:
        parse_text(frame)
    assert "lone surrogate" in err.value.message
    expected = obj["type"] + "." if field != "request_id" else ""
    assert err.value.message.startswith(expected)
    # An id that cannot be encoded is never echoed; a good one always is.
    assert err.value.request_id == (None if field == "request_id" else "r")
    json.dumps(P.error_message(err.value), ensure_ascii=False).encode("utf-8")  # the reply encodes


def test_a_surrogate_pair_is_a_valid_character() -> None:
    msg = parse_text('{"type": "tts_request", "text": "smile \\ud83d\\ude00", "request_id": "r"}')
    assert isinstance(msg, TtsRequest) and msg.text == "smile \U0001F600"


@pytest.mark.parametrize("key", ["call_id", "mode", "output_encoding"])
def test_control_characters_in_identifiers_are_refused(key: str) -> None:
    with pytest.raises(InvalidField) as err:
        P.parse_object({"type": "set_mode", key: "a\x00b", "request_id": 7})
    assert key in err.value.message and err.value.request_id == 7


def test_control_characters_in_free_text_become_spaces() -> None:
    msg = P.parse_object({"type": "tts_request", "text": "Hello\x00world\x07 again\nnext"})
    assert isinstance(msg, TtsRequest) and msg.text == "Hello world  again\nnext"
    msg2 = P.parse_object({"type": "llm_request", "text": "hi", "context": [{"role": "user", "content": "a\x00"}]})
    assert isinstance(msg2, LlmRequest) and msg2.context == (("user", "a "),)


@pytest.mark.parametrize("path,why", [
    ("models/a\x00b.gguf", "control characters"),
    ("models/" + "a" * 256 + ".gguf", "longer than 255 bytes"),
    ("~unknownuser/model.gguf", "another user's home"),
    ("", "non-empty"),
])
def test_paths_the_os_would_refuse_are_refused_at_parse_time(path: str, why: str) -> None:
    for obj in ({"type": "reload_llm", "model_path": path, "request_id": "r"},
                {"type": "switch_model", "llm_model_path": path, "request_id": "r"},
                {"type": "switch_model", "llm_config": {"model_path": path}, "request_id": "r"}):
        with pytest.raises(InvalidField) as err:
            P.parse_object(obj)
        assert why in err.value.message and err.value.request_id == "r"


def test_a_home_relative_path_of_ones_own_is_fine() -> None:
    msg = P.parse_object({"type": "switch_model", "llm_model_path": "~/models/x.gguf"})
    assert isinstance(msg, SwitchModel) and msg.llm_model_path == "~/models/x.gguf"


def test_request_ids_are_capped_and_never_echoed_when_too_long() -> None:
    with pytest.raises(InvalidField) as err:
        P.parse_object({"type": "status", "request_id": "r" * 257})
    assert err.value.request_id is None
    with pytest.raises(InvalidField) as err2:
        P.parse_object({"type": "status", "request_id": 2**70})
    assert err2.value.request_id is None


def test_context_caps_each_message_and_the_total() -> None:
    limits = Limits(max_text_chars=100, max_context_items=5, max_context_chars=300)
    big_system = {"type": "llm_request", "text": "hi", "request_id": "r",
                  "context": [{"role": "system", "content": "s" * 101}]}
    with pytest.raises(PayloadTooLarge) as err:
        P.parse_object(big_system, limits)
    assert "system message longer than 100" in err.value.message and err.value.request_id == "r"
    too_many = {"type": "llm_request", "text": "hi", "context": [{"role": "user", "content": "a"}] * 6}
    with pytest.raises(PayloadTooLarge):
        P.parse_object(too_many, limits)
    too_long = {"type": "llm_request", "text": "hi", "context": [{"role": "user", "content": "a" * 90}] * 4}
    with pytest.raises(PayloadTooLarge):
        P.parse_object(too_long, limits)
    # AVA's object form is capped the same way (it reaches the model too).
    ava = {"type": "llm_request", "text": "hi", "context": {"messages": [{"role": "system", "content": "s" * 101}]}}
    with pytest.raises(PayloadTooLarge):
        P.parse_object(ava, limits)


def test_default_caps_refuse_a_megabyte_system_item() -> None:
    obj = {"type": "llm_request", "text": "hi", "context": [{"role": "system", "content": "x" * 1_000_000}]}
    with pytest.raises(PayloadTooLarge):
        P.parse_object(obj)
