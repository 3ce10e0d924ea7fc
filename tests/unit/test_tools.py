"""Tests for local_ai_server.tools: declarations, calls in text, end of call, decisions and their grammar."""

from __future__ import annotations

import json
from typing import Any

import llama_cpp
import pytest

from local_ai_server.tools import (
    MAX_DESCRIPTION_CHARS,
    MAX_SCAN_CHARS,
    MAX_TOOL_SCHEMA_BYTES,
    MAX_TOOLS,
    POLICIES,
    Tool,
    ToolCall,
    ToolError,
    allowed,
    decision_prompt,
    decision_schema,
    end_of_call_intent,
    farewell_from_result,
    first_sentence,
    normalize_policy,
    parse_decision,
    parse_names,
    parse_tool_calls,
    parse_tools,
    tool_result_prompt,
)

DEFAULT = "Thank you for calling. Goodbye."
EMPTY: dict[str, Any] = {"type": "object", "properties": {}}

HANGUP: dict[str, Any] = {"name": "hangup_call", "description": "End the call with a farewell.",
          "parameters": {"type": "object", "properties": {"farewell_message": {"type": "string"}},
                         "required": ["farewell_message"]}}
TRANSFER: dict[str, Any] = {"name": "transfer_call", "description": "Transfer the caller to a department.",
            "parameters": {"type": "object",
                           "properties": {"destination": {"type": "string", "enum": ["sales", "support"]}},
                           "required": ["destination"]}}
NESTED: dict[str, Any] = {"name": "book.appointment-v2", "description": "Book an appointment.",
          "parameters": {"type": "object",
                         "properties": {
                             "patient": {"type": "object", "properties": {"first": {"type": "string"},
                                                                          "last": {"type": "string"}}},
                             "slots": {"type": "array", "items": {"type": "integer"}},
                             "urgent": {"type": "boolean"},
                             "party_size": {"type": "integer", "minimum": 1},
                             "deposit": {"type": ["number", "null"]},
                             "anything": {},
                             "mixed_enum": {"enum": ["a", 1]},
                         },
                         "required": ["patient", "urgent", "missing"]}}
NO_PARAMS: dict[str, Any] = {"name": "check_hours"}


def tools_of(*specs: dict[str, Any]) -> tuple[Tool, ...]:
    """Tools parsed from declarations, as the protocol parser makes them."""
    return parse_tools(list(specs))


def many_tools(count: int) -> list[dict[str, Any]]:
    """`count` distinct declarations with a few arguments each."""
    return [{"name": f"tool_{i}", "description": f"Tool number {i}.",
             "parameters": {"type": "object",
                            "properties": {"text": {"type": "string"}, "n": {"type": "integer"},
                                           "mode": {"type": "string", "enum": ["x", "y"]}},
                            "required": ["text"]}} for i in range(count)]


def tool_error(raw: Any, field: str = "tools") -> ToolError:
    """The ToolError parse_tools raises for `raw`."""
    with pytest.raises(ToolError) as info:
        parse_tools(raw, field)
    return info.value


def names_error(raw: Any, field: str = "allowed_tools") -> ToolError:
    """The ToolError parse_names raises for `raw`."""
    with pytest.raises(ToolError) as info:
        parse_names(raw, field)
    return info.value


# ------------------------------------------------------------------------------------------------- parse_tools


def test_parse_tools_none_is_no_tools() -> None:
    assert parse_tools(None) == ()
    assert parse_tools([]) == ()


def test_parse_tools_plain_form() -> None:
    [tool] = parse_tools([HANGUP])
    assert tool == Tool("hangup_call", "End the call with a farewell.", HANGUP["parameters"])


def test_parse_tools_openai_form() -> None:
    [tool] = parse_tools([{"type": "function", "function": TRANSFER}])
    assert tool.name == "transfer_call"
    assert tool.description == "Transfer the caller to a department."
    assert tool.parameters == TRANSFER["parameters"]


def test_parse_tools_mixed_forms_keep_order() -> None:
    tools = parse_tools([{"type": "function", "function": HANGUP}, TRANSFER, NO_PARAMS])
    assert [t.name for t in tools] == ["hangup_call", "transfer_call", "check_hours"]


@pytest.mark.parametrize("spec", [{"name": "x"}, {"name": "x", "description": None, "parameters": None}])
def test_parse_tools_defaults(spec: dict[str, Any]) -> None:
    [tool] = parse_tools([spec])
    assert tool.description == ""
    assert tool.parameters == EMPTY


