"""Realtime function calling with the `openai` SDK's realtime client and the real (tiny) model.

The grammar holds the model's decision to a declared function with valid arguments, so the structure of a
call is asserted; of the follow-up only that an answer comes (a 135M model's wording is not reliable).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from .conftest import ServerProc, start_server
from .test_realtime import TOKEN, Events, ask, assert_unique_event_ids, connected, response_audio

pytestmark = pytest.mark.e2e
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
MANUAL = {"audio": {"input": {"turn_detection": None}}}


@pytest.fixture(scope="module")
def rt_tools(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("rt_tools"), models_dir, env={"LOCAL_WS_AUTH_TOKEN": TOKEN})
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


@pytest.fixture
async def conn_ev(rt_tools: ServerProc) -> AsyncIterator[tuple[AsyncRealtimeConnection, Events]]:
    async with connected(rt_tools) as pair:
        yield pair


def realtime_requests(srv: ServerProc) -> list[dict[str, Any]]:
    return [e for e in srv.log_events() if e.get("event") == "llm.request" and e.get("kind") == "realtime"]


async def test_a_function_call_round_trip(conn_ev: tuple[AsyncRealtimeConnection, Events],
                                          rt_tools: ServerProc) -> None:
    conn, ev = conn_ev
    await conn.session.update(session=cast(Any, {"type": "realtime", "instructions": "Answer in one short sentence.",
                                                 "tools": [WEATHER], "tool_choice": "required", **MANUAL}))
    updated = (await ev.type("session.updated")).session
    assert updated.tool_choice == "required" and len(updated.tools) == 1 and updated.tools[0].name == "get_weather"
    await ask(conn, "What is the weather in Paris?")
    await conn.response.create()
    done = await ev.type("response.done")
    assert done.response.status == "completed" and len(done.response.output) == 1
    call = done.response.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    args = json.loads(call.arguments)
    assert isinstance(args, dict) and isinstance(args.get("city"), str) and args["city"].strip()
    # The events of the call, in order, all of this call; nothing spoken or written instead.
    kinds = [e.type for e in ev.all]
    order = ["response.created", "response.output_item.added", "response.function_call_arguments.delta",
             "response.function_call_arguments.done", "response.output_item.done", "response.done"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    added = ev.of("response.output_item.added")[0].item
    assert added.type == "function_call" and added.call_id == call.call_id and added.name == "get_weather"
    deltas = ev.of("response.function_call_arguments.delta")
    assert all(d.call_id == call.call_id and d.item_id == call.id for d in deltas)
    args_done = ev.of("response.function_call_arguments.done")[0]
    assert "".join(d.delta for d in deltas) == args_done.arguments == call.arguments
    assert not ev.of("response.output_audio.delta") and not ev.of("response.content_part.added")

    # An output for a call that was never made: an error naming call_id, nothing added.
    mark = len(ev.all)
    await conn.conversation.item.create(event_id="evt_bad_call", item={
        "type": "function_call_output", "call_id": "call_nope", "output": "{}"})
    err = await ev.type("error", mark)
    assert err.error.param == "item.call_id" and err.error.event_id == "evt_bad_call"

    # The output, then a response: spoken, from the tool's result, with no new tool decision.
    mark = len(ev.all)
    await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                              "output": json.dumps({"temperature_c": 21, "sky": "sunny"})})
    item = (await ev.type("conversation.item.done", mark)).item
    assert item.type == "function_call_output" and item.call_id == call.call_id
    await conn.response.create()
    answer = await ev.type("response.done", mark)
    assert answer.response.status == "completed", answer.response.status_details
    message = answer.response.output[0]
    assert message.type == "message" and message.role == "assistant"
    transcript = message.content[0].transcript
    assert transcript and transcript.strip()
    assert response_audio(ev, answer.response.id)
    # The history as the model saw it: the question and the call (one exchange) before the tool's result.
    follow_up = realtime_requests(rt_tools)[-1]
    assert follow_up["history"] == 2
    # The same output again: answered already.
    mark = len(ev.all)
    await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id, "output": ""})
    assert (await ev.type("error", mark)).error.param == "item.call_id"
    assert_unique_event_ids(ev)


async def test_tool_choice_none_answers_and_bad_tools_are_refused(
        conn_ev: tuple[AsyncRealtimeConnection, Events]) -> None:
    conn, ev = conn_ev
    await conn.session.update(session=cast(Any, {"type": "realtime", "output_modalities": ["text"],
                                                 "tools": [WEATHER], "tool_choice": "none", **MANUAL}))
    await ev.type("session.updated")
    await ask(conn, "What is the weather in Paris?")
    await conn.response.create()
    done = await ev.type("response.done")
    assert done.response.status == "completed" and done.response.output[0].type == "message"
    assert ev.of("response.output_text.done")[0].text.strip()
    assert not ev.of("response.function_call_arguments.done")
    # A bad schema and a forced function not declared: errors naming the field, the session unchanged.
    mark = len(ev.all)
    await conn.send(cast(Any, {"type": "session.update", "event_id": "evt_schema", "session": {
        "tools": [{**WEATHER, "parameters": "not a schema"}], "instructions": "changed"}}))
    err = await ev.type("error", mark)
    assert err.error.param == "session.tools[0].parameters" and err.error.event_id == "evt_schema"
    await conn.send(cast(Any, {"type": "session.update", "event_id": "evt_choice", "session": {
        "tool_choice": {"type": "function", "name": "get_time"}}}))
    err = await ev.type("error", ev.index(err) + 1)
    assert err.error.param == "session.tool_choice.name" and err.error.event_id == "evt_choice"
    await conn.session.update(session={"type": "realtime"})
    now = (await ev.type("session.updated", ev.index(err))).session
    assert now.instructions == "" and now.tool_choice == "none" and len(now.tools) == 1


async def test_a_deleted_function_call_takes_no_output_and_leaves_the_history(
        conn_ev: tuple[AsyncRealtimeConnection, Events], rt_tools: ServerProc) -> None:
    conn, ev = conn_ev
    await conn.session.update(session=cast(Any, {"type": "realtime", "output_modalities": ["text"],
                                                 "tools": [WEATHER], "tool_choice": "required", **MANUAL}))
    await ev.type("session.updated")
    await ask(conn, "What is the weather in Rome?")
    await conn.response.create()
    call = (await ev.type("response.done")).response.output[0]
    assert call.type == "function_call"
    mark = len(ev.all)
    await conn.conversation.item.delete(item_id=call.id)
    assert (await ev.type("conversation.item.deleted", mark)).item_id == call.id
    await conn.conversation.item.create(event_id="evt_gone", item={
        "type": "function_call_output", "call_id": call.call_id, "output": "{}"})
    err = await ev.type("error", mark)
    assert (err.error.param, err.error.event_id) == ("item.call_id", "evt_gone")
    # The next response reads the question without the call: one user message in the history.
    await conn.session.update(session=cast(Any, {"type": "realtime", "tool_choice": "none"}))
    await ev.type("session.updated", mark)
    await conn.response.create()
    assert (await ev.type("response.done", ev.index(err))).response.status == "completed"
    assert realtime_requests(rt_tools)[-1]["history"] == 1
