"""Graceful drain on SIGTERM: each call ends its turn and then goes; whatever is open at the timeout goes too.

No socket here: each open connection says whether it is between turns (its front's `between_turns`) and
how it leaves (`go_away`: 1001 on a WebSocket, the end of the TCP stream on Wyoming). The policy decides
when; `Drain` applies it until every connection has gone (or the close handshakes run out of time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from .tasks import TaskOwner

log = structlog.get_logger(__name__)

# How often the drain looks at the connections: a call is closed within this of finishing its turn.
TICK_S = 0.1
# How long the close handshakes of the last connections may take before the shutdown goes on without them.
CLOSE_GRACE_S = 5.0


class Leaving(Protocol):
    """The drain's view of one open connection, whatever its front."""

    kind: str  # its front: "ava", "realtime" or "wyoming" (for the counts in the log)

    def between_turns(self) -> bool:
        """True when nothing of a turn is under way: closing now cuts nothing the caller said or awaits."""
        ...

    async def go_away(self) -> None:
        """Close the connection as a server going away does (1001 on a WebSocket)."""
        ...


@dataclass(frozen=True)
class DrainPolicy:
    """When a draining server closes a connection."""

    notice_s: float
    timeout_s: float

    def closes(self, elapsed_s: float, between_turns: bool, stop_now: bool = False) -> str | None:
        """Why the connection is closed now ("stopped", "timeout", "between_turns"), or None: it goes on."""
        if stop_now:
            return "stopped"
        if elapsed_s >= self.timeout_s:
            return "timeout"
        if between_turns and elapsed_s >= self.notice_s:
            return "between_turns"
        return None


@dataclass
class DrainReport:
    """What a drain did: connections open at its start, closed by reason, left unclosed, how long it took."""

    open_at_start: dict[str, int]
    closed: collections.Counter[str] = field(default_factory=collections.Counter)
    left: int = 0
    seconds: float = 0.0


class StopRequests:
    """SIGTERM/SIGINT as they come: the first starts the drain, any later one stops at once."""

    def __init__(self) -> None:
        self.drain = asyncio.Event()
        self.now = asyncio.Event()

    def signal(self, name: str) -> None:
        """A signal arrived."""
        log.info("server.signal", signal=name, draining=self.drain.is_set())
        if self.drain.is_set():
            self.now.set()
        self.drain.set()


class Drain:
    """Closes the open connections as the policy says, until none is left (or their closing runs out of time)."""

    def __init__(self, policy: DrainPolicy, connections: Callable[[], Collection[Leaving]], stop_now: asyncio.Event,
                 *, tick_s: float = TICK_S, close_grace_s: float = CLOSE_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.connections = connections
        self.stop_now = stop_now
        self.tick_s = tick_s
        self.close_grace_s = close_grace_s
        self.clock = clock

    async def run(self) -> DrainReport:
        """Drain; returns what was done (the caller logs it)."""
        start = self.clock()
        report = DrainReport(dict(collections.Counter(c.kind for c in self.connections())))
        closing: set[Leaving] = set()
        failed: set[Leaving] = set()  # connections whose hook failed (logged once each)
        grace_until: float | None = None
        async with TaskOwner("drain") as tasks:  # leaving it cancels close handshakes still running
            while live := list(self.connections()):
                elapsed = self.clock() - start
                for conn in live:
                    if conn in closing:
                        continue
                    why = self.policy.closes(elapsed, _between_turns(conn, failed), self.stop_now.is_set())
                    if why is not None:
                        closing.add(conn)
                        report.closed[why] += 1
                        tasks.spawn(conn.go_away(), name=f"go-away-{conn.kind}")
                if all(conn in closing for conn in live):
                    # Nothing left to decide: wait for the close handshakes, but not forever.
                    grace_until = grace_until if grace_until is not None else self.clock() + self.close_grace_s
                    if self.clock() >= grace_until:
                        report.left = len(live)
                        break
                await self._tick()
        report.seconds = round(self.clock() - start, 2)
        return report

    async def _tick(self) -> None:
        """Wait one tick, or less if a second signal asks to stop now."""
        if self.stop_now.is_set():
            await asyncio.sleep(self.tick_s)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_now.wait(), self.tick_s)


def _between_turns(conn: Leaving, failed: set[Leaving]) -> bool:
    """The connection's answer; a hook that fails counts as "not between turns" (the timeout still closes it)."""
    try:
        return conn.between_turns()
    except Exception:  # noqa: BLE001 - a bug in one front's hook must not stop the drain of every call
        if conn not in failed:
            failed.add(conn)
            log.exception("drain.hook_failed", front=conn.kind)
        return False