def test_parse_tools_duplicates_keep_the_first() -> None:
    first = {"name": "Lookup", "description": "first"}
    tools = parse_tools([first, {"name": "lookup", "description": "second"}, {"name": "Lookup"}, {"name": "other"}])
    assert [(t.name, t.description) for t in tools] == [("Lookup", "first"), ("other", "")]


def test_parse_tools_copies_the_schema() -> None:
    spec = json.loads(json.dumps(HANGUP))
    [tool] = parse_tools([spec])
    spec["parameters"]["properties"]["farewell_message"]["type"] = "integer"
    assert tool.parameters["properties"]["farewell_message"]["type"] == "string"


@pytest.mark.parametrize("name", ["a", "_", "hangup_call", "a.b-c_D9", "x" * 64, "_private"])
def test_parse_tools_valid_names(name: str) -> None:
    assert parse_tools([{"name": name}])[0].name == name


@pytest.mark.parametrize("name", [None, "", "1abc", "-x", ".x", "a b", "x" * 65, "naïve", "a/b", 7, ["x"], "a\n"])
def test_parse_tools_invalid_names(name: Any) -> None:
    err = tool_error([{"name": "ok"}, {"name": "ok2"}, {"name": name}])
    assert str(err).startswith("tools[2].name must be ")
    assert err.too_large is False


def test_parse_tools_missing_name() -> None:
    err = tool_error([{"description": "no name"}])
    assert str(err).startswith("tools[0].name must be")
    assert not err.too_large


def test_parse_tools_openai_errors_name_the_inner_field() -> None:
    err = tool_error([{"type": "function", "function": {"name": "bad name"}}], "tool_context.tools")
    assert str(err).startswith("tool_context.tools[0].function.name must be")


@pytest.mark.parametrize("raw", [{"name": "x"}, "hangup_call", 5, True])
def test_parse_tools_not_a_list(raw: Any) -> None:
    err = tool_error(raw, "llm_tool_request.tools")
    assert str(err) == "llm_tool_request.tools must be a list"
    assert not err.too_large


@pytest.mark.parametrize("item", [None, 3, ["x"]])
def test_parse_tools_item_not_an_object(item: Any) -> None:
    err = tool_error([{"name": "x"}, item])
    assert str(err) == "tools[1] must be an object or a tool name"
    assert not err.too_large


def test_parse_tools_takes_a_bare_name_as_a_tool_without_arguments() -> None:
    (tool,) = parse_tools(["hangup_call"])
    assert tool.name == "hangup_call" and tool.description == ""
    assert tool.parameters == {"type": "object", "properties": {}}
    assert "must be" in str(tool_error(["not a name!"]))


def test_parse_tools_count_cap() -> None:
    assert len(parse_tools(many_tools(MAX_TOOLS))) == MAX_TOOLS
    err = tool_error(many_tools(MAX_TOOLS + 1))
    assert err.too_large is True
    assert "tools" in str(err) and str(MAX_TOOLS) in str(err)


@pytest.mark.parametrize("description", [5, ["a"], {"a": 1}])
def test_parse_tools_description_not_a_string(description: Any) -> None:
    err = tool_error([{"name": "x", "description": description}])
    assert str(err) == "tools[0].description must be a string"
    assert not err.too_large


def test_parse_tools_description_cap_is_an_error_not_a_truncation() -> None:
    [tool] = parse_tools([{"name": "x", "description": "d" * MAX_DESCRIPTION_CHARS}])
    assert len(tool.description) == MAX_DESCRIPTION_CHARS
    err = tool_error([{"name": "x", "description": "d" * (MAX_DESCRIPTION_CHARS + 1)}])
    assert err.too_large is True
    assert str(err).startswith("tools[0].description")


@pytest.mark.parametrize("parameters", [[], "object", 3, True])
def test_parse_tools_parameters_not_an_object(parameters: Any) -> None:
    err = tool_error([{"name": "x", "parameters": parameters}])
    assert str(err).startswith("tools[0].parameters must be an object")
    assert not err.too_large


@pytest.mark.parametrize("parameters", [{"type": {1, 2}}, {"minimum": float("nan")}, {"default": object()}])
def test_parse_tools_parameters_not_json(parameters: dict[str, Any]) -> None:
    err = tool_error([{"name": "x", "parameters": parameters}])
    assert str(err) == "tools[0].parameters must be JSON"
    assert not err.too_large


def test_parse_tools_schema_size_cap() -> None:
    small = {"type": "object", "description": "d" * (MAX_TOOL_SCHEMA_BYTES - 200)}
    assert parse_tools([{"name": "x", "parameters": small}])[0].parameters == small
    big = {"type": "object", "description": "d" * (MAX_TOOL_SCHEMA_BYTES + 1)}
    err = tool_error([{"name": "x"}, {"name": "y", "parameters": big}])
    assert err.too_large is True
    assert str(err).startswith("tools[1].parameters")


