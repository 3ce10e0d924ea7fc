"""Tests for the LLM process pool with the real embedded GGUF in real spawned worker processes."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from local_ai_server.engines.llm import LlmParams, SamplingParams
from local_ai_server.errors import (
    Busy,
    Cancelled,
    EngineError,
    ModelLoadError,
    NotReady,
    ServerError,
    Timeout,
)
from local_ai_server.llm_pool import LlmJob, LlmPool
from local_ai_server.setup.selection import default_models_dir, read_selection

PARAMS = LlmParams(context=4096, threads=2, batch=256, gpu_layers=0)
SHORT = [("user", "Say hello.")]
SHORT_SAMPLING = SamplingParams(max_tokens=12, temperature=0.0, top_p=0.9, repeat_penalty=1.0)
LONG = [
    ("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("user", "Repeat the word hello 500 times."),
]
LONG_SAMPLING = SamplingParams(max_tokens=1500, temperature=0.0, top_p=0.9, repeat_penalty=1.0)
# Safety bound for anything we wait on; generous because the machine may be shared. Never a timing assertion.
BOUND_S = 90.0

PoolFactory = Callable[..., Awaitable[LlmPool]]


@pytest.fixture(scope="module")
def model_path() -> Path:
    models_dir = default_models_dir()
    selection = read_selection(models_dir)
    if selection is None:
        pytest.fail(f"no models installed in {models_dir}: run ./install.sh first")
    path = models_dir / selection.llm.path
    assert path.is_file(), path
    return path


@pytest.fixture
async def make_pool(model_path: Path) -> AsyncIterator[PoolFactory]:
    """Start pools on the real model; every pool is closed at teardown, even when the test fails."""
    pools: list[LlmPool] = []

    async def factory(path: Path | None | str = "default", **kwargs: Any) -> LlmPool:
        pool = LlmPool(model_path if path == "default" else path, PARAMS, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        await asyncio.wait_for(pool.start(), BOUND_S)
        return pool

    yield factory
    for pool in pools:
        await pool.close()


async def drain(stream: AsyncGenerator[str, None]) -> list[str]:
    """The remaining deltas of a job's stream, bounded in time."""

    async def run() -> list[str]:
        return [d async for d in stream]

    return await asyncio.wait_for(run(), BOUND_S)


async def collect(job: LlmJob) -> list[str]:
    """Every delta of a job."""
    return await drain(job.stream())


async def first_deltas(stream: AsyncGenerator[str, None], n: int) -> list[str]:
    """Read `n` deltas (the generation is really under way) and leave the stream open."""
    return [await asyncio.wait_for(anext(stream), BOUND_S) for _ in range(n)]


async def drain_error(stream: AsyncGenerator[str, None]) -> ServerError:
    """Drain a stream that must end with an error; return that error."""
    with pytest.raises(ServerError) as info:
        await drain(stream)
    return info.value


async def finish_error(job: LlmJob) -> ServerError:
    """Drain a job that must end with an error; return that error."""
    return await drain_error(job.stream())


