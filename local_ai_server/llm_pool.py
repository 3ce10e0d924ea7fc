"""Dedicated LLM process pool: one model per spawned worker, streamed tokens, cancellation, respawn."""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from .engines.llm import LlmParams, SamplingParams
from .errors import Busy, Cancelled, EngineError, ModelLoadError, NotReady, ServerError, Timeout, describe
from .heap import malloc_trim

log = structlog.get_logger(__name__)

# Grace between asking a worker to stop a timed-out generation and killing it.
KILL_GRACE_S = 2.0
# Longest a generated token waits in the worker to travel with the next ones: briefly while the first
# sentence is being written (the caller waits for it), longer after that (later sentences are spoken
# while earlier ones play, so nobody waits for them). Every message wakes the server and the client,
# and on a small machine each wake-up stalls the decode: fewer messages, faster tokens.
COALESCE_S = 0.025
COALESCE_LATE_S = 0.1
FAST_PHASE_S = 1.0
# A worker idle this long hands its freed heap back to the OS (glibc keeps it otherwise); back-to-back
# requests never wait for the trim.
IDLE_TRIM_S = 1.0


def _worker_main(conn: Connection, model_path: str | None, params: LlmParams, pinned: str | None = None) -> None:
    """Worker process entry: load the model once, then serve generate/load/stop requests.

    `pinned` names the very file the other workers loaded (the parent's open descriptor of it), so a
    replacement worker loads that model even if the path has been replaced since.
    """
    # The parent owns Ctrl-C and SIGTERM handling; a worker only stops when told or when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .engines.llm import LlamaEngine

    engine: LlamaEngine | None = None
    try:
        if model_path is None:
            raise FileNotFoundError(model_path)
        source = pinned if pinned is not None and os.path.isfile(pinned) else model_path
        engine = LlamaEngine(Path(source), params)
        engine.path = Path(model_path)  # what status reports, not /proc/<pid>/fd/<n>
        engine.warm_up()
        # What loading made lives as long as the worker: keep it out of the collection after each answer.
        gc.collect()
        gc.freeze()
        conn.send(("ready", engine.describe(), None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("ready", None, describe(exc)))
        return
    stop_after = False
    trim = malloc_trim()
    trimmed = False  # loading and warm-up freed a lot
    while not stop_after:
        try:
            if trim is not None and not trimmed and not conn.poll(IDLE_TRIM_S):
                trim(0)
                trimmed = True
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent is gone: exit rather than linger as an orphan
        kind = msg[0]
        if kind == "stop":
            return
        if kind != "gen":
            continue  # a late cancel for a finished job
        _, job_id, messages, sampling = msg
        trimmed = False
        cancelled = False
        tokens = 0
        t0 = time.monotonic()
        first: float | None = None

        def should_stop(job_id: int = job_id) -> bool:
            nonlocal cancelled, stop_after
            while conn.poll():
                try:
                    m = conn.recv()
                except (EOFError, OSError):
                    stop_after = cancelled = True
                    return True
                if m[0] == "cancel" and m[1] == job_id:
                    cancelled = True
                elif m[0] == "stop":
                    stop_after = cancelled = True
            return cancelled

        try:
            # Tokens are coalesced for up to COALESCE_S (the first goes at once): a pipe message and a loop
            # wake-up per token cost the decode a measurable share of the cores on a small machine.
            pending: list[str] = []
            last_send = 0.0
            for delta in engine.stream(messages, sampling, should_stop):
                tokens += 1
                now = time.monotonic()
                if first is None:
                    first = now
                pending.append(delta)
                window = COALESCE_S if now - first < FAST_PHASE_S else COALESCE_LATE_S
                if now - last_send >= window or tokens == 1:
                    conn.send(("tok", job_id, "".join(pending), len(pending)))
                    pending.clear()
                    last_send = now
            if pending:
                conn.send(("tok", job_id, "".join(pending), len(pending)))
            elapsed = time.monotonic() - t0
            decode_s = elapsed - ((first or t0) - t0)
            conn.send(
                (
                    "done",
                    job_id,
                    {
                        "tokens": tokens,
                        "cancelled": cancelled,
                        "first_token_ms": None if first is None else round((first - t0) * 1000, 1),
                        "total_ms": round(elapsed * 1000, 1),
                        "decode_tok_s": round((tokens - 1) / decode_s, 2) if tokens > 1 and decode_s > 0 else None,
                    },
                )
            )
        except (BrokenPipeError, EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - the request fails, the worker lives on
            conn.send(("err", job_id, describe(exc)))


@dataclass(eq=False)
class LlmJob:
    """One generation request: queued, then running on one worker, then finished."""

    id: int
    messages: list[tuple[str, str]]
    sampling: SamplingParams
    pool: LlmPool
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

    def cancel(self) -> None:
        """Stop this job: dequeue it, or tell its worker to stop generating."""
        self.pool._cancel(self)


@dataclass(eq=False)
class _Worker:
    """Parent-side handle of one worker process."""

    index: int
    model_path: str
    pinned: str | None = None  # see _worker_main
    proc: Any = None
    conn: Connection | None = None
    ready: bool = False
    retiring: bool = False
    job: LlmJob | None = None
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


class LlmPool:
    """A fixed number of worker processes, each holding one loaded model, fed from a bounded queue."""

    def __init__(
        self,
        model_path: Path | None,
        params: LlmParams,
        *,
        workers: int = 1,
        max_queue: int = 8,
        infer_timeout_s: float = 60.0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.model_path = model_path
        self.params = params
        self.size = max(1, workers)
        self.max_queue = max_queue
        self.infer_timeout_s = infer_timeout_s
        self.state = "empty" if model_path is None else "loading"
        self.error: str | None = None if model_path is not None else "no LLM model configured"
        self.info: dict[str, Any] = {}
        self._on_event = on_event or (lambda _name, _data: None)
        self._workers: list[_Worker] = []
        self._queue: collections.deque[LlmJob] = collections.deque()
        self._ids = itertools.count(1)
        self._ctx = multiprocessing.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._load_lock = asyncio.Lock()
        self.counters: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pin: tuple[str, int] | None = None  # (model path, open descriptor of the file serving)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Spawn the workers and wait until their model is loaded (or failed)."""
        self._loop = asyncio.get_running_loop()
        if self.model_path is None:
            return
        try:
            workers = await self._spawn_set(str(self.model_path))
        except ModelLoadError as exc:
            self.state, self.error = "failed", exc.message
            log.warning("llm.load_failed", error=exc.message)
            return
        self._workers = workers
        self._pin_model(str(self.model_path))
        self.state, self.error = "ready", None
        self.info = workers[0].info
        self._emit()

    def _pin_model(self, model_path: str) -> None:
        """Hold the serving model file open, so replacement workers load the model the others run.

        An operator who puts a new (or broken) file at the same path and reloads gets an error if it
        does not load, and the old model keeps serving; without the pin, the next worker that died would
        be respawned from the new file and fail. Linux only (/proc); elsewhere replacements use the path.
        """
        self._unpin()
        try:
            fd = os.open(model_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            log.warning("llm.pin_failed", error=describe(exc))
            return
        self._pin = (model_path, fd)

    def _unpin(self) -> None:
        if self._pin is not None:
            os.close(self._pin[1])
            self._pin = None

    def _pinned_path(self, model_path: str) -> str | None:
        """The /proc path of the pinned file if `model_path` is the one pinned, else None."""
        if self._pin is None or self._pin[0] != model_path or not os.path.isdir("/proc/self/fd"):
            return None
        return f"/proc/{os.getpid()}/fd/{self._pin[1]}"

    async def _spawn_set(self, model_path: str) -> list[_Worker]:
        """Start `size` workers on `model_path`; all or nothing."""
        if not Path(model_path).is_file():
            raise ModelLoadError("LLM model file not found")
        new = [_Worker(index=i, model_path=model_path) for i in range(self.size)]
        results = await asyncio.gather(*(self._spawn(w) for w in new))
        errors = [r for r in results if r is not None]
        if errors:
            for w in new:
                self._stop_worker(w)
            raise ModelLoadError(f"LLM model could not be loaded ({errors[0]})")
        return new

    async def _spawn(self, w: _Worker) -> str | None:
        """Start one worker process (off the loop) and wait for its ready message."""
        assert self._loop is not None
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, w.model_path, self.params, w.pinned), daemon=True,
            name=f"llm-worker-{w.index}",
        )
        w.proc, w.conn = proc, parent_conn
        w.ready_future = self._loop.create_future()
        # Process.start() forks a spawn helper and can stall the loop for tens of ms.
        await self._loop.run_in_executor(None, proc.start)
        child_conn.close()
        threading.Thread(target=self._reader, args=(w,), daemon=True, name=f"llm-reader-{w.index}").start()
        error = await w.ready_future
        log.info("llm.worker_started", worker=w.index, pid=proc.pid, ok=error is None, error=error)
        return error

    def _reader(self, w: _Worker) -> None:
        """Thread: forward the worker's messages to the loop; report its death."""
        assert self._loop is not None and w.conn is not None
        conn = w.conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._loop.call_soon_threadsafe(self._on_message, w, msg)
            except RuntimeError:
                return  # loop closed during shutdown
        try:
            self._loop.call_soon_threadsafe(self._on_exit, w)
        except RuntimeError:
            pass

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every worker: politely, then by force; cancels queued and running jobs."""
        self._closing = True
        for job in list(self._queue):
            self._finish(job, "cancelled", Cancelled("server shutting down"))
        self._queue.clear()
        workers = list(self._workers)
        for w in workers:
            if w.job is not None:
                self._finish(w.job, "cancelled", Cancelled("server shutting down"))
            self._send(w, ("stop",))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._join_all, workers, timeout)
        self._workers = []
        self._unpin()
        self.state = "stopped"

    @staticmethod
    def _join_all(workers: list[_Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in workers:
            w.reap(max(0.0, deadline - time.monotonic()), kill=True)

    def _stop_worker(self, w: _Worker) -> None:
        self._send(w, ("stop",))
        if w.proc is not None and w.proc.is_alive():
            # Stopping a failed set: it never served, so killing it loses nothing.
            w.proc.kill()

    # ------------------------------------------------------------------ requests

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> LlmJob:
        """Queue a generation; raises NotReady without a model, Busy when the queue is full."""
        # A worker being replaced after a crash still counts: the job waits for it rather than failing.
        if self.state != "ready" or not self._workers:
            raise NotReady(self.error or f"LLM is {self.state}")
        if len(self._queue) >= self.max_queue and not any(
            w.ready and not w.retiring and w.job is None for w in self._workers
        ):
            self.counters["busy"] += 1
            raise Busy("the LLM queue is full; try again shortly")
        job = LlmJob(id=next(self._ids), messages=messages, sampling=sampling, pool=self)
        self._queue.append(job)
        self._dispatch()
        self._emit()
        return job

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers."""
        assert self._loop is not None
        for w in self._workers:
            if not self._queue:
                break
            if not w.ready or w.retiring or w.job is not None:
                continue
            job = self._queue.popleft()
            job.state, job.worker, w.job = "running", w, job
            self._send(w, ("gen", job.id, job.messages, job.sampling))
            if self.infer_timeout_s > 0:
                job.timer = self._loop.call_later(self.infer_timeout_s, self._on_timeout, job)

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
            if w.job is job and w.proc is not None and w.proc.is_alive():
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

    # ------------------------------------------------------------------ worker events

    def _on_message(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            _, info, error = msg
            if error is None:
                w.ready, w.info = True, info or {}
            if w.ready_future is not None and not w.ready_future.done():
                w.ready_future.set_result(error)
            self._dispatch()
            return
        job = w.job
        if job is None or job.id != msg[1]:
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
            if job.timed_out:
                self._finish(job, "timeout", Timeout("the LLM did not finish in time"))
            elif msg[2].get("cancelled") or job.cancel_requested:
                self._finish(job, "cancelled", Cancelled("cancelled"))
            else:
                self._finish(job, "completed", None)
            self._release(w)
        elif kind == "err":
            self._finish(job, "error", EngineError(f"LLM error: {msg[2]}"))
            self._release(w)

    def _release(self, w: _Worker) -> None:
        w.job = None
        if w.retiring:
            self._send(w, ("stop",))
        self._dispatch()
        self._emit()

    def _on_exit(self, w: _Worker) -> None:
        """A worker's pipe closed: fail its job, and replace it if it was serving."""
        if w.ready_future is not None and not w.ready_future.done():
            w.ready_future.set_result("the LLM worker exited while loading the model")
        job = w.job
        was_serving = w.ready and not w.retiring
        w.ready, w.job = False, None
        if job is not None:
            if w.killed_for_timeout or job.timed_out:
                self._finish(job, "timeout", Timeout("the LLM did not finish in time"))
            elif job.cancel_requested:
                self._finish(job, "cancelled", Cancelled("cancelled"))
            else:
                self._finish(job, "error", EngineError("the LLM worker stopped unexpectedly"))
        if w.proc is not None and self._loop is not None:
            # The pipe closes a moment before the kernel marks the process exited: reap it off the loop,
            # or it would linger as a zombie.
            self._loop.run_in_executor(None, w.reap, 10.0)
        if self._closing:
            return
        if w in self._workers and (was_serving or w.killed_for_timeout):
            self.counters["worker_restarts"] += 1
            self._on_event("worker_restart", {"worker": w.index})
            log.warning("llm.worker_died", worker=w.index, pid=w.pid, exitcode=getattr(w.proc, "exitcode", None))
            replacement = _Worker(index=w.index, model_path=w.model_path, pinned=self._pinned_path(w.model_path))
            self._workers[self._workers.index(w)] = replacement
            # Keep a reference: the loop holds tasks only weakly.
            task = asyncio.ensure_future(self._respawn(replacement))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif w in self._workers and w.retiring:
            self._workers.remove(w)
        self._dispatch()
        self._emit()

    async def _respawn(self, w: _Worker) -> None:
        error = await self._spawn(w)
        if error is not None:
            log.error("llm.respawn_failed", worker=w.index, error=error)
            if not any(x.ready for x in self._workers):
                self.state, self.error = "failed", f"LLM worker could not be restarted ({error})"
                for job in list(self._queue):
                    self._finish(job, "error", EngineError(self.error))
                self._queue.clear()
        self._dispatch()
        self._emit()

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

    # ------------------------------------------------------------------ model switching

    async def load(self, model_path: Path) -> dict[str, Any]:
        """Switch every worker to `model_path`; the old workers keep serving until the new ones are ready."""
        async with self._load_lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            new = await self._spawn_set(str(model_path))  # raises ModelLoadError, old set untouched
            old, self._workers = self._workers, new
            self._pin_model(str(model_path))
            for w in old:
                w.retiring = True
                if w.job is None:
                    self._send(w, ("stop",))
                else:
                    # Keep a busy old worker reachable so its job still gets its messages.
                    self._workers.append(w)
            self.model_path, self.state, self.error = model_path, "ready", None
            self.info = new[0].info
            self._dispatch()
            self._emit()
            return self.info

    # ------------------------------------------------------------------ introspection

    def snapshot(self) -> dict[str, Any]:
        """Pool state for status and metrics."""
        serving = [w for w in self._workers if not w.retiring]
        return {
            "workers": sum(1 for w in serving if w.ready),
            "busy": sum(1 for w in self._workers if w.job is not None),
            "queued": len(self._queue),
            "pids": [w.pid for w in serving if w.pid is not None],
            "state": self.state,
        }
