"""Realtime function calling, pure parts: tools and tool_choice checked (with AVA's caps), call events, outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from local_ai_server.fronts import realtime_render as R
from local_ai_server.fronts.realtime_parse import (
    Invalid,
    Limits,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    parse,
)
from local_ai_server.fronts.realtime_tools import (
    FunctionCalls,
    FunctionOutput,
    ToolChoice,
    forced,
    remembered_call,
)
from local_ai_server.tool_decl import MAX_TOOL_SCHEMA_BYTES, MAX_TOOLS, Tool

pytestmark = pytest.mark.unit

WEATHER: dict[str, Any] = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                         "required": ["city"]}}


def update(session: dict[str, Any], cfg: SessionConfig = SessionConfig()) -> SessionConfig:
    ev = parse({"type": "session.update", "session": session})
    assert isinstance(ev, SessionUpdate)
    return ev.patch.apply(cfg)


def refused(session: dict[str, Any], cfg: SessionConfig = SessionConfig()) -> Invalid:
    with pytest.raises(Invalid) as info:
        update(session, cfg)
    return info.value


def test_tools_map_to_the_cores_declarations_and_are_reported() -> None:
    cfg = update({"tools": [WEATHER], "tool_choice": "required"})
    assert cfg.tools == (Tool("get_weather", "The weather in a city.", WEATHER["parameters"]),)
    assert cfg.tool_choice == ToolChoice("required")
    about, vad = R.About("sess_1", "m", "v", "t"), R.VadDefaults(0.5, 300, 500)
    s = R.session_object(cfg, about, vad)
    assert s["tools"] == [WEATHER] and s["tool_choice"] == "required"
    named = update({"tool_choice": {"type": "function", "name": "GET_WEATHER"}}, cfg)
    assert named.tool_choice == ToolChoice("required", "GET_WEATHER")
    assert R.session_object(named, about, vad)["tool_choice"] == {"type": "function", "name": "GET_WEATHER"}
    # A named choice narrows the decision to that tool, required; none and auto pass through.
    assert forced(named.tools, named.tool_choice) == (named.tools, "required")
    assert forced(cfg.tools, ToolChoice("none")) == (cfg.tools, "none")
    # Clearing the tools (null or []) and leaving tools out of an update.
    assert update({"tools": None}, cfg).tools == () and update({"tools": []}, cfg).tools == ()
    assert update({"instructions": "x"}, cfg).tools == cfg.tools


@pytest.mark.parametrize(("session", "param"), [
    ({"tools": {"name": "x"}}, "session.tools"),
    ({"tools": ["get_weather"]}, "session.tools[0]"),
    ({"tools": [{**WEATHER, "type": "mcp"}]}, "session.tools[0].type"),
    ({"tools": [{**WEATHER, "name": "bad name!"}]}, "session.tools[0].name"),
    ({"tools": [WEATHER, {**WEATHER, "description": 5}]}, "session.tools[1].description"),
    ({"tools": [{**WEATHER, "parameters": "a string"}]}, "session.tools[0].parameters"),
    ({"tools": [{**WEATHER, "parameters": {"type": "array", "items": {}}}]}, "session.tools[0].parameters"),
    ({"tools": [{**WEATHER, "parameters": {"type": "object", "x": "y" * MAX_TOOL_SCHEMA_BYTES}}]},
     "session.tools[0].parameters"),
    ({"tools": [{**WEATHER, "name": f"t{i}"} for i in range(MAX_TOOLS + 1)]}, "session.tools"),
    ({"tool_choice": "sometimes"}, "session.tool_choice"),
    ({"tool_choice": {"type": "function"}}, "session.tool_choice.name"),
    ({"tool_choice": {"type": "mcp", "server_label": "x"}}, "session.tool_choice.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}}, "session.tool_choice.name"),
])
def test_bad_tools_and_tool_choice_name_their_param(session: dict[str, Any], param: str) -> None:
    err = refused(session)
    assert err.param == param, err.message
    assert "/" not in err.message and "Traceback" not in err.message


def test_a_forced_function_must_stay_declared() -> None:
    cfg = update({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}})
    assert refused({"tools": []}, cfg).param == "session.tool_choice.name"


def test_response_tools_and_tool_choice() -> None:
    ev = parse({"type": "response.create", "response": {"tools": [WEATHER], "tool_choice": "none"}})
    assert isinstance(ev, ResponseCreate)
    assert ev.tools is not None and ev.tools[0].name == "get_weather" and ev.tool_choice == ToolChoice("none")
    plain = parse({"type": "response.create"})
    assert isinstance(plain, ResponseCreate) and plain.tools is None and plain.tool_choice is None
    with pytest.raises(Invalid) as info:
        parse({"type": "response.create", "event_id": "r1", "response": {"tool_choice": 3}}, Limits())
    assert info.value.param == "response.tool_choice" and info.value.event_id == "r1"


def test_function_call_response_events() -> None:
    ids = R.Ids()
    r = R.Response(ids, ids.new("resp"), ids.new("item"), True, "audio/pcm")
    assert r.created()["type"] == "response.created"
    events = r.function_call("item_prev", "call_1", "get_weather", {"city": "Paris"})
    assert [e["type"] for e in events] == [
        "response.output_item.added", "conversation.item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "conversation.item.done",
        "response.done"]
    added, delta, done_args = events[0]["item"], events[2], events[3]
    assert added["type"] == "function_call" and added["status"] == "in_progress" and added["arguments"] == ""
    assert delta["call_id"] == done_args["call_id"] == "call_1" and delta["item_id"] == r.item_id
    assert json.loads(delta["delta"]) == json.loads(done_args["arguments"]) == {"city": "Paris"}
    assert done_args["name"] == "get_weather"
    body = events[-1]["response"]
    assert body["status"] == "completed" and r.closed
    assert body["output"] == [events[4]["item"]] and body["output"][0]["status"] == "completed"
    assert body["output"][0]["arguments"] == done_args["arguments"]
    assert len({e["event_id"] for e in events}) == len(events)


def test_a_response_cancelled_while_deciding_has_no_output_item() -> None:
    ids = R.Ids()
    r = R.Response(ids, ids.new("resp"), ids.new("item"), True, "audio/pcm")
    r.created()
    closing = r.closing("cancelled", R.cancelled_details("client_cancelled"))
    assert [e["type"] for e in closing] == ["response.done"] and closing[0]["response"]["output"] == []


def test_outputs_of_known_calls_only_and_what_the_next_response_is_told() -> None:
    calls = FunctionCalls()
    calls.made("call_1", "get_weather")
    with pytest.raises(Invalid) as info:
        calls.output(FunctionOutput("e1", "call_nope", "{}"))
    assert info.value.param == "item.call_id" and info.value.event_id == "e1" and not calls.waiting
    calls.output(FunctionOutput(None, "call_1", '{"temperature_c": 21, "sky": "sunny"}'))
    with pytest.raises(Invalid):  # answered once
        calls.output(FunctionOutput(None, "call_1", "{}"))
    assert calls.waiting
    told, kept = calls.take("And tomorrow?")
    assert '"temperature_c": 21' in told and "get_weather" in told and told.endswith("And tomorrow?")
    assert kept.startswith("(The tool get_weather returned: ") and not calls.waiting
    assert remembered_call("get_weather", {"city": "Paris"}) == \
        '(I called the tool get_weather with {"city": "Paris"}.)'
