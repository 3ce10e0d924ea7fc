"""The LLM pool's scheduling with a scripted engine: real worker processes, pipes and queue, no model."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from local_ai_server import llm_sched
from local_ai_server.engines.llm import LlmParams, SamplingParams
from local_ai_server.errors import Busy, Cancelled, EngineError, NotReady, ServerError, Timeout
from local_ai_server.llm_pool import LlmJob, LlmPool

from .fake_llm import FakeEngineFactory, script

PARAMS = LlmParams(context=64, threads=1, batch=8, gpu_layers=0)
SAMPLING = SamplingParams(max_tokens=64, temperature=0.0, top_p=1.0, repeat_penalty=1.0)
# Bounds what a test waits on (a loaded machine stays correct, only slower); never a timing assertion.
BOUND_S = 10.0
# Long enough that a request still running when the test acts on it cannot have ended by itself.
SLOW = script([f"t{i} " for i in range(500)], delay_s=0.01)

pytestmark = pytest.mark.timeout(60)

PoolFactory = Callable[..., Awaitable[LlmPool]]


@pytest.fixture
async def make_pool(tmp_path: Path) -> AsyncIterator[PoolFactory]:
    """Start pools of fake-engine workers on a placeholder model file; all are closed at teardown."""
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"")
    pools: list[LlmPool] = []

    async def factory(**kwargs: Any) -> LlmPool:
        kwargs.setdefault("engine_factory", FakeEngineFactory())
        pool = LlmPool(model, PARAMS, **kwargs)
        pools.append(pool)
        await asyncio.wait_for(pool.start(), BOUND_S)
        return pool

    yield factory
    for pool in pools:
        await pool.close()


async def text_of(job: LlmJob) -> str:
    """A job's whole answer (it must complete)."""
    async def run() -> str:
        return "".join([d async for d in job.stream()])

    return await asyncio.wait_for(run(), BOUND_S)


async def error_of(stream: AsyncGenerator[str, None]) -> ServerError:
    """The error a stream must end with."""
    async def run() -> None:
        async for _ in stream:
            pass

    with pytest.raises(ServerError) as info:
        await asyncio.wait_for(run(), BOUND_S)
    return info.value


async def first_delta(stream: AsyncGenerator[str, None]) -> str:
    """One delta: the job is really under way on its worker."""
    return await asyncio.wait_for(anext(stream), BOUND_S)