async def wait_until(cond: Callable[[], bool], what: str) -> None:
    """Poll `cond` until it holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def live_child_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.pid is not None}


async def assert_serves(pool: LlmPool) -> list[str]:
    """A short job completes with at least one delta."""
    job = pool.submit(SHORT, SHORT_SAMPLING)
    deltas = await collect(job)
    assert deltas and job.stats["outcome"] == "completed"
    return deltas


# ---------------------------------------------------------------- streaming


async def test_stream_yields_deltas_then_completes_with_stats(make_pool: PoolFactory) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    pool = await make_pool(on_event=lambda name, data: events.append((name, data)))
    snap = pool.snapshot()
    assert snap["state"] == "ready" and snap["workers"] == 1 and len(snap["pids"]) == 1
    assert pool.info.get("n_ctx") == 4096

    job = pool.submit(SHORT, SHORT_SAMPLING)
    deltas = await collect(job)
    assert len(deltas) >= 2 and all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas).strip()
    assert job.state == "finished"
    assert job.stats["outcome"] == "completed" and job.stats["cancelled"] is False
    # Tokens travel coalesced (a few per message), but every one is counted.
    assert job.stats["tokens"] == job.tokens <= SHORT_SAMPLING.max_tokens
    assert 2 <= len(deltas) <= job.tokens
    assert job.stats["first_token_ms"] is not None and job.stats["total_ms"] >= job.stats["first_token_ms"]
    assert pool.snapshot()["busy"] == 0 and pool.counters["generations_completed"] == 1
    generations = [data for name, data in events if name == "generation"]
    assert generations and generations[-1]["outcome"] == "completed"


async def test_greedy_output_is_deterministic(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    # The same text; how it is cut into deltas depends on timing (tokens are coalesced per 25 ms).
    assert "".join(await assert_serves(pool)) == "".join(await assert_serves(pool))


# ---------------------------------------------------------------- cancellation


async def test_cancel_mid_stream_frees_the_worker(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    pids = pool.snapshot()["pids"]
    job = pool.submit(LONG, LONG_SAMPLING)
    got: list[str] = []

    async def consume() -> None:
        async for delta in job.stream():
            got.append(delta)
            if len(got) == 3:
                job.cancel()

    with pytest.raises(Cancelled) as info:
        await asyncio.wait_for(consume(), BOUND_S)
    assert info.value.code == "cancelled"
    assert len(got) == 3  # nothing is delivered after cancel()
    assert job.state == "finished" and job.stats["outcome"] == "cancelled"
    assert job.stats["cancelled"] is True and job.stats["tokens"] < LONG_SAMPLING.max_tokens
    snap = pool.snapshot()
    assert snap["busy"] == 0 and snap["pids"] == pids  # stopped politely, not killed
    await assert_serves(pool)


async def test_consumer_leaving_the_stream_cancels_the_job(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    job = pool.submit(LONG, LONG_SAMPLING)

    async def read_two() -> None:
        async with aclosing(job.stream()) as stream:
            n = 0
            async for _ in stream:
                n += 1
                if n == 2:
                    break

    await asyncio.wait_for(read_two(), BOUND_S)
    await wait_until(lambda: job.state == "finished", "the abandoned job to finish")
    assert job.stats["outcome"] == "cancelled" and job.stats["tokens"] < LONG_SAMPLING.max_tokens
    assert pool.snapshot()["busy"] == 0
    await assert_serves(pool)


# ---------------------------------------------------------------- queue bound


async def test_max_queue_zero_refuses_while_busy(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_queue=0)
    long = pool.submit(LONG, LONG_SAMPLING)
    assert long.state == "running"
    with pytest.raises(Busy) as info:
        pool.submit(SHORT, SHORT_SAMPLING)
    assert info.value.code == "busy" and pool.counters["busy"] == 1
    assert pool.snapshot()["busy"] == 1 and pool.snapshot()["queued"] == 0
    long.cancel()
    assert isinstance(await finish_error(long), Cancelled)
    await assert_serves(pool)  # an idle worker accepts work even with max_queue=0


async def test_max_queue_one_queues_one_then_refuses(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_queue=1)
    long = pool.submit(LONG, LONG_SAMPLING)
    long_stream = long.stream()
    await first_deltas(long_stream, 1)
    queued = pool.submit(SHORT, SHORT_SAMPLING)
    assert queued.state == "queued" and pool.snapshot()["queued"] == 1
    with pytest.raises(Busy):
        pool.submit(SHORT, SHORT_SAMPLING)
    long.cancel()
    assert isinstance(await drain_error(long_stream), Cancelled)
    deltas = await collect(queued)  # the queued job runs once the worker is free
    assert deltas and queued.stats["outcome"] == "completed"
    assert pool.snapshot() | {"pids": None} == {"workers": 1, "busy": 0, "queued": 0, "pids": None,
                                                "state": "ready"}


async def test_cancel_of_queued_job_removes_it(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_queue=2)
    long = pool.submit(LONG, LONG_SAMPLING)
    queued = pool.submit(SHORT, SHORT_SAMPLING)
    assert pool.snapshot()["queued"] == 1
    queued.cancel()
    assert queued.state == "finished" and pool.snapshot()["queued"] == 0
    assert isinstance(await finish_error(queued), Cancelled)
    long.cancel()
    assert isinstance(await finish_error(long), Cancelled)


async def test_two_workers_run_two_jobs_at_once(make_pool: PoolFactory) -> None:
    pool = await make_pool(workers=2, max_queue=0)
    snap = pool.snapshot()
    assert snap["workers"] == 2 and len(set(snap["pids"])) == 2
    a, b = pool.submit(LONG, LONG_SAMPLING), pool.submit(LONG, LONG_SAMPLING)
    a_stream, b_stream = a.stream(), b.stream()
    await first_deltas(a_stream, 1)
    await first_deltas(b_stream, 1)
    assert pool.snapshot()["busy"] == 2
    with pytest.raises(Busy):
        pool.submit(SHORT, SHORT_SAMPLING)
    a.cancel()
    b.cancel()
    assert isinstance(await drain_error(a_stream), Cancelled)
    assert isinstance(await drain_error(b_stream), Cancelled)
    assert pool.snapshot()["busy"] == 0


# ---------------------------------------------------------------- timeout and crashes


async def test_infer_timeout_fails_the_job_with_timeout(make_pool: PoolFactory) -> None:
    pool = await make_pool(infer_timeout_s=1.0)
    job = pool.submit(LONG, LONG_SAMPLING)
    err = await finish_error(job)
    assert isinstance(err, Timeout) and err.code == "timeout"
    assert job.stats["outcome"] == "timeout" and job.tokens < LONG_SAMPLING.max_tokens
    assert pool.counters["generations_timeout"] == 1
    pool.infer_timeout_s = 0  # the follow-up job must not race the 1 s limit on a loaded machine
    await assert_serves(pool)


async def test_hung_worker_is_killed_at_the_timeout_and_replaced(make_pool: PoolFactory) -> None:
    pool = await make_pool(infer_timeout_s=2.0)
    (old_pid,) = pool.snapshot()["pids"]
    job = pool.submit(LONG, LONG_SAMPLING)
    stream = job.stream()
    await first_deltas(stream, 1)
    # A hung worker neither decodes nor reads its cancel: only killing it frees the pool.
    os.kill(old_pid, signal.SIGSTOP)
    err = await drain_error(stream)
    assert isinstance(err, Timeout) and err.code == "timeout"
    await wait_until(lambda: old_pid not in live_child_pids(), "the hung worker to be killed and reaped")
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    pool.infer_timeout_s = 0  # the follow-up job must not race the limit on a loaded machine
    nxt = pool.submit(SHORT, SHORT_SAMPLING)
    assert await collect(nxt) and nxt.stats["outcome"] == "completed"
    snap = pool.snapshot()
    assert snap["workers"] == 1 and snap["pids"][0] != old_pid and pool.counters["worker_restarts"] == 1


async def test_killed_worker_fails_its_job_and_is_replaced(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    (old_pid,) = pool.snapshot()["pids"]
    job = pool.submit(LONG, LONG_SAMPLING)
    stream = job.stream()
    await first_deltas(stream, 2)
    os.kill(old_pid, signal.SIGKILL)
    err = await drain_error(stream)
    assert type(err) is EngineError and err.code == "engine_error" and "/" not in err.message
    assert job.stats["outcome"] == "error"
    nxt = pool.submit(SHORT, SHORT_SAMPLING)  # waits for the replacement instead of failing
    deltas = await collect(nxt)
    assert deltas and nxt.stats["outcome"] == "completed"
    snap = pool.snapshot()
    assert snap["workers"] == 1 and len(snap["pids"]) == 1 and snap["pids"][0] != old_pid
    assert pool.counters["worker_restarts"] == 1 and snap["state"] == "ready"


# ---------------------------------------------------------------- model switching


async def test_load_missing_path_keeps_old_workers(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = await make_pool()
    pids = pool.snapshot()["pids"]
    with pytest.raises(ModelLoadError) as info:
        await pool.load(tmp_path / "missing.gguf")
    assert info.value.code == "engine_error" and "/" not in info.value.message
    assert pool.snapshot()["pids"] == pids and pool.state == "ready"
    await assert_serves(pool)


async def test_load_corrupt_model_keeps_old_workers(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = await make_pool()
    pids = pool.snapshot()["pids"]
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelLoadError) as info:
        await asyncio.wait_for(pool.load(bad), BOUND_S)
    assert "/" not in info.value.message
    assert pool.snapshot()["pids"] == pids and pool.state == "ready"
    await wait_until(lambda: not live_child_pids() - set(pids), "the failed candidate workers to exit")
    await assert_serves(pool)


async def test_a_replaced_model_file_does_not_reach_respawned_workers(make_pool: PoolFactory, model_path: Path,
                                                                      tmp_path: Path) -> None:
    # The operator renames a broken file over the serving model's path and reloads: the reload fails
    # and the old model keeps serving, also after a worker dies (its replacement loads the file the
    # pool holds open, not the broken one now at the path).
    path = tmp_path / "model.gguf"
    shutil.copyfile(model_path, path)
    pool = await make_pool(path)
    bad = tmp_path / "incoming.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    os.replace(bad, path)
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(pool.load(path), BOUND_S)
    (old_pid,) = pool.snapshot()["pids"]
    os.kill(old_pid, signal.SIGKILL)
    await wait_until(lambda: pool.counters["worker_restarts"] == 1, "the worker's death to be noticed")
    await assert_serves(pool)
    snap = pool.snapshot()
    assert snap["state"] == "ready" and snap["pids"] and snap["pids"][0] != old_pid
    assert pool.info.get("name") and "/proc" not in str(snap)


async def test_load_switches_workers(make_pool: PoolFactory, model_path: Path) -> None:
    pool = await make_pool()
    old = set(pool.snapshot()["pids"])
    info = await asyncio.wait_for(pool.load(model_path), BOUND_S)
    assert info.get("n_ctx") == 4096
    new = set(pool.snapshot()["pids"])
    assert len(new) == 1 and not new & old and pool.model_path == model_path
    await wait_until(lambda: not live_child_pids() & old, "the retired worker to exit")
    await assert_serves(pool)


# ---------------------------------------------------------------- not ready, close


async def test_pool_without_model_is_not_ready(make_pool: PoolFactory) -> None:
    pool = await make_pool(None)
    assert pool.state == "empty" and pool.snapshot()["pids"] == []
    with pytest.raises(NotReady) as info:
        pool.submit(SHORT, SHORT_SAMPLING)
    assert info.value.code == "not_ready" and info.value.message == "no LLM model configured"


async def test_pool_with_missing_model_fails_and_is_not_ready(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = await make_pool(tmp_path / "nope.gguf")
    assert pool.state == "failed" and pool.snapshot()["pids"] == []
    with pytest.raises(NotReady) as info:
        pool.submit(SHORT, SHORT_SAMPLING)
    assert "/" not in info.value.message


async def test_unstarted_pool_is_not_ready(model_path: Path) -> None:
    pool = LlmPool(model_path, PARAMS)
    with pytest.raises(NotReady):
        pool.submit(SHORT, SHORT_SAMPLING)


async def test_close_stops_every_worker_and_cancels_jobs(make_pool: PoolFactory) -> None:
    pool = await make_pool(workers=2)
    pids = pool.snapshot()["pids"]
    assert len(pids) == 2 and set(pids) <= live_child_pids()
    running = pool.submit(LONG, LONG_SAMPLING)
    stream = running.stream()
    await first_deltas(stream, 1)
    await asyncio.wait_for(pool.close(), BOUND_S)
    assert isinstance(await drain_error(stream), Cancelled)
    assert not set(pids) & live_child_pids()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # joined, so reaped: no zombie either
    assert pool.snapshot() == {"workers": 0, "busy": 0, "queued": 0, "pids": [], "state": "stopped"}
    with pytest.raises(NotReady):
        pool.submit(SHORT, SHORT_SAMPLING)


class _ScriptedEngine:
    """Stands in for LlamaEngine inside _worker_main (this test is about the worker's loop, not the model)."""

    def __init__(self, path: Path, params: LlmParams) -> None:
        self.path = path

    def warm_up(self) -> None:
        pass

    def stream(self, messages: Any, sampling: Any, should_stop: Callable[[], bool]) -> Any:
        yield from ("Hello", " there.")

    def describe(self) -> dict[str, Any]:
        return {"name": "scripted", "n_ctx": 64}


def test_an_idle_worker_hands_freed_heap_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The worker trims once it has been idle (after warm-up and after every answer), never while a
    # request waits: its resting RSS no longer keeps the high-water mark of the last generation.
    import threading

    from local_ai_server import llm_pool
    from local_ai_server.engines import llm as llm_engine

    events: list[str] = []
    monkeypatch.setattr(llm_engine, "LlamaEngine", _ScriptedEngine)
    def trim(pad: int) -> int:
        events.append("trim")
        return 1

    monkeypatch.setattr(llm_pool, "malloc_trim", lambda: trim)
    monkeypatch.setattr(llm_pool, "IDLE_TRIM_S", 0.05)
    parent, child = multiprocessing.Pipe()

    def trims(n: int) -> None:
        """Wait (bounded) until the worker has trimmed n times; a missing trim fails the asserts below."""
        deadline = time.monotonic() + 10
        while events.count("trim") < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def drive() -> None:
        """The pool's side of the pipe: wait for ready, ask for one answer, read it, then stop."""
        try:
            events.append(parent.recv()[0])
            trims(1)
            parent.send(("gen", 1, SHORT, SHORT_SAMPLING))
            while (kind := parent.recv()[0]) != "done":
                events.append(kind)
            events.append(kind)
            trims(2)
        finally:
            parent.send(("stop",))

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    previous = signal.getsignal(signal.SIGINT)
    try:
        llm_pool._worker_main(child, str(tmp_path / "model.gguf"), PARAMS)  # main thread: it sets SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)
        gc.unfreeze()  # the worker froze this test process's objects as if they were its start-up state
    thread.join(BOUND_S)
    assert events[0] == "ready" and events[1] == "trim"
    assert events[-1] == "trim" and events[-2] == "done"
    assert "trim" not in events[2:-2], events  # not between the request and its answer