def test_parse_tools_schema_size_counts_bytes() -> None:
    # 5000 characters, but 10000 bytes as UTF-8: over the cap.
    err = tool_error([{"name": "x", "parameters": {"description": "é" * 5000}}])
    assert err.too_large is True


def test_parse_tools_total_size_cap() -> None:
    def tool(i: int, size: int) -> dict[str, Any]:
        return {"name": f"t{i}", "description": "d" * 900, "parameters": {"description": "p" * size}}

    assert len(parse_tools([tool(i, 0) for i in range(MAX_TOOLS)])) == MAX_TOOLS  # ~31 KB
    err = tool_error([tool(i, 2000) for i in range(MAX_TOOLS)])  # each fine alone, ~96 KB in all
    assert err.too_large is True
    assert str(err).startswith("tools is over")


def test_tool_error_is_a_value_error() -> None:
    err = ToolError("x")
    assert isinstance(err, ValueError) and err.too_large is False
    assert ToolError("y", too_large=True).too_large is True


# ------------------------------------------------------------------------------------------------- parse_names


def test_parse_names() -> None:
    assert parse_names(None) == ()
    assert parse_names([]) == ()
    assert parse_names(["hangup_call", "Transfer_Call", "HANGUP_CALL", "transfer_call", "x"]) == (
        "hangup_call", "Transfer_Call", "x")


@pytest.mark.parametrize("raw", ["hangup_call", {"a": 1}, 3])
def test_parse_names_not_a_list(raw: Any) -> None:
    err = names_error(raw, "tool_context.allowed_tools")
    assert str(err) == "tool_context.allowed_tools must be a list"
    assert not err.too_large


@pytest.mark.parametrize("bad", [None, 3, "", "a b", "9x", "x" * 65, {"name": "x"}])
def test_parse_names_invalid_entries(bad: Any) -> None:
    err = names_error(["ok", bad])
    assert str(err).startswith("allowed_tools[1] must be ")
    assert not err.too_large


def test_parse_names_count_cap() -> None:
    names = [f"n{i}" for i in range(MAX_TOOLS)]
    assert parse_names(names) == tuple(names)
    err = names_error([*names, "one_more"])
    assert err.too_large is True


# ------------------------------------------------------------------------------------------------- policy, allowed


@pytest.mark.parametrize("policy", POLICIES)
def test_normalize_policy_known(policy: str) -> None:
    assert normalize_policy(policy) == policy
    assert normalize_policy(f"  {policy.upper()}\n") == policy


@pytest.mark.parametrize("raw", [None, "", "always", 1, ["strict"], "str ict"])
def test_normalize_policy_unknown_is_auto(raw: Any) -> None:
    assert normalize_policy(raw) == "auto"


def test_allowed() -> None:
    tools = tools_of(HANGUP, TRANSFER, NO_PARAMS)
    assert allowed(tools, []) == tools
    assert allowed(tools, ()) == tools
    assert [t.name for t in allowed(tools, ["CHECK_HOURS", "hangup_call"])] == ["hangup_call", "check_hours"]
    assert allowed(tools, ["unknown"]) == ()
    assert allowed((), ["hangup_call"]) == ()


def test_tool_call_wire() -> None:
    call = ToolCall("hangup_call", {"farewell_message": "Bye"})
    wire = call.wire()
    assert wire == {"name": "hangup_call", "parameters": {"farewell_message": "Bye"}}
    wire["parameters"]["x"] = 1
    assert call.parameters == {"farewell_message": "Bye"}  # the wire form is a copy
    assert json.loads(json.dumps(wire)) == {"name": "hangup_call", "parameters": {"farewell_message": "Bye", "x": 1}}


# ------------------------------------------------------------------------------------------------- parse_tool_calls

NAMES = ["hangup_call", "transfer_call", "Check_Hours"]


