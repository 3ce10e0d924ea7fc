"""Download progress: the transfer rate over a sliding window, and a printer for a bar or plain lines."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

# Speed is averaged over this window: long enough to smooth bursts, short enough to track changes.
SPEED_WINDOW_S = 5.0
# (done_bytes, total_bytes or None if unknown, speed in bytes/s, eta in s or None if unknown)
ProgressFn = Callable[[int, int | None, float, float | None], None]


class Speed:
    """Bytes per second over the last SPEED_WINDOW_S seconds of this run (resumed bytes excluded)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self._bytes = 0

    def add(self, n: int) -> float:
        """Record `n` new bytes now; return the current rate."""
        now = time.monotonic()
        self._samples.append((now, n))
        self._bytes += n
        while len(self._samples) > 1 and now - self._samples[0][0] > SPEED_WINDOW_S:
            self._bytes -= self._samples.popleft()[1]
        return self.rate(now)

    def rate(self, now: float | None = None) -> float:
        """The current rate; 0 until there are two samples to measure between."""
        if len(self._samples) < 2:
            return 0.0
        now = time.monotonic() if now is None else now
        elapsed = now - self._samples[0][0]
        # The first sample's bytes arrived before the window's start time, so they do not count.
        return (self._bytes - self._samples[0][1]) / elapsed if elapsed > 0 else 0.0


def progress_printer(stream: TextIO | None = None) -> ProgressFn:
    """A progress callback: a `\\r`-updated bar on a TTY, else a plain line every ~5 % or 10 s."""
    out = stream if stream is not None else sys.stderr
    tty = bool(getattr(out, "isatty", lambda: False)())
    state = {"last_done": -1, "last_time": 0.0, "last_pct": -1.0}

    def show(done: int, total: int | None, speed: float, eta: float | None) -> None:
        now = time.monotonic()
        if done < state["last_done"]:
            # A new file (or a restart from zero): start the throttling over.
            state.update(last_time=0.0, last_pct=-1.0)
        state["last_done"] = done
        finished = total is not None and done >= total
        pct = 100.0 * done / total if total else None
        if tty:
            if not finished and now - state["last_time"] < 0.1:
                return
            line = _bar(done, total, speed, eta, pct)
            out.write("\r" + line + ("\n" if finished else ""))
        else:
            step = pct is not None and pct - state["last_pct"] >= 5.0
            if not (finished or step or now - state["last_time"] >= 10.0):
                return
            if pct is not None:
                state["last_pct"] = pct - pct % 5.0
            out.write(_line(done, total, speed, eta, pct) + "\n")
        state["last_time"] = now
        out.flush()

    return show


def _bar(done: int, total: int | None, speed: float, eta: float | None, pct: float | None) -> str:
    width = 30
    filled = int(width * pct / 100) if pct is not None else 0
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {_line(done, total, speed, eta, pct)}"


def _line(done: int, total: int | None, speed: float, eta: float | None, pct: float | None) -> str:
    head = f"{pct:5.1f}% " if pct is not None else ""
    of = f"/{_mb(total)}" if total is not None else ""
    eta_text = f" ETA {_duration(eta)}" if eta is not None and not (total is not None and done >= total) else ""
    return f"{head}{_mb(done)}{of} MB {_mb(int(speed))} MB/s{eta_text}"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f}"


