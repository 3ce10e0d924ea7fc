"""The LLM pool's scheduling: jobs, the bounded queue, handing jobs to workers by urgency, and their outcomes.

Worker processes themselves (spawning, deaths, replacement, model switching) are llm_pool's.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import structlog

from .engines.llm import SamplingParams
from .errors import Busy, Cancelled, EngineError, NotReady, ServerError, Timeout
from .priority import HELD, URGENT

log = structlog.get_logger(__name__)

# Grace between asking a worker to stop a timed-out generation and killing it.
KILL_GRACE_S = 2.0


class EventStream:
    """A job's answer as its events arrive ("tok", "done", or an error): shared by local and remote jobs."""

    events: asyncio.Queue[tuple[str, Any]]
    state: str
    last_tokens: int

    def cancel(self) -> None:
        """Stop the job (each kind of job knows how)."""
        raise NotImplementedError

    def set_priority(self, level: int) -> None:
        """How urgently the caller needs more of this answer (priority.URGENT .. HELD); a hint."""

    async def stream(self) -> AsyncGenerator[str, None]:
        """Yield text deltas; raises the job's ServerError; cancels the job if the consumer stops early."""
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "tok":
                    self.last_tokens = value[1]
                    yield value[0]
                elif kind == "done":
                    return
                else:
                    raise value
        finally:
            if self.state != "finished":
                self.cancel()


@dataclass(eq=False)
class LlmJob(EventStream):
    """One generation request: queued, then running on one worker, then finished."""

    id: int
    messages: list[tuple[str, str]]
    sampling: SamplingParams
    pool: Scheduler
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    state: str = "queued"  # queued | running | finished
    cancel_requested: bool = False
    timed_out: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: int = 0
    last_tokens: int = 0  # model tokens in the delta most recently yielded by stream()
    stats: dict[str, Any] = field(default_factory=dict)
    worker: _Worker | None = None
    timer: asyncio.TimerHandle | None = None
    level: int = URGENT  # see priority.URGENT .. HELD

    def cancel(self) -> None:
        """Stop this job: dequeue it, or tell its worker to stop generating."""
        self.pool._cancel(self)

    def set_priority(self, level: int) -> None:
        """How urgently the caller needs more of this answer (priority.URGENT .. HELD)."""
        self.pool._set_level(self, level)