def wires(text: str, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The calls parse_tool_calls finds, in wire form."""
    return [c.wire() for c in parse_tool_calls(text, NAMES if names is None else names)]


def hangup(farewell: str = "Bye") -> dict[str, Any]:
    """hangup_call's wire form with a farewell."""
    return {"name": "hangup_call", "parameters": {"farewell_message": farewell}}


@pytest.mark.parametrize("text", [
    'Goodbye! <tool_call>{"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}</tool_call>',
    '<tool_call>\n{"name": "hangup_call", "parameters": {"farewell_message": "Bye"}}\n</tool_call>',
    '<hangup_call>{"farewell_message": "Bye"}</hangup_call>',
    '<function=hangup_call>{"farewell_message": "Bye"}</function>',
    '*hangup_call* {"farewell_message": "Bye"}',
    '**hangup_call** {"farewell_message": "Bye"}',
    'Sure. hangup_call {"farewell_message": "Bye"}',
    'hangup_call: {"farewell_message": "Bye"}',
    'hangup_call({"farewell_message": "Bye"})',
    '`hangup_call` {"farewell_message": "Bye"}',
    '{"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}',
    '{"name": "HANGUP_CALL", "arguments": "{\\"farewell_message\\": \\"Bye\\"}"}',
    '{"type": "function", "function": {"name": "hangup_call", "arguments": "{\\"farewell_message\\": \\"Bye\\"}"}}',
    '{"function": {"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}}',
    '{"tool_call": {"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}}',
    '{"hangup_call": {"farewell_message": "Bye"}}',
    '[TOOL_CALLS] [{"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}]',
    'OK, ending now.\n```json\n{"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}\n```',
    '<hangup_call>{"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}</hangup_call>',
])
def test_parse_tool_calls_formats(text: str) -> None:
    assert wires(text) == [hangup()]


def test_parse_tool_calls_returns_the_declared_spelling() -> None:
    assert wires('{"name": "check_hours", "arguments": {}}') == [{"name": "Check_Hours", "parameters": {}}]
    assert wires("<CHECK_HOURS>{}</CHECK_HOURS>") == [{"name": "Check_Hours", "parameters": {}}]
    assert wires('{"name": "Hangup_Call"}', ["HANGUP_CALL", "hangup_call"]) == [
        {"name": "HANGUP_CALL", "parameters": {}}]


def test_parse_tool_calls_only_allowed_names() -> None:
    text = '{"name": "delete_everything", "arguments": {}} <format_disk>{"x": 1}</format_disk> *rm* {"a": 1}'
    assert wires(text) == []
    assert wires('{"name": "transfer_call", "arguments": {"destination": "sales"}}', ["hangup_call"]) == []
    assert wires('{"name": "hangup_call", "arguments": {}}', []) == []


def test_parse_tool_calls_a_list_and_order() -> None:
    text = ('[{"name": "transfer_call", "arguments": {"destination": "sales"}}, '
            '{"name": "hangup_call", "parameters": {"farewell_message": "Bye"}}]')
    assert wires(text) == [{"name": "transfer_call", "parameters": {"destination": "sales"}}, hangup()]


def test_parse_tool_calls_openai_message_with_tool_calls() -> None:
    text = json.dumps({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "transfer_call", "arguments": json.dumps({"destination": "support"})}},
        {"id": "call_2", "type": "function", "function": {"name": "hangup_call", "arguments": "{}"}}]})
    assert wires(text) == [{"name": "transfer_call", "parameters": {"destination": "support"}},
                           {"name": "hangup_call", "parameters": {}}]


def test_parse_tool_calls_same_call_twice_is_one_call() -> None:
    call = '{"name": "hangup_call", "arguments": {"farewell_message": "Bye"}}'
    assert wires(f"<tool_call>{call}</tool_call> and again {call}") == [hangup()]
    assert wires(f'{call} {{"name": "hangup_call", "arguments": {{"farewell_message": "Later"}}}}') == [
        hangup(), hangup("Later")]


@pytest.mark.parametrize("arguments", ['"not json"', '"[1, 2]"', "[1, 2]", "7", "null", '"{broken"', "true"])
def test_parse_tool_calls_non_object_arguments_are_empty(arguments: str) -> None:
    assert wires(f'{{"name": "hangup_call", "arguments": {arguments}}}') == [{"name": "hangup_call",
                                                                                 "parameters": {}}]


def test_parse_tool_calls_arguments_are_not_scanned_again() -> None:
    # A call's arguments may hold an object that looks like a call: it is an argument, not a second call.
    text = '{"name": "transfer_call", "arguments": {"note": {"name": "hangup_call", "arguments": {}}}}'
    assert wires(text) == [{"name": "transfer_call",
                            "parameters": {"note": {"name": "hangup_call", "arguments": {}}}}]


@pytest.mark.parametrize("text", [
    "",
    "Goodbye, have a nice day!",
    "I will now use hangup_call to end the call.",
    "hangup_call",
    "<hangup_call></hangup_call>",
    '{"name": "hangup_call", "description": "End the call.", "parameters": {"type": "object"}}',  # a declaration
    '{"answer": "I can call hangup_call {\\"farewell_message\\": \\"x\\"} for you"}',
    '{"name": "hangup_call", "arguments": {"farewell_message": NaN}}',
    '{"name": "hangup_call", "arguments": {"a": Infinity}}',
    "{'name': 'hangup_call', 'arguments': {}}",  # Python, not JSON
    '{"name": "hangup_call", "arguments": {',
    "{" * 500 + "}" * 500,
    '{"name": 5, "arguments": {}}',
    '{"name": ["hangup_call"]}',
    '{"x": 1, "hangup_call": {"farewell_message": "not a call: one key of many"}}',
    '{"hangup_call": 5}',
    "\x00\ufffd{\ud800}",
])
def test_parse_tool_calls_garbage_finds_nothing(text: str) -> None:
    assert wires(text) == []


