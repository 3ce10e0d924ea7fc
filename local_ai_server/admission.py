"""Admission: how many calls the box takes at once; a call past the limit is refused `busy` at its start.

A call is a connection that has asked for work (audio, an answer, speech): one on the Realtime path from
its handshake, an AVA or Wyoming connection from its first such message, so that a monitor asking only
for `status` or `describe` is never refused and never counted. A call stays admitted until its connection
closes (or, on AVA, its `stop_session`); calls already admitted are never touched by the limit.
"""

from __future__ import annotations

# Close code of a refused WebSocket call: "Try Again Later" (RFC 6455 registry); OpenAI's SDK retries it.
CLOSE_FULL = 1013
FULL_MESSAGE = "the server is full: call again later (through a load balancer, another server answers)"


def default_max_calls(cores: int) -> int:
    """Calls per box by default: 4 per core, a ceiling (the capacity benchmark saw turns fail past it on two
    cores), not the count that keeps first audio fast: operators set LOCAL_MAX_CALLS to their measured one."""
    return max(2, 4 * cores)


class Admission:
    """Calls in progress against `max_calls` (0: no limit); /ready says `full` while it is reached."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self._active: set[int] = set()
        self.refused = 0

    @property
    def active(self) -> int:
        """Calls admitted and not yet ended."""
        return len(self._active)

    def full(self) -> bool:
        """Whether a new call would be refused now."""
        return 0 < self.max_calls <= len(self._active)

    def admitted(self, key: int) -> bool:
        """Whether the call `key` (a session id) holds a place."""
        return key in self._active

    def admit(self, key: int) -> bool:
        """Take a place for the call `key`; True if it has one (already, or now), False if the box is full."""
        if key in self._active:
            return True
        if self.full():
            self.refused += 1
            return False
        self._active.add(key)
        return True

    def release(self, key: int) -> None:
        """The call `key` ended (its place, if it held one, is free)."""
        self._active.discard(key)
