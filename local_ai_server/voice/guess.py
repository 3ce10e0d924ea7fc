"""Early answers: a guess (a held turn and what it answered) and the hook of a front that answers stt finals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import RequestId
from .turn import Turn

__all__ = ["Guess", "SttAnswers"]


@dataclass
class Guess:
    """An answer started early, and what it was started from; valid only if the final confirms all of it."""

    text: str
    mode: str
    turn: Turn
    history_len: int
    epoch: int


class SttAnswers(Protocol):
    """A front that answers the stt mode's finals itself (Call.answer_stt_with)."""

    def guess(self, text: str, request_id: RequestId) -> Turn | None:
        """Start a held turn answering an early transcript; None if not now."""

    def heard(self, text: str, request_id: RequestId, guess: Guess | None) -> None:
        """A final: answer it, taking `guess` (valid for exactly `text`) with Call.confirm, or dropping it."""