@pytest.mark.parametrize("text", [None, 5, b'{"name": "hangup_call"}', ["x"]])
def test_parse_tool_calls_not_text(text: Any) -> None:
    assert parse_tool_calls(text, NAMES) == []


def test_parse_tool_calls_scans_only_the_first_20000_characters() -> None:
    call = '{"name": "hangup_call", "arguments": {}}'
    assert wires(" " * (20000 - len(call)) + call) == [{"name": "hangup_call", "parameters": {}}]
    assert wires(" " * (20000 - len(call) + 1) + call) == []


@pytest.mark.parametrize("text", [
    "{" * 20000,
    "[{" * 10000,
    '{"a":' * 4000,
    '{"name":"x","a":' * 1250,
    '{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":' * 600,
    "hangup_call " * 1700 + "{",
    "<hangup_call>" * 1500 + "{",
    '{"a": "' + "\\" * 19990,
    "*" * 19990 + "{}",
    " " * 19990 + "x{}",
])
# A hang guard, not a speed claim: a regex that backtracks on these takes minutes, a bounded scan milliseconds.
@pytest.mark.timeout(30)
def test_parse_tool_calls_hostile_text_is_bounded(text: str) -> None:
    assert wires(text * 3) == []  # over MAX_SCAN_CHARS characters: the rest is never looked at


def test_parse_tool_calls_looks_no_further_than_the_scan_limit() -> None:
    call = '{"name": "hangup_call", "arguments": {}}'
    assert len(wires(" " * (MAX_SCAN_CHARS - len(call)) + call)) == 1  # ends at the limit: found
    assert wires(" " * (MAX_SCAN_CHARS + 1) + call) == []  # starts past it: never seen


def test_parse_tool_calls_many_calls_are_capped() -> None:
    text = " ".join(f'{{"name": "hangup_call", "arguments": {{"n": {i}}}}}' for i in range(100))
    calls = parse_tool_calls(text, NAMES)
    assert len(calls) == MAX_TOOLS
    assert calls[0].parameters == {"n": 0}


# ------------------------------------------------------------------------------------------------- end of call


@pytest.mark.parametrize("text", [
    "thank you", "Thank you!", "Thanks.", "no thanks", "No, thank you.", "That's all.", "thats all", "that is all",
    "Nothing else, really.", "end call", "Please end the call.", "hang up", "You can hang up now.", "hangup",
    "Goodbye", "good bye", "Bye!", "bye-bye", "OK bye", "Have a good day.", "have a great day", "Take care.",
    "Talk to you later!", "no transcript",
    "Thanks, I would like nothing else.", "I can't hear you, goodbye.", "Don't worry about it. Goodbye!",
    "How do I hang up?", "Can you hang up for me?", "THANKS A LOT", "Okay, that\u2019s all.",
    "I don't need anything else, thanks.", "I said hi. Bye.",
])
def test_end_of_call_intent_terminal(text: str) -> None:
    assert end_of_call_intent(text) is True


@pytest.mark.parametrize("text", [
    "", "   ", "Hello, I need help with my order.", "What are your opening hours?", "say goodbye", "not goodbye",
    "don't hang up", "Don't hang up!", "do not hang up", "Please don\u2019t hang up on me.", "never hang up",
    "I do not want to end the call", "how do I say bye", "How do you say thank you in French?",
    "what does 'bye' mean?", 'He said "goodbye" and left', "Thanksgiving is coming", "byebye", "goodbyes",
    "My name is Thankyou", "I'm calling about the hangupcall feature", "the word bye", "no transcripts here",
    "I can't thank you enough for the help", "thank yourself",
])
def test_end_of_call_intent_not_terminal(text: str) -> None:
    assert end_of_call_intent(text) is False


@pytest.mark.parametrize("text", [None, 5, ["bye"]])
def test_end_of_call_intent_not_text(text: Any) -> None:
    assert end_of_call_intent(text) is False


