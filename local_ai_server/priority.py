"""Critical path first: the urgency levels of work, and a bounded thread executor that serves by urgency.

A caller who waits in silence for the first audio of an answer must not wait behind work whose result is
only needed later (another answer's tail, a sentence that plays in ten seconds, a partial transcript).
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import Busy

T = TypeVar("T")

# Urgency of an LLM generation, most urgent first. A caller hears nothing until its first sentence;
# REFILL: its audio already sent is about to run out; BACKGROUND: its audio reaches far enough ahead;
# HELD: far enough ahead that generating more now would only be wasted by a barge-in (paced).
URGENT, REFILL, BACKGROUND, HELD = 0, 1, 2, 3

# The STT threads serve a final transcript (a caller waits for the answer it starts) before a turn score
# (when a turn ends) before a partial (only what is shown while the caller speaks).
STT_PRIORITY = {"final": 0, "turn": 1, "partial": 2}


# Executors still running. At interpreter exit each is stopped and its threads end after the call they are
# in: a daemon thread killed inside native code (a CTranslate2 transcription, Piper) aborts the process
# ("terminate called without an active exception"). ThreadPoolExecutor does the same.
_LIVE: weakref.WeakSet[PriorityExecutor] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for ex in list(_LIVE):
        ex.shutdown(wait=False)


# Runs before the interpreter joins its non-daemon threads (the hook concurrent.futures uses).
threading._register_atexit(_stop_all_at_exit)  # type: ignore[attr-defined]


class PriorityExecutor:
    """A fixed set of threads serving a bounded queue in order of (priority, submission); lowest first.

    With `fifo` the priority is ignored: submission order alone, as a ThreadPoolExecutor serves. Its
    threads are not daemons: at exit they finish the call they are in (see _stop_all_at_exit).
    """

    def __init__(self, workers: int, *, name: str, max_queue: int = 256, fifo: bool = False) -> None:
        self.max_queue = max_queue
        self.fifo = fifo
        self._heap: list[tuple[float, int, concurrent.futures.Future[Any], Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._shutdown = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}_{i}")
                         for i in range(max(1, workers))]
        _LIVE.add(self)
        for t in self._threads:
            t.start()

    def submit(self, priority: float, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue `fn(*args)`; raises Busy when the queue is full, RuntimeError after shutdown."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("executor is shut down")
            if len(self._heap) >= self.max_queue:
                raise Busy("too much work queued; try again shortly")
            seq = next(self._seq)
            heapq.heappush(self._heap, (0.0 if self.fifo else priority, seq, fut, lambda: fn(*args)))
            self._cond.notify()
        return fut

    def queued(self) -> int:
        """Work waiting for a thread."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._shutdown:
                    self._cond.wait()
                if not self._heap:
                    return
                _, _, fut, call = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        """Stop taking work; cancel what waits (if asked) and let the threads end."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for _, _, fut, _ in self._heap:
                    fut.cancel()
                self._heap.clear()
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()
