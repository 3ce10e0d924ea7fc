"""Critical path first in the LLM pool, with a scripted engine: real worker processes and pipes, no model.

A new answer (a caller waits in silence for its first sentence) overtakes another call's tail on the only
worker; the tail pauses between two tokens and resumes on its own state, whole and in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from local_ai_server.errors import Cancelled, EngineError
from local_ai_server.llm_pool import LlmJob, LlmPool
from local_ai_server.llm_slots import SLOTS
from local_ai_server.priority import BACKGROUND, HELD, REFILL, URGENT

from .fake_llm import FakeEngineFactory, script
from .test_llm_pool_sched import (
    SAMPLING,
    PoolFactory,
    error_of,
    first_delta,
    make_pool,  # noqa: F401 - the fixture
    text_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

TAIL_TOKENS = [f"t{i} " for i in range(150)]
# Slow enough that the tail cannot end while the test acts; every token checks it runs on its own state.
TAIL = script(TAIL_TOKENS, delay_s=0.01)


def finish_order(events: list[tuple[str, dict[str, object]]]) -> list[object]:
    return [data["tokens"] for name, data in events if name == "generation"]


async def started_tail(pool_events: list[tuple[str, dict[str, object]]], make: PoolFactory,
                       messages: list[tuple[str, str]] = TAIL, **kwargs: object) -> tuple[LlmPool, LlmJob, list[str]]:
    """A pool whose only worker runs a tail in the background (its first delta read into the list)."""
    pool = await make(on_event=lambda name, data: pool_events.append((name, data)), **kwargs)
    tail = await started(pool, messages)
    tail.set_priority(BACKGROUND)  # its first sentence is out: the rest is background
    return pool, tail, [FIRST[tail]]


# Each job's open stream: one dropped unfinished would cancel its job when collected.
STREAMS: dict[LlmJob, AsyncGenerator[str, None]] = {}
FIRST: dict[LlmJob, str] = {}


async def started(pool: LlmPool, messages: list[tuple[str, str]]) -> LlmJob:
    """A job whose first delta has arrived (it is really under way); its stream stays open."""
    job = pool.submit(messages, SAMPLING)
    STREAMS[job] = job.stream()
    FIRST[job] = await first_delta(STREAMS[job])
    return job


async def rest_of(job: LlmJob) -> str:
    """The rest of a started job's answer (it must complete)."""
    async def run() -> str:
        return "".join([d async for d in STREAMS[job]])

    return await asyncio.wait_for(run(), 10.0)


async def test_a_new_answer_overtakes_a_background_tail_on_the_only_worker(make_pool: PoolFactory) -> None:  # noqa: F811
    events: list[tuple[str, dict[str, object]]] = []
    pool, tail, got = await started_tail(events, make_pool)
    urgent = pool.submit(script(["u1 ", "u2 ", "u3"], delay_s=0.01), SAMPLING)
    assert urgent.state == "running" and urgent.worker is tail.worker  # no waiting for the tail
    assert await text_of(urgent) == "u1 u2 u3"
    assert tail.state == "running"  # paused, not finished: the urgent answer went first
    rest = await rest_of(tail)
    assert "".join(got) + rest == "".join(TAIL_TOKENS)  # whole, in order, on its own state
    assert finish_order(events) == [3, len(TAIL_TOKENS)]
    assert tail.stats["switches"] >= 1 and tail.stats["outcome"] == "completed"
    assert pool.counters["preemptions"] == 1


async def test_urgent_answers_keep_first_come_first_served_among_themselves(make_pool: PoolFactory) -> None:  # noqa: F811
    events: list[tuple[str, dict[str, object]]] = []
    pool, tail, _ = await started_tail(events, make_pool)
    first = pool.submit(script(["a"] * 5, delay_s=0.01), SAMPLING)
    second = pool.submit(script(["b"] * 2), SAMPLING)
    assert first.state == "running" and second.state == "queued"  # one urgent answer per worker
    assert [await text_of(first), await text_of(second)] == ["aaaaa", "bb"]
    await rest_of(tail)
    assert finish_order(events) == [5, 2, len(TAIL_TOKENS)]


async def test_a_tail_whose_audio_runs_out_goes_before_other_tails(make_pool: PoolFactory) -> None:  # noqa: F811
    events: list[tuple[str, dict[str, object]]] = []
    pool, tail, _ = await started_tail(events, make_pool)
    other = await started(pool, script(["o"] * 40, delay_s=0.01))
    other.set_priority(BACKGROUND)
    tail.set_priority(REFILL)  # the older tail's caller is about to hear silence
    await wait_until(lambda: tail.state == "finished", "the refilled tail")
    assert other.state == "running" and other.tokens < 40
    await wait_until(lambda: other.state == "finished", "the other tail")
    assert finish_order(events) == [len(TAIL_TOKENS), 40]