@pytest.mark.timeout(30)  # a hang guard, as above
def test_end_of_call_intent_hostile_text_is_bounded() -> None:
    assert end_of_call_intent("say bye " * 10000) is False
    assert end_of_call_intent("don't hang up " * 5000) is False
    # Only the first MAX_SCAN_CHARS characters count: a goodbye after them is not heard.
    assert end_of_call_intent("a" * (MAX_SCAN_CHARS + 10) + " goodbye") is False


# ------------------------------------------------------------------------------------------------- farewells


@pytest.mark.parametrize(("text", "expected"), [
    ("Goodbye! See you soon.", "Goodbye!"),
    ("Thanks for calling. Bye", "Thanks for calling."),
    ("Is that all? Bye.", "Is that all?"),
    ("It costs 3.50 dollars. Anything else?", "It costs 3.50 dollars."),
    ("Have a nice day", "Have a nice day"),
    ("  Hello\n   world.  Next one.", "Hello world."),
    ("... Bye now. Really.", "Bye now."),
    ("Wait!!! OK.", "Wait!!!"),
    ("42.", "42."),
])
def test_first_sentence(text: str, expected: str) -> None:
    assert first_sentence(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "...", "?! -- ***", "__", "\n\n"])
def test_first_sentence_nothing_speakable(text: str) -> None:
    assert first_sentence(text) == DEFAULT
    assert first_sentence(text, default="See you.") == "See you."


def test_first_sentence_long_text_is_capped() -> None:
    assert len(first_sentence("word " * 1000)) <= 500
    assert first_sentence("word " * 1000).startswith("word word")


@pytest.mark.parametrize(("result", "expected"), [
    ({"farewell_message": "Bye for now!"}, "Bye for now!"),
    ({"farewell_message": "  Bye \n\t for   now! ", "message": "ignored"}, "Bye for now!"),
    ({"message": "Call ended. Goodbye."}, "Call ended. Goodbye."),
    ({"farewell_message": "   ", "message": "Later."}, "Later."),
    ({"farewell_message": 5, "message": "Later."}, "Later."),
    ({"farewell_message": "", "message": ""}, DEFAULT),
    ({"status": "ok"}, DEFAULT),
    ({"message": ["a"]}, DEFAULT),
    ({}, DEFAULT),
    (None, DEFAULT),
    ("Goodbye.", DEFAULT),
    ([{"message": "x"}], DEFAULT),
])
def test_farewell_from_result(result: Any, expected: str) -> None:
    assert farewell_from_result(result) == expected


def test_farewell_from_result_is_capped() -> None:
    farewell = farewell_from_result({"farewell_message": "bye " * 400})
    assert len(farewell) == 499  # 500 characters, less the trailing space
    assert farewell.startswith("bye bye")


# ------------------------------------------------------------------------------------------------- decision schema


def arguments_schema(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """The `arguments` schema of one tool in a decision schema."""
    for option in schema["anyOf"][0]["properties"]["tool_call"]["anyOf"]:
        if option["properties"]["name"] == {"const": name}:
            result: dict[str, Any] = option["properties"]["arguments"]
            return result
    raise AssertionError(f"{name} not in the schema")


def test_decision_schema_shape() -> None:
    schema = decision_schema(tools_of(HANGUP))
    assert schema == {"anyOf": [
        {"type": "object",
         "properties": {"tool_call": {"anyOf": [
             {"type": "object",
              "properties": {"name": {"const": "hangup_call"},
                             "arguments": {"type": "object", "properties": {"farewell_message": {"type": "string"}},
                                           "required": ["farewell_message"], "additionalProperties": False}},
              "required": ["name", "arguments"]}]}},
         "required": ["tool_call"]},
        {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 400}}, "required": ["answer"]},
    ]}


def test_decision_schema_keeps_string_enums() -> None:
    args = arguments_schema(decision_schema(tools_of(HANGUP, TRANSFER)), "transfer_call")
    assert args["properties"] == {"destination": {"type": "string", "enum": ["sales", "support"]}}
    assert args["required"] == ["destination"]


def test_decision_schema_simplifies_nested_parameters() -> None:
    args = arguments_schema(decision_schema(tools_of(NESTED)), "book.appointment-v2")
    assert args["properties"] == {
        "patient": {"type": "string"}, "slots": {"type": "string"}, "urgent": {"type": "boolean"},
        "party_size": {"type": "integer"}, "deposit": {"type": "number"}, "anything": {"type": "string"},
        "mixed_enum": {"type": "string"},
    }
    assert args["required"] == ["patient", "urgent"]  # "missing" is not a property
    assert args["additionalProperties"] is False


