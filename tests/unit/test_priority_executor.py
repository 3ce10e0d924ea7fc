"""The STT / TTS threads' executor: served by priority (then arrival), bounded, cancellable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_ai_server.errors import Busy
from local_ai_server.priority import PriorityExecutor
from tests.paths import REPO

BOUND_S = 10.0


@pytest.fixture
def gated() -> Iterator[tuple[PriorityExecutor, threading.Event, list[str]]]:
    """A one-thread executor whose thread is held busy until the gate opens; `ran` records the order."""
    ex = PriorityExecutor(1, name="test", max_queue=4)
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        started.set()
        gate.wait(BOUND_S)

    ex.submit(0, hold)
    assert started.wait(BOUND_S)
    yield ex, gate, ran
    gate.set()
    ex.shutdown(wait=True)


def test_the_most_urgent_work_goes_first_then_first_come(gated: tuple[PriorityExecutor, threading.Event,
                                                                       list[str]]) -> None:
    ex, gate, ran = gated
    futs = [ex.submit(p, ran.append, name) for p, name in ((2.0, "later"), (0.0, "final"), (1.0, "partial"),
                                                           (0.0, "final2"))]
    assert ex.queued() == 4
    gate.set()
    for f in futs:
        f.result(BOUND_S)
    assert ran == ["final", "final2", "partial", "later"]


def test_fifo_ignores_the_priority() -> None:
    ex = PriorityExecutor(1, name="fifo", fifo=True)
    gate = threading.Event()
    ran: list[int] = []
    ex.submit(0, gate.wait, BOUND_S)
    futs = [ex.submit(p, ran.append, p) for p in (3, 1, 2)]
    gate.set()
    for f in futs:
        f.result(BOUND_S)
    ex.shutdown(wait=True)
    assert ran == [3, 1, 2]


def test_a_full_queue_refuses_with_busy(gated: tuple[PriorityExecutor, threading.Event, list[str]]) -> None:
    ex, gate, ran = gated
    for i in range(4):
        ex.submit(1, ran.append, str(i))
    with pytest.raises(Busy):
        ex.submit(0, ran.append, "refused")
    gate.set()
    ex.shutdown(wait=True, cancel_futures=False)
    assert ran == ["0", "1", "2", "3"]


def test_cancelled_work_never_runs_and_errors_reach_the_waiter(
        gated: tuple[PriorityExecutor, threading.Event, list[str]]) -> None:
    ex, gate, ran = gated
    dropped = ex.submit(0, ran.append, "dropped")
    assert dropped.cancel()

    def boom() -> None:
        raise ValueError("boom")

    failing = ex.submit(1, boom)
    kept = ex.submit(2, ran.append, "kept")
    gate.set()
    with pytest.raises(ValueError, match="boom"):
        failing.result(BOUND_S)
    kept.result(BOUND_S)
    assert ran == ["kept"]


async def test_an_awaiting_task_cancelled_drops_its_queued_work(
        gated: tuple[PriorityExecutor, threading.Event, list[str]]) -> None:
    """A barge-in cancels the synthesis of sentences nobody will hear before they take a thread."""
    ex, gate, ran = gated
    queued = ex.submit(0, ran.append, "unheard")
    waiter = asyncio.wrap_future(queued)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(100):  # the cancel reaches the executor's future in a loop callback
        if queued.cancelled():
            break
        await asyncio.sleep(0)
    assert queued.cancelled()
    done = asyncio.wrap_future(ex.submit(1, ran.append, "next"))
    gate.set()
    await asyncio.wait_for(done, BOUND_S)
    assert ran == ["next"]


def test_shutdown_cancels_what_waits() -> None:
    ex = PriorityExecutor(1, name="stop")
    gate = threading.Event()
    ex.submit(0, gate.wait, BOUND_S)
    waiting = ex.submit(0, lambda: None)
    ex.shutdown(wait=False)
    assert waiting.cancelled()
    gate.set()
    with pytest.raises(RuntimeError):
        ex.submit(0, lambda: None)


def test_at_exit_the_call_in_progress_finishes_and_the_process_exits(tmp_path: Path) -> None:
    # A daemon thread would be killed mid-call at interpreter exit (inside native code, that aborts the
    # process); the executor's threads instead finish the call they are in, and nothing waiting keeps the
    # process alive.
    done = tmp_path / "done"
    code = (
        "import time\n"
        "from local_ai_server.priority import PriorityExecutor\n"
        "ex = PriorityExecutor(1, name='exit')\n"
        f"ex.submit(0, lambda: (time.sleep(0.5), open({str(done)!r}, 'w').close()))\n"
        "ex.submit(1, time.sleep, 3600)\n"
        "time.sleep(0.1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert done.exists()
