"""The Realtime front with the drain's hook: whether its connection is idle between turns."""

from __future__ import annotations

from .realtime import RealtimeFront


class DrainableRealtimeFront(RealtimeFront):
    """A Realtime connection that can tell a draining server when closing it cuts nothing."""

    def between_turns(self) -> bool:
        """No response running or due, no function output awaited, no input audio held, nothing left to send."""
        responses = self.responses
        return (responses.active is None and not responses.fn.waiting and not responses.fn._open
                and not self._respond_after and self._manual.seconds == 0 and self._vad_item is None
                and not self._awaiting and self.call.between_turns() and self.out.idle)
