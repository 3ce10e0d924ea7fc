"""Dedicated LLM process pool: one model per spawned worker, streamed tokens, cancellation, respawn.

The worker process is llm_worker's, the queue and job outcomes llm_sched's; this module owns the workers'
lives (spawn, death, replacement, model switching) and is what the rest of the server imports.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from .engines.llm import LlmParams
from .errors import Cancelled, EngineError, ModelLoadError, describe
from .heap import malloc_trim
from .llm_sched import KILL_GRACE_S, LlmJob, Scheduler, _Worker
from .llm_worker import (
    COALESCE_LATE_S,
    COALESCE_S,
    FAST_PHASE_S,
    IDLE_TRIM_S,
    Engine,
    EngineFactory,
    llama_engine,
    serve,
)
from .tasks import TaskOwner

__all__ = [
    "COALESCE_LATE_S", "COALESCE_S", "FAST_PHASE_S", "IDLE_TRIM_S", "KILL_GRACE_S", "Engine", "EngineFactory",
    "LlmJob", "LlmPool", "llama_engine",
]

log = structlog.get_logger(__name__)


def _worker_main(
    conn: Connection,
    model_path: str | None,
    params: LlmParams,
    pinned: str | None = None,
    engine_factory: EngineFactory = llama_engine,
) -> None:
    """Worker process entry: llm_worker.serve, with the idle-trim settings of this module (tests tune them)."""
    serve(conn, model_path, params, pinned, engine_factory, trim_factory=malloc_trim, idle_trim_s=IDLE_TRIM_S)


class LlmPool(Scheduler):
    """A fixed number of worker processes, each holding one loaded model, fed from a bounded queue.

    `engine_factory` makes each worker's engine inside the worker process (llama-cpp-python by default);
    it must be picklable: a top-level function, or an instance of a top-level class.
    """

    def __init__(
        self,
        model_path: Path | None,
        params: LlmParams,
        *,
        workers: int = 1,
        max_queue: int = 8,
        infer_timeout_s: float = 60.0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        engine_factory: EngineFactory = llama_engine,
        scheduling: str = "priority",
    ) -> None:
        super().__init__(
            state="empty" if model_path is None else "loading",
            error=None if model_path is not None else "no LLM model configured",
            max_queue=max_queue,
            infer_timeout_s=infer_timeout_s,
            on_event=on_event,
            scheduling=scheduling,
        )
        self.model_path = model_path
        self.params = params
        self.size = max(1, workers)
        self.engine_factory = engine_factory
        self.info: dict[str, Any] = {}
        self._ctx = multiprocessing.get_context("spawn")
        self._closing = False
        self._load_lock = asyncio.Lock()
        self.tasks = TaskOwner("llm-pool")  # respawns: none outlives close()
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
            target=_worker_main, args=(child_conn, w.model_path, self.params, w.pinned, self.engine_factory),
            daemon=True,
            name=f"llm-worker-{w.index}",
        )
        w.proc, w.conn = proc, parent_conn
        w.ready_future = self._loop.create_future()
        def start() -> None:
            proc.start()
            # Thread.start() waits until the new thread runs: on a busy machine, a wait for a core.
            threading.Thread(target=self._reader, args=(w,), daemon=True, name=f"llm-reader-{w.index}").start()

        # Process.start() forks a spawn helper and can stall the loop for tens of ms: both off the loop.
        await self._loop.run_in_executor(None, start)
        child_conn.close()
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
        self._fail_queued("cancelled", Cancelled("server shutting down"))
        workers = list(self._workers)
        for w in workers:
            for job in list(w.jobs.values()):
                self._finish(job, "cancelled", Cancelled("server shutting down"))
            self._send(w, ("stop",))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._join_all, workers, timeout)
        await self.tasks.aclose()
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

    # ------------------------------------------------------------------ worker deaths

    def _on_exit(self, w: _Worker) -> None:
        """A worker's pipe closed: fail its job, and replace it if it was serving."""
        if w.ready_future is not None and not w.ready_future.done():
            w.ready_future.set_result("the LLM worker exited while loading the model")
        was_serving = w.ready and not w.retiring
        self._fail_running(w)
        if w.proc is not None and self._loop is not None and not self._closing:
            # The pipe closes a moment before the kernel marks the process exited: reap it off the loop,
            # or it would linger as a zombie (close() reaps every worker itself: a pipe that closes after it
            # must not ask the loop for a thread, which may be going away with the loop).
            self._loop.run_in_executor(None, w.reap, 10.0)
        if self._closing:
            return
        if w in self._workers and (was_serving or w.killed_for_timeout):
            self.counters["worker_restarts"] += 1
            self._on_event("worker_restart", {"worker": w.index})
            log.warning("llm.worker_died", worker=w.index, pid=w.pid, exitcode=getattr(w.proc, "exitcode", None))
            replacement = _Worker(index=w.index, model_path=w.model_path, pinned=self._pinned_path(w.model_path))
            self._workers[self._workers.index(w)] = replacement
            self.tasks.spawn(self._respawn(replacement), name=f"llm-respawn-{w.index}")
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
                self._fail_queued("error", EngineError(self.error))
        self._dispatch()
        self._emit()

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
                if not w.jobs:
                    self._send(w, ("stop",))
                else:
                    # Keep a busy old worker reachable so its job still gets its messages.
                    self._workers.append(w)
            self.model_path, self.state, self.error = model_path, "ready", None
            self.info = new[0].info
            self._dispatch()
            self._emit()
            return self.info