async def wait_until(cond: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_requests_are_served_in_submission_order(make_pool: PoolFactory) -> None:
    finished: list[int] = []
    pool = await make_pool(
        on_event=lambda name, data: finished.append(data["tokens"]) if name == "generation" else None)
    # Distinct token counts tell the finished jobs apart.
    jobs = [pool.submit(script([f"j{n}." for _ in range(n)], delay_s=0.02), SAMPLING) for n in (2, 3, 4)]
    assert [j.state for j in jobs] == ["running", "queued", "queued"]
    assert pool.snapshot()["queued"] == 2 and pool.snapshot()["busy"] == 1
    texts = await asyncio.gather(*(text_of(j) for j in jobs))
    assert texts == ["j2." * 2, "j3." * 3, "j4." * 4]  # each got its own answer, whole
    assert finished == [2, 3, 4]  # first in, first out
    assert all(j.stats["outcome"] == "completed" and j.stats["tokens"] == j.tokens for j in jobs)
    assert pool.counters["generations_completed"] == 3 and pool.snapshot()["busy"] == 0


async def test_the_engine_s_prompt_token_count_comes_with_the_end(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    messages = script(["a", "b"])
    job = pool.submit(messages, SAMPLING)
    assert await text_of(job) == "ab"
    assert job.stats["prompt_tokens"] == len(messages[0][1]) and job.stats["cached_tokens"] == 0


async def test_each_job_reports_how_long_it_waited_for_a_worker(make_pool: PoolFactory) -> None:
    """The queue wait (las_queue_wait_seconds{stage="llm"}) runs from submission to the hand-over to a worker:
    a job queued behind a running one waits at least until the moment it was last seen still queued."""
    waits: list[float] = []
    pool = await make_pool(on_event=lambda name, data: waits.append(data["seconds"]) if name == "queue_wait"
                           else None)
    running = pool.submit(SLOW, SAMPLING)
    stream = running.stream()
    await first_delta(stream)
    queued = pool.submit(script(["waited"]), SAMPLING)
    await asyncio.sleep(0.05)
    assert queued.state == "queued"
    still_queued_after = time.monotonic() - queued.submitted
    assert len(waits) == 1  # the first job only, handed over at once
    running.cancel()
    assert await text_of(queued) == "waited"
    assert len(waits) == 2 and waits[1] >= still_queued_after > 0


async def test_a_full_queue_refuses_with_busy(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_queue=2)
    running = pool.submit(SLOW, SAMPLING)
    queued = [pool.submit(script(["q"]), SAMPLING) for _ in range(2)]
    with pytest.raises(Busy) as info:
        pool.submit(script(["refused"]), SAMPLING)
    assert info.value.code == "busy" and info.value.message == "the LLM queue is full; try again shortly"
    assert pool.counters["busy"] == 1
    assert pool.snapshot()["queued"] == 2 and [j.state for j in queued] == ["queued", "queued"]
    running.cancel()
    assert [await text_of(j) for j in queued] == ["q", "q"]
    assert await text_of(pool.submit(script(["room again"]), SAMPLING)) == "room again"


async def test_cancelling_a_queued_request_never_reaches_a_worker(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    first = pool.submit(script(["a", "b", "c"], delay_s=0.05), SAMPLING)
    second = pool.submit(script(["never"]), SAMPLING)
    third = pool.submit(script(["x", "y"]), SAMPLING)
    second.cancel()
    assert second.state == "finished" and second.worker is None
    err = await error_of(second.stream())
    assert isinstance(err, Cancelled) and err.code == "cancelled"
    assert second.tokens == 0 and second.stats["outcome"] == "cancelled"
    assert pool.snapshot()["queued"] == 1
    assert await text_of(first) == "abc"  # the running one is untouched
    assert await text_of(third) == "xy"
    assert pool.counters["generations_cancelled"] == 1 and pool.counters["generations_completed"] == 2


async def test_cancelling_a_running_request_stops_it_and_the_next_is_served(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    (pid,) = pool.snapshot()["pids"]
    running = pool.submit(SLOW, SAMPLING)
    nxt = pool.submit(script(["next", " one"]), SAMPLING)
    stream = running.stream()
    assert (await first_delta(stream)).startswith("t0 ")
    running.cancel()
    assert isinstance(await error_of(stream), Cancelled)
    # The worker itself stopped generating (it said so), long before the end of its script.
    assert running.stats["cancelled"] is True and running.stats["outcome"] == "cancelled"
    assert 1 <= running.stats["tokens"] < 100
    assert await text_of(nxt) == "next one"
    assert nxt.worker is not None and nxt.worker.pid == pid and pool.counters["worker_restarts"] == 0


async def test_a_consumer_that_stops_reading_cancels_its_request(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    running = pool.submit(SLOW, SAMPLING)
    stream = running.stream()
    await first_delta(stream)
    await stream.aclose()
    assert running.cancel_requested
    await wait_until(lambda: running.state == "finished", "the cancelled job to end")
    assert running.stats["outcome"] == "cancelled" and running.stats["tokens"] < 100
    assert await text_of(pool.submit(script(["after"]), SAMPLING)) == "after"


async def test_a_worker_that_dies_fails_its_request_and_is_replaced(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    (old_pid,) = pool.snapshot()["pids"]
    doomed = pool.submit(script(["a", "b", "c"], delay_s=0.02, fail="exit", fail_after=2), SAMPLING)
    waiting = pool.submit(script(["served", " by the replacement"]), SAMPLING)
    stream = doomed.stream()
    assert await first_delta(stream) == "a"
    err = await error_of(stream)
    assert type(err) is EngineError and err.message == "the LLM worker stopped unexpectedly"
    assert doomed.stats["outcome"] == "error"
    assert await text_of(waiting) == "served by the replacement"  # waited for the new worker
    assert waiting.worker is not None and waiting.worker.pid not in (None, old_pid)
    assert pool.counters["worker_restarts"] == 1
    await wait_until(lambda: old_pid not in {p.pid for p in multiprocessing.active_children()}, "the reap")
    snap = pool.snapshot()
    assert snap["state"] == "ready" and snap["workers"] == 1 and snap["pids"] == [waiting.worker.pid]


async def test_an_engine_error_fails_only_its_request(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    (pid,) = pool.snapshot()["pids"]
    failing = pool.submit(script(["a", "b"], fail="raise", fail_after=1), SAMPLING)
    err = await error_of(failing.stream())
    assert type(err) is EngineError and err.message == "LLM error: RuntimeError: scripted engine failure"
    assert failing.stats["outcome"] == "error" and failing.tokens == 1
    ok = pool.submit(script(["still", " here"]), SAMPLING)
    assert await text_of(ok) == "still here"
    assert ok.worker is not None and ok.worker.pid == pid and pool.counters["worker_restarts"] == 0


async def test_two_workers_serve_two_requests_at_once(make_pool: PoolFactory) -> None:
    pool = await make_pool(workers=2)
    assert len(set(pool.snapshot()["pids"])) == 2
    a = pool.submit(script(["a"] * 20, delay_s=0.02), SAMPLING)
    b = pool.submit(script(["b"] * 20, delay_s=0.02), SAMPLING)
    assert pool.snapshot()["busy"] == 2 and pool.snapshot()["queued"] == 0
    streams = [a.stream(), b.stream()]
    # Both answers are under way before either ends: one worker could not do that.
    assert [await first_delta(s) for s in streams] == ["a", "b"]
    assert a.state == b.state == "running"
    assert a.worker is not None and b.worker is not None and a.worker.pid != b.worker.pid
    third = pool.submit(script(["c"]), SAMPLING)
    assert third.state == "queued"  # both workers are taken
    rest = await asyncio.gather(*(asyncio.wait_for(_join(s), BOUND_S) for s in streams))
    assert rest == ["a" * 19, "b" * 19]
    assert await text_of(third) == "c"


async def _join(stream: AsyncGenerator[str, None]) -> str:
    return "".join([d async for d in stream])


async def test_a_request_past_its_time_limit_is_stopped(make_pool: PoolFactory) -> None:
    pool = await make_pool(infer_timeout_s=0.3)
    (pid,) = pool.snapshot()["pids"]
    job = pool.submit(SLOW, SAMPLING)
    err = await error_of(job.stream())
    assert isinstance(err, Timeout) and err.code == "timeout"
    assert job.stats["outcome"] == "timeout" and job.stats["tokens"] < 200
    nxt = pool.submit(script(["on", " time"]), SAMPLING)
    assert await text_of(nxt) == "on time"
    assert nxt.worker is not None and nxt.worker.pid == pid  # it stopped when asked: not killed


async def test_a_hung_engine_is_killed_at_its_time_limit_and_replaced(make_pool: PoolFactory,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_sched, "KILL_GRACE_S", 0.2)
    pool = await make_pool(infer_timeout_s=0.3)
    (old_pid,) = pool.snapshot()["pids"]
    job = pool.submit(script(["a"], fail="hang", fail_after=1), SAMPLING)
    assert isinstance(await error_of(job.stream()), Timeout)
    pool.infer_timeout_s = 0  # the replacement's start-up must not race the limit
    nxt = pool.submit(script(["fresh"]), SAMPLING)
    assert await text_of(nxt) == "fresh"
    assert nxt.worker is not None and nxt.worker.pid != old_pid and pool.counters["worker_restarts"] == 1


async def test_an_engine_that_fails_to_load_leaves_the_pool_failed(make_pool: PoolFactory) -> None:
    pool = await make_pool(workers=2, engine_factory=FakeEngineFactory(load_error="no such device"))
    assert pool.state == "failed" and pool.snapshot()["pids"] == []
    assert pool.error == "LLM model could not be loaded (RuntimeError: no such device)"
    with pytest.raises(NotReady):
        pool.submit(script(["x"]), SAMPLING)