def test_decision_schema_no_parameters() -> None:
    args = arguments_schema(decision_schema(tools_of(NO_PARAMS)), "check_hours")
    assert args == {"type": "object", "properties": {}, "additionalProperties": False}
    odd = tools_of({"name": "odd", "parameters": {"type": "object", "properties": ["x"], "required": "x"}})
    assert arguments_schema(decision_schema(odd), "odd") == args


def test_decision_schema_caps_properties_at_12() -> None:
    props = {f"p{i}": {"type": "string"} for i in range(20)}
    tools = tools_of({"name": "wide", "parameters": {"type": "object", "properties": props,
                                                      "required": ["p0", "p11", "p12", "p19"]}})
    args = arguments_schema(decision_schema(tools), "wide")
    assert list(args["properties"]) == [f"p{i}" for i in range(12)]
    assert args["required"] == ["p0", "p11"]


def test_decision_schema_every_tool_is_an_alternative() -> None:
    schema = decision_schema(parse_tools(many_tools(MAX_TOOLS)))
    options = schema["anyOf"][0]["properties"]["tool_call"]["anyOf"]
    assert [o["properties"]["name"]["const"] for o in options] == [f"tool_{i}" for i in range(MAX_TOOLS)]


def test_decision_schema_without_tools_is_only_an_answer() -> None:
    schema = decision_schema(())
    assert schema == {"anyOf": [{"type": "object", "properties": {"answer": {"type": "string", "maxLength": 400}},
                                 "required": ["answer"]}]}


TOOL_SETS: dict[str, list[dict[str, Any]]] = {
    "hangup": [HANGUP],
    "transfer_enum": [TRANSFER],
    "nested": [NESTED],
    "no_parameters": [NO_PARAMS],
    "mixed": [HANGUP, TRANSFER, NESTED, NO_PARAMS],
    "odd_property_names": [{"name": "odd", "parameters": {"type": "object", "properties": {
        "with space": {"type": "string"}, "quote\"d": {"type": "integer"}, "ünï": {"type": "boolean"},
        "a-b": {"type": "string"}, "a b": {"type": "string"}, "": {"type": "number"}}}}],
    "enum_with_quotes": [{"name": "pick", "parameters": {"type": "object", "properties": {
        "choice": {"type": "string", "enum": ['say "hi"', "back\\slash", "new\nline", "a", "a"]}}}}],
    "32_tools": many_tools(MAX_TOOLS),
}


@pytest.mark.parametrize("specs", list(TOOL_SETS.values()), ids=list(TOOL_SETS))
def test_decision_schema_compiles_to_a_llama_cpp_grammar(specs: list[dict[str, Any]]) -> None:
    schema = decision_schema(parse_tools(specs))
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    assert grammar is not None
    required = {"anyOf": schema["anyOf"][:1]}  # tool_choice "required", as toolgate narrows it
    assert llama_cpp.LlamaGrammar.from_json_schema(json.dumps(required), verbose=False) is not None


def test_decision_schema_without_tools_compiles() -> None:
    assert llama_cpp.LlamaGrammar.from_json_schema(json.dumps(decision_schema(())), verbose=False) is not None


# ------------------------------------------------------------------------------------------------- decision prompt


def test_decision_prompt_lists_tools_and_the_reply_format() -> None:
    prompt = decision_prompt(tools_of(HANGUP, TRANSFER, NESTED, NO_PARAMS))
    lines = prompt.splitlines()
    assert "- hangup_call: End the call with a farewell. Arguments: farewell_message (string, required)." in lines
    assert ('- transfer_call: Transfer the caller to a department. Arguments: destination (one of "sales", '
            '"support", required).') in lines
    assert "- check_hours: no description. Arguments: none." in lines
    nested = next(line for line in lines if line.startswith("- book.appointment-v2:"))
    for part in ("patient (string, required)", "urgent (boolean, required)", "party_size (integer)",
                 "deposit (number)"):
        assert part in nested
    assert "JSON only" in prompt
    assert '{"tool_call": {"name": "<tool name>", "arguments": {...}}}' in prompt
    assert '{"answer": "<what to say>"}' in prompt


def test_decision_prompt_is_short_for_long_descriptions() -> None:
    specs = [{"name": f"t{i}", "description": "very long words " * 30} for i in range(MAX_TOOLS)]
    prompt = decision_prompt(parse_tools(specs))
    assert len(prompt) < MAX_TOOLS * 250
    assert "\n\n" not in prompt


def test_decision_prompt_long_enums_are_cut() -> None:
    tools = tools_of({"name": "pick", "parameters": {"type": "object", "properties": {
        "v": {"type": "string", "enum": [f"v{i}" for i in range(50)]}}}})
    prompt = decision_prompt(tools)
    assert '"v7", ...' in prompt and '"v8"' not in prompt


