"""Semantic endpointing: at a short pause, a turn detector decides whether the caller finished.

Pure logic over the segmenter's state: with `turn_detection: "smart"` the segmenter's own silence cap
is the long one; at the short pause the utterance so far is scored once, and a "complete" verdict ends
it there. Speech resuming makes a new pending utterance (a new key), which is scored afresh at its
next pause. The answer guessed early on the same pause follows the same verdict: kept when complete,
dropped when not (the caller is expected to go on; the LLM worker is freed meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SttConfig
from ..session import Session

TURN_MODES = ("vad", "smart")
Key = tuple[int, int]  # Segmenter.pending_final_key(): which audio the utterance would end with


@dataclass(frozen=True)
class TurnSettings:
    """How a session decides its turn is over."""

    mode: str = "vad"  # "vad": silence alone | "smart": the turn detector at a short pause
    threshold: float = 0.5  # probability of "complete" at or above which the turn ends at the short pause
    short_ms: int = 200  # the pause at which the detector is asked
    long_ms: int = 1000  # the silence that ends an utterance the detector judged incomplete

    @property
    def smart(self) -> bool:
        """Whether the detector is used."""
        return self.mode == "smart"


def turn_settings(session: Session, cfg: SttConfig) -> TurnSettings:
    """The session's turn-detection settings over the server defaults."""
    s = session
    return TurnSettings(
        mode=s.turn_detection if s.turn_detection is not None else cfg.turn_detection,
        threshold=s.turn_threshold if s.turn_threshold is not None else cfg.turn_threshold,
        short_ms=s.turn_short_ms if s.turn_short_ms is not None else cfg.turn_short_ms,
        long_ms=s.turn_long_ms if s.turn_long_ms is not None else cfg.turn_long_ms,
    )


class EndpointPolicy:
    """One stream's verdicts: which pause to score, and what a score means for the utterance and the guess."""

    def __init__(self, settings: TurnSettings) -> None:
        self.settings = settings
        self._asked: Key | None = None  # the pending audio a score was asked for (one per pause)
        self._incomplete: Key | None = None  # the pending audio judged incomplete: no guess for it

    def due(self, in_speech: bool, silence_ms: float, key: Key) -> bool:
        """Whether to score the utterance now (once per pause: a new key after speech resumes)."""
        s = self.settings
        if not s.smart or not in_speech or silence_ms < s.short_ms or silence_ms >= s.long_ms:
            return False
        if self._asked == key:
            return False
        self._asked = key
        return True

    def verdict(self, key: Key, probability: float, in_speech: bool, silence_ms: float, current: Key) -> bool:
        """A score arrived for `key`: True to end the utterance now (the caller is still silent on it)."""
        if not in_speech or silence_ms <= 0 or current != key:
            return False  # the caller spoke again (another key), or the utterance already ended
        if probability >= self.settings.threshold:
            return True
        self._incomplete = key
        return False

    def keeps_guess(self, key: Key) -> bool:
        """Whether an answer guessed for `key` may be started or kept (not once judged incomplete)."""
        return not (self.settings.smart and self._incomplete == key)

    def reset(self) -> None:
        """A new stream (stop_session, new call): nothing asked or judged yet."""
        self._asked = self._incomplete = None