@dataclass(eq=False)
class _Worker:
    """Parent-side handle of one worker process."""

    index: int
    model_path: str
    pinned: str | None = None  # see llm_worker.serve
    proc: Any = None
    conn: Connection | None = None
    ready: bool = False
    retiring: bool = False
    jobs: dict[int, LlmJob] = field(default_factory=dict)  # running on it (one of them advancing)
    slots: int = 1  # how many jobs it can hold at once (it says so when ready)
    info: dict[str, Any] = field(default_factory=dict)
    ready_future: asyncio.Future[str | None] | None = None
    killed_for_timeout: bool = False
    # One thread at a time may wait for the process: two concurrent waitpid() calls race, and the
    # loser sees ECHILD and leaves multiprocessing believing a dead, reaped worker is still alive.
    reap_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def reap(self, timeout: float, *, kill: bool = False) -> None:
        """Thread: wait up to `timeout` for the process to exit (killing it then if `kill`), then reap it."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        if not self.reap_lock.acquire(timeout=max(0.0, timeout)):
            if kill:
                self.proc.kill()
            self.reap_lock.acquire()
        try:
            self.proc.join(max(0.0, deadline - time.monotonic()))
            if kill and self.proc.exitcode is None:
                self.proc.kill()
                self.proc.join(5.0)
        finally:
            self.reap_lock.release()


class Scheduler:
    """A bounded queue of jobs fed to the workers of `_workers`, critical path first; LlmPool supplies them.

    With scheduling "priority" a worker whose engine can park answers holds several: a new answer (a
    caller waits in silence for its first sentence) joins a worker whose answers are all further along,
    and the worker advances it first, pausing their tails. With "fifo" a worker holds one answer at a
    time, first come, first served.
    """

    def __init__(
        self,
        *,
        state: str,
        error: str | None,
        max_queue: int,
        infer_timeout_s: float,
        on_event: Callable[[str, dict[str, Any]], None] | None,
        scheduling: str = "priority",
    ) -> None:
        self.state = state
        self.error = error
        self.max_queue = max_queue
        self.infer_timeout_s = infer_timeout_s
        self.scheduling = scheduling
        self._on_event = on_event or (lambda _name, _data: None)
        self._workers: list[_Worker] = []
        self._queue: collections.deque[LlmJob] = collections.deque()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> LlmJob:
        """Queue a generation; raises NotReady without a model, Busy when the queue is full."""
        # A worker being replaced after a crash still counts: the job waits for it rather than failing.
        if self.state != "ready" or not self._workers:
            raise NotReady(self.error or f"LLM is {self.state}")
        if len(self._queue) >= self.max_queue and self._place(URGENT) is None:
            self.counters["busy"] += 1
            raise Busy("the LLM queue is full; try again shortly")
        job = LlmJob(id=next(self._ids), messages=messages, sampling=sampling, pool=self)
        self._queue.append(job)
        self._dispatch()
        self._emit()
        return job

    def _takes(self, w: _Worker, level: int) -> bool:
        """Whether worker `w` can start a job of urgency `level` now: it is idle, or (priority) it has a free
        slot and every answer it holds is less urgent."""
        if not w.ready or w.retiring:
            return False
        if not w.jobs:
            return True
        return (self.scheduling == "priority" and len(w.jobs) < w.slots
                and min(j.level for j in w.jobs.values()) > level)

    def _place(self, level: int) -> _Worker | None:
        """The worker a job of urgency `level` starts on now: an idle one, else the one whose answers are
        least urgent; None: it waits."""
        takers = [w for w in self._workers if self._takes(w, level)]
        if not takers:
            return None
        return min(takers, key=lambda w: (len(w.jobs) > 0, -min((j.level for j in w.jobs.values()), default=0)))

    def _dispatch(self) -> None:
        """Hand queued jobs to workers that can start them now."""
        assert self._loop is not None
        for job in list(self._queue):
            w = self._place(job.level)
            if w is None:
                continue
            self._queue.remove(job)
            job.state, job.worker, w.jobs[job.id] = "running", w, job
            self._on_event("queue_wait", {"seconds": time.monotonic() - job.submitted})
            self._send(w, ("gen", job.id, job.messages, job.sampling, job.level))
            if len(w.jobs) > 1:
                self.counters["preemptions"] += 1
            self._arm(job)

    def _arm(self, job: LlmJob) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if self.infer_timeout_s > 0 and job.level < HELD:
            assert self._loop is not None
            job.timer = self._loop.call_later(self.infer_timeout_s, self._on_timeout, job)

    def _set_level(self, job: LlmJob, level: int) -> None:
        """A job's urgency changed: tell its worker, and let queued work in if it can now overtake."""
        if self.scheduling != "priority" or job.state == "finished" or job.level == level:
            return
        was_held, job.level = job.level >= HELD, level
        if job.state == "running" and job.worker is not None:
            self._send(job.worker, ("level", job.id, level))
            # A paced answer's limit runs while it may generate: waiting for playback is not a hang.
            if was_held != (level >= HELD):
                self._arm(job)
        self._dispatch()

    def _cancel(self, job: LlmJob) -> None:
        if job.state == "queued":
            try:
                self._queue.remove(job)
            except ValueError:
                pass
            self._finish(job, "cancelled", Cancelled("cancelled"))
        elif job.state == "running" and not job.cancel_requested:
            job.cancel_requested = True
            if job.worker is not None:
                self._send(job.worker, ("cancel", job.id))

    def _on_timeout(self, job: LlmJob) -> None:
        """A generation ran past its limit: ask the worker to stop, then kill it if it won't."""
        if job.state != "running" or job.worker is None:
            return
        job.timed_out = True
        w = job.worker
        self._send(w, ("cancel", job.id))
        log.warning("llm.timeout", job=job.id, worker=w.index, limit_s=self.infer_timeout_s)

        def kill() -> None:
            if w.jobs.get(job.id) is job and w.proc is not None and w.proc.is_alive():
                w.killed_for_timeout = True
                w.proc.kill()

        assert self._loop is not None
        self._loop.call_later(KILL_GRACE_S, kill)

    def _send(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        if w.conn is None:
            return
        try:
            w.conn.send(msg)
        except (BrokenPipeError, OSError, ValueError):
            pass  # the reader thread reports the death

    def _on_message(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        """A message from worker `w` (on the loop): its readiness, or a token, end or error of one of its jobs."""
        kind = msg[0]
        if kind == "ready":
            error = msg[2]
            if error is None:
                w.ready, w.info = True, msg[1] or {}
                w.slots = max(1, msg[3]) if len(msg) > 3 else 1
            if w.ready_future is not None and not w.ready_future.done():
                w.ready_future.set_result(error)
            self._dispatch()
            return
        job = w.jobs.get(msg[1])
        if job is None:
            return  # a message about a job we already gave up on
        if kind == "tok":
            if job.first_token_at is None:
                job.first_token_at = time.monotonic()
            job.tokens += msg[3]
            self.counters["tokens"] += msg[3]
            if not job.cancel_requested:
                job.events.put_nowait(("tok", (msg[2], msg[3])))
        elif kind == "done":
            job.stats = msg[2]
            self.counters["switches"] += msg[2].get("switches", 0)
            if job.timed_out:
                self._finish(job, "timeout", Timeout("the LLM did not finish in time"))
            elif msg[2].get("cancelled") or job.cancel_requested:
                self._finish(job, "cancelled", Cancelled("cancelled"))
            else:
                self._finish(job, "completed", None)
            self._release(w, job)
        elif kind == "err":
            self._finish(job, "error", EngineError(f"LLM error: {msg[2]}"))
            self._release(w, job)

    def _release(self, w: _Worker, job: LlmJob) -> None:
        w.jobs.pop(job.id, None)
        if w.retiring and not w.jobs:
            self._send(w, ("stop",))
        self._dispatch()
        self._emit()

    def _fail_running(self, w: _Worker) -> None:
        """Worker `w` is gone: end the jobs it held with what became of each."""
        jobs = list(w.jobs.values())
        w.ready = False
        w.jobs.clear()
        for job in jobs:
            if job.timed_out:
                self._finish(job, "timeout", Timeout("the LLM did not finish in time"))
            elif job.cancel_requested:
                self._finish(job, "cancelled", Cancelled("cancelled"))
            else:
                self._finish(job, "error", EngineError("the LLM worker stopped unexpectedly"))

    def _fail_queued(self, outcome: str, error: ServerError) -> None:
        """End every queued job with `error` (shutdown, or no worker left to serve them)."""
        for job in list(self._queue):
            self._finish(job, outcome, error)
        self._queue.clear()

    def _finish(self, job: LlmJob, outcome: str, error: ServerError | None) -> None:
        if job.state == "finished":
            return
        job.state = "finished"
        if job.timer is not None:
            job.timer.cancel()
        self.counters[f"generations_{outcome}"] += 1
        job.stats.setdefault("outcome", outcome)
        job.stats["outcome"] = outcome
        if error is None:
            job.events.put_nowait(("done", job.stats))
        else:
            job.events.put_nowait(("err", error))
        self._on_event("generation", {"outcome": outcome, "tokens": job.tokens, **job.stats})

    def _emit(self) -> None:
        self._on_event("pool", self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """Pool state for status and metrics."""
        serving = [w for w in self._workers if not w.retiring]
        return {
            "workers": sum(1 for w in serving if w.ready),
            # Busy: no room for a new answer now (a worker pausing only tails for one is not busy).
            "busy": sum(1 for w in self._workers if w.jobs and not self._takes(w, URGENT)),
            "queued": len(self._queue),
            "pids": [w.pid for w in serving if w.pid is not None],
            "state": self.state,
        }