# ------------------------------------------------------------------------------------------------- parse_decision


def test_parse_decision_tool_call() -> None:
    tools = tools_of(HANGUP, TRANSFER)
    text = '{ "tool_call": { "name": "transfer_call", "arguments": { "destination": "sales" } } }'
    assert parse_decision(text, tools) == ToolCall("transfer_call", {"destination": "sales"})


def test_parse_decision_name_is_matched_case_insensitively() -> None:
    decision = parse_decision('{"tool_call": {"name": "HANGUP_CALL", "arguments": {}}}', tools_of(HANGUP))
    assert decision == ToolCall("hangup_call", {})


@pytest.mark.parametrize(("arguments", "expected"), [
    ('{"farewell_message": "Bye"}', {"farewell_message": "Bye"}),
    ('"{\\"farewell_message\\": \\"Bye\\"}"', {"farewell_message": "Bye"}),
    ("[1]", {}), ('"nope"', {}), ("null", {}), ("3", {}),
])
def test_parse_decision_arguments(arguments: str, expected: dict[str, Any]) -> None:
    decision = parse_decision(f'{{"tool_call": {{"name": "hangup_call", "arguments": {arguments}}}}}',
                              tools_of(HANGUP))
    assert decision == ToolCall("hangup_call", expected)


def test_parse_decision_missing_arguments_are_empty() -> None:
    assert parse_decision('{"tool_call": {"name": "hangup_call"}}', tools_of(HANGUP)) == ToolCall("hangup_call", {})


def test_parse_decision_answer() -> None:
    assert parse_decision('{"answer": "  We open at nine.  "}', tools_of(HANGUP)) == "We open at nine."
    assert parse_decision('{"answer": "Hi"} trailing words', ()) == "Hi"
    assert parse_decision('Sure: {"answer": "Hi"}', ()) == "Hi"


@pytest.mark.parametrize("text", [
    "", "   ", "hello", "{", '{"answer": 5}', '{"answer": null}', "[]", '["answer"]', '"answer"',
    '{"tool_call": {"name": "format_disk", "arguments": {}}}',
    '{"tool_call": {"name": 5, "arguments": {}}}',
    '{"tool_call": "hangup_call"}',
    '{"tool_call": {"name": "hangup_call", "arguments": {"x": NaN}}}',
    '{"other": 1}',
    "[" * 5000,
    "{" * 5000,
])
def test_parse_decision_garbage_is_empty(text: str) -> None:
    assert parse_decision(text, tools_of(HANGUP)) == ""


def test_parse_decision_no_tools_means_no_call() -> None:
    assert parse_decision('{"tool_call": {"name": "hangup_call", "arguments": {}}}', ()) == ""


@pytest.mark.parametrize("text", [None, 5, b"{}"])
def test_parse_decision_not_text(text: Any) -> None:
    assert parse_decision(text, tools_of(HANGUP)) == ""


# ------------------------------------------------------------------------------------------------- tool results


def test_tool_result_prompt_success() -> None:
    prompt = tool_result_prompt("check_hours", {"open": "9:00", "close": "17:00"}, False)
    assert prompt == ('The tool check_hours returned this result: {"open": "9:00", "close": "17:00"}. Now answer the '
                      "caller using the actual tool values only. Do not mention JSON, tools, placeholders, or "
                      "internal fields.")


def test_tool_result_prompt_error() -> None:
    prompt = tool_result_prompt("transfer_call", {"error": "busy"}, True)
    assert prompt == ('The tool transfer_call failed with this result: {"error": "busy"}. Briefly apologize and ask '
                      "the caller to try again.")


@pytest.mark.parametrize(("result", "data"), [
    ("done", '{"value": "done"}'), (3, '{"value": 3}'), (None, '{"value": null}'), ([1, 2], '{"value": [1, 2]}'),
    ({"city": "Zürich"}, '{"city": "Zürich"}'),
])
def test_tool_result_prompt_values(result: Any, data: str) -> None:
    assert f"returned this result: {data}. Now" in tool_result_prompt("t", result, False)


def test_tool_result_prompt_is_capped() -> None:
    prompt = tool_result_prompt("t", {"text": "x" * 10000}, False)
    data = prompt.split("returned this result: ", 1)[1].split(". Now answer", 1)[0]
    assert len(data) == 4001 and data.endswith("\u2026")
    assert data.startswith('{"text": "xxx')


def test_tool_result_prompt_never_raises() -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular
    assert "failed with this result: {}." in tool_result_prompt("t", circular, True)
    assert '{"value": "' in tool_result_prompt("t", object(), False)
    assert tool_result_prompt("two\nlines", {}, False).startswith("The tool two lines returned")