async def test_a_held_tail_makes_no_progress_until_released(make_pool: PoolFactory) -> None:  # noqa: F811
    pool, tail, got = await started_tail([], make_pool)
    tail.set_priority(HELD)  # far enough ahead of playback
    await asyncio.sleep(0.3)  # let the tokens already under way arrive
    held_at = tail.tokens
    await asyncio.sleep(0.3)
    assert tail.tokens == held_at < len(TAIL_TOKENS) and tail.state == "running"
    tail.set_priority(BACKGROUND)
    assert "".join(got) + await rest_of(tail) == "".join(TAIL_TOKENS)


async def test_a_held_tail_does_not_time_out_while_it_waits_for_playback(make_pool: PoolFactory) -> None:  # noqa: F811
    short = script(["s "] * 10, delay_s=0.01)
    pool, tail, _ = await started_tail([], make_pool, short, infer_timeout_s=1.0)
    tail.set_priority(HELD)
    await asyncio.sleep(1.5)
    assert tail.state == "running"
    tail.set_priority(URGENT)
    await rest_of(tail)
    assert tail.stats["outcome"] == "completed"


async def test_cancelling_a_paused_tail_leaves_the_running_answer_alone(make_pool: PoolFactory) -> None:  # noqa: F811
    pool, tail, _ = await started_tail([], make_pool)
    urgent = pool.submit(script([f"u{i} " for i in range(30)], delay_s=0.01), SAMPLING)
    stream = urgent.stream()
    await first_delta(stream)
    tail.cancel()
    assert isinstance(await error_of(STREAMS[tail]), Cancelled)
    assert tail.stats["cancelled"] is True and tail.tokens < len(TAIL_TOKENS)
    rest = "".join([d async for d in stream])
    assert rest == "".join(f"u{i} " for i in range(1, 30))
    assert pool.snapshot()["busy"] == 0 and pool.counters["worker_restarts"] == 0


async def test_a_worker_that_dies_fails_every_answer_it_held(make_pool: PoolFactory) -> None:  # noqa: F811
    pool, tail, _ = await started_tail([], make_pool)
    doomed = pool.submit(script(["a", "b"], delay_s=0.01, fail="exit", fail_after=1), SAMPLING)
    for stream in (doomed.stream(), STREAMS[tail]):
        err = await error_of(stream)
        assert type(err) is EngineError and err.message == "the LLM worker stopped unexpectedly"
    assert await text_of(pool.submit(script(["served"]), SAMPLING)) == "served"
    assert pool.counters["worker_restarts"] == 1


async def test_an_engine_that_cannot_pause_serves_first_come_first_served(make_pool: PoolFactory) -> None:  # noqa: F811
    events: list[tuple[str, dict[str, object]]] = []
    pool, tail, _ = await started_tail(events, make_pool, engine_factory=FakeEngineFactory(parks=False))
    urgent = pool.submit(script(["u"]), SAMPLING)
    assert urgent.state == "queued"
    await rest_of(tail)
    assert await text_of(urgent) == "u"
    assert finish_order(events) == [len(TAIL_TOKENS), 1]


async def test_fifo_scheduling_ignores_urgency(make_pool: PoolFactory) -> None:  # noqa: F811
    events: list[tuple[str, dict[str, object]]] = []
    pool, tail, _ = await started_tail(events, make_pool, scheduling="fifo")
    urgent = pool.submit(script(["u"]), SAMPLING)
    assert urgent.state == "queued" and tail.level == URGENT
    await rest_of(tail)
    assert await text_of(urgent) == "u"
    assert finish_order(events) == [len(TAIL_TOKENS), 1]


async def test_a_full_worker_queues_the_next_answer(make_pool: PoolFactory) -> None:  # noqa: F811
    """A worker holds a bounded number of answers: past its slots a new one waits in the queue."""
    pool = await make_pool()
    tails = []
    for _ in range(SLOTS):
        job = await started(pool, TAIL)
        job.set_priority(HELD)  # none of them can end by itself meanwhile
        tails.append(job)
    late = pool.submit(script(["late"]), SAMPLING)
    assert late.state == "queued"
    for job in tails:
        job.cancel()
    assert await text_of(late) == "late"
