"""Realtime conversation edits and the response's bookkeeping, with the `openai` SDK's client and the real models.

What the next response reads is observed two ways, both from outside the model's wording: the prompt's size in
the response's own `usage.input_tokens` (an out-of-band response reads the conversation and nothing else), and
the number of messages the server logs for that generation (`llm.request`).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from .conftest import ServerProc, start_server
from .test_concurrency import LONG_CONTEXT, LONG_PROMPT
from .test_realtime import QUESTION, TOKEN, Events, ask, assert_nothing_after_done, connected

pytestmark = pytest.mark.e2e
# Long answers ("hello" 200 times, minutes of speech) that still end soon when nobody cancels them; greedy, so
# that the same conversation is the same prompt.
ENV = {"LOCAL_LLM_MAX_TOKENS": "200", "LOCAL_LLM_TEMPERATURE": "0", "LOCAL_LLM_REPEAT_PENALTY": "1.0",
       "LOCAL_WS_AUTH_TOKEN": TOKEN}
MANUAL_TEXT = {"type": "realtime", "output_modalities": ["text"], "instructions": "Answer in one short sentence.",
               "audio": {"input": {"turn_detection": None}}}


@pytest.fixture(scope="module")
def rt(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("rt_items"), models_dir, env=ENV)
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


@pytest.fixture
async def session(rt: ServerProc) -> AsyncIterator[tuple[AsyncRealtimeConnection, Events]]:
    async with connected(rt) as pair:
        yield pair


async def long_response(conn: AsyncRealtimeConnection, ev: Events, audio: bool = True) -> tuple[str, int]:
    """A long answer under way (manual turns): its id once its first delta is in, and where it started."""
    await conn.session.update(session=cast(Any, {
        "type": "realtime", "instructions": LONG_CONTEXT[0]["content"],
        "output_modalities": ["audio" if audio else "text"], "audio": {"input": {"turn_detection": None}}}))
    await ev.type("session.updated")
    await ask(conn, LONG_PROMPT)
    mark = len(ev.all)
    await conn.response.create()
    rid = (await ev.type("response.created", mark)).response.id
    await ev.type("response.output_audio.delta" if audio else "response.output_text.delta", mark)
    return rid, mark


async def respond(conn: AsyncRealtimeConnection, ev: Events, **response: Any) -> Any:
    """response.create, and its response.done."""
    mark = len(ev.all)
    await conn.response.create(response=cast(Any, response) if response else cast(Any, {}))
    rid = (await ev.type("response.created", mark)).response.id
    return await ev.wait(lambda e: e.type == "response.done" and e.response.id == rid, mark)


async def probe(conn: AsyncRealtimeConnection, ev: Events, rt: ServerProc) -> tuple[int, int, int]:
    """An out-of-band response (it reads the conversation only): its input and cached tokens, and how many
    messages the server sent the LLM for it."""
    done = await respond(conn, ev, conversation="none", output_modalities=["text"],
                         instructions="Answer with one word.")
    assert done.response.status == "completed"
    usage = done.response.usage
    logged = rt.log_events()
    (start,) = [e for e in logged if e.get("event") == "realtime.response" and e.get("response") == done.response.id]
    requests = [e for e in logged if e.get("event") == "llm.request" and e.get("session") == start["session"]]
    return usage.input_tokens, usage.input_token_details.cached_tokens, requests[-1]["messages"]


async def test_usage_and_rate_limits(session: tuple[AsyncRealtimeConnection, Events]) -> None:
    conn, ev = session
    await conn.session.update(session=cast(Any, MANUAL_TEXT))
    await ev.type("session.updated")
    await ask(conn, QUESTION)
    done = await respond(conn, ev)
    assert done.response.status == "completed"
    usage = done.response.usage
    # The prompt: a system prompt and the question, as the model's tokenizer counts them.
    assert usage.input_tokens > 10 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_token_details.text_tokens == usage.input_tokens
    assert 0 <= usage.input_token_details.cached_tokens < usage.input_tokens
    # rate_limits.updated right after response.created, with the server's own limits.
    kinds = [e.type for e in ev.all]
    created = kinds.index("response.created")
    assert kinds[created + 1] == "rate_limits.updated"
    limits = {r.name: r for r in ev.of("rate_limits.updated")[0].rate_limits}
    assert (limits["requests"].limit, limits["requests"].remaining) == (1, 0)
    assert limits["tokens"].limit == limits["tokens"].remaining == int(ENV["LOCAL_LLM_MAX_TOKENS"])
    # The same conversation read twice: the same prompt, the second time out of llama.cpp's cache.
    mark = len(ev.all)
    await ask(conn, "And of Italy?")
    second = (await respond(conn, ev)).response.usage
    assert second.input_tokens > usage.input_tokens  # the first exchange is in it now
    assert second.input_token_details.cached_tokens > 0
    assert len(ev.of("rate_limits.updated")) == 2 and ev.index(ev.of("rate_limits.updated")[1]) > mark


async def test_deleted_items_leave_what_the_next_response_reads(session: tuple[AsyncRealtimeConnection, Events],
                                                                rt: ServerProc) -> None:
    conn, ev = session
    await conn.session.update(session=cast(Any, MANUAL_TEXT))
    await ev.type("session.updated")
    await ask(conn, QUESTION)
    user_item = (await ev.type("conversation.item.done")).item.id
    answer_item = (await respond(conn, ev)).response.output[0].id
    tokens, cached, messages = await probe(conn, ev, rt)
    assert messages == 3  # the instructions, the question, the answer
    again = await probe(conn, ev, rt)
    assert again[0] == tokens and again[1] > 0 and again[2] == 3  # nothing changed: the same prompt
    # The answer goes: the next response reads the question alone.
    mark = len(ev.all)
    await conn.conversation.item.delete(item_id=answer_item, event_id="evt_del_1")
    deleted = await ev.type("conversation.item.deleted", mark)
    assert deleted.item_id == answer_item
    without_answer = await probe(conn, ev, rt)
    assert without_answer[2] == 2 and without_answer[0] < tokens
    # An unknown item (or one deleted already): an error with the client's event_id, and nothing changes.
    for bad in ("item_nope", answer_item):
        mark = len(ev.all)
        await conn.conversation.item.delete(item_id=bad, event_id="evt_del_bad")
        err = await ev.type("error", mark)
        assert (err.error.type, err.error.code, err.error.param, err.error.event_id) == \
            ("invalid_request_error", "item_delete_invalid_item_id", "item_id", "evt_del_bad")
    assert (await probe(conn, ev, rt))[::2] == without_answer[::2]
    # The question goes too: nothing of the conversation is left.
    await conn.conversation.item.delete(item_id=user_item)
    empty = await probe(conn, ev, rt)
    assert empty[2] == 1 and empty[0] < without_answer[0]


async def test_deleting_the_item_a_response_is_making_cancels_it(session: tuple[AsyncRealtimeConnection, Events],
                                                                rt: ServerProc) -> None:
    conn, ev = session
    rid, mark = await long_response(conn, ev, audio=False)
    created = next(e for e in ev.all[mark:] if e.type == "response.output_item.added")
    await conn.conversation.item.delete(item_id=created.item.id)
    done = await ev.wait(lambda e: e.type == "response.done" and e.response.id == rid, mark)
    deleted = await ev.type("conversation.item.deleted", mark)
    assert done.response.status == "cancelled" and done.response.status_details.reason == "client_cancelled"
    assert ev.index(done) < ev.index(deleted)
    assert (await probe(conn, ev, rt))[2] == 2  # the instructions and the question: none of the answer
    assert_nothing_after_done(ev, rid)


async def test_truncate_cuts_the_answer_at_what_was_heard(session: tuple[AsyncRealtimeConnection, Events],
                                                          rt: ServerProc) -> None:
    conn, ev = session
    rid, mark = await long_response(conn, ev)
    # Two seconds of its audio, then the caller "stops listening": the response is cancelled.
    await ev.wait(lambda e: sum(len(base64.b64decode(d.delta)) for d in ev.of("response.output_audio.delta")
                                if d.response_id == rid) >= 2 * 48000, mark)
    await conn.response.cancel()
    done = await ev.wait(lambda e: e.type == "response.done" and e.response.id == rid, mark)
    item_id = done.response.output[0].id
    heard_ms = sum(len(base64.b64decode(d.delta)) for d in ev.of("response.output_audio.delta")
                   if d.response_id == rid) * 1000 // 48000
    full = await probe(conn, ev, rt)
    # Beyond its audio: an error, and nothing changes.
    mark = len(ev.all)
    await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=heard_ms + 1000,
                                          event_id="evt_trunc_bad")
    err = await ev.type("error", mark)
    assert (err.error.param, err.error.event_id) == ("audio_end_ms", "evt_trunc_bad")
    assert (await probe(conn, ev, rt))[::2] == full[::2]
    # One second heard: the answer as the next response reads it is cut to about that much speech.
    await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=1000)
    truncated = await ev.type("conversation.item.truncated", mark)
    assert (truncated.item_id, truncated.audio_end_ms, truncated.content_index) == (item_id, 1000, 0)
    cut = await probe(conn, ev, rt)
    assert cut[2] == full[2] and cut[0] < full[0]
    # Nothing heard: no answer left at all.
    await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=0)
    await ev.wait(lambda e: e.type == "conversation.item.truncated" and e.audio_end_ms == 0, mark)
    assert (await probe(conn, ev, rt))[2] == full[2] - 1


async def test_output_audio_buffer_clear_stops_the_response_audio(session: tuple[AsyncRealtimeConnection, Events]
                                                                  ) -> None:
    conn, ev = session
    rid, mark = await long_response(conn, ev)
    await conn.output_audio_buffer.clear(event_id="evt_clear")
    cleared = await ev.type("output_audio_buffer.cleared", mark)
    assert cleared.response_id == rid
    at = ev.index(cleared)
    # The response goes on (its transcript), silent: no audio of it after the cleared event.
    await ev.wait(lambda e: e.type == "response.output_audio_transcript.delta" and e.response_id == rid, at + 1)
    await conn.response.cancel()
    done = await ev.wait(lambda e: e.type == "response.done" and e.response.id == rid, at)
    late = [e for e in ev.all[at:] if e.type == "response.output_audio.delta" and e.response_id == rid]
    assert late == [] and done.response.status == "cancelled"
    # Nothing in progress: cleared all the same, naming the last response.
    mark = len(ev.all)
    await conn.output_audio_buffer.clear()
    assert (await ev.type("output_audio_buffer.cleared", mark)).response_id == rid


async def test_output_audio_buffer_clear_before_any_response_is_an_error(
        session: tuple[AsyncRealtimeConnection, Events]) -> None:
    conn, ev = session
    await ev.type("session.created")
    await conn.output_audio_buffer.clear(event_id="evt_clear_0")
    err = await ev.type("error")
    assert (err.error.code, err.error.event_id) == ("response_audio_not_active", "evt_clear_0")
