"""Per-connection state: call id, mode, history, prompt, audio formats, segmenter settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .audio import normalize_output_format

DEFAULT_CALL_ID = "unknown"


@dataclass
class Session:
    """What one WebSocket connection remembers between messages."""

    id: int
    call_id: str = DEFAULT_CALL_ID
    mode: str = "full"
    system_prompt: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    output_encoding: str | None = None
    output_sample_rate_hz: int | None = None
    segment_energy_threshold: int | None = None
    segment_silence_ms: int | None = None
    input_rate: int = 16000
    input_format: str = "pcm16le"
    authenticated: bool = False
    auth_failures: int = 0
    # Bumped whenever the answer in flight is cancelled: audio stamped with an older value is dropped.
    generation: int = 0
    tool_context: dict[str, Any] | None = None
    max_history_turns: int = 8
    # Bumped whenever the history is reset, so a turn that outlives the reset cannot write into it.
    history_epoch: int = 0

    def adopt_call_id(self, call_id: str | None) -> bool:
        """Switch to `call_id` if it is new; a new call starts with an empty history."""
        if not call_id or call_id == self.call_id:
            return False
        self.call_id = call_id
        self.reset_history()
        self.tool_context = None
        return True

    def reset_history(self) -> None:
        """Forget the conversation (new call, stop_session)."""
        self.history.clear()
        self.history_epoch += 1

    def output_format(self, encoding: str | None = None, rate: int | None = None) -> tuple[str, int, bool]:
        """Effective output (encoding, rate, fell_back): request values first, then session defaults."""
        if encoding is None and rate is None:
            encoding, rate = self.output_encoding, self.output_sample_rate_hz
        elif encoding is None:
            # A rate alone: mu-law exists only at 8 kHz, so any other rate means linear16.
            encoding = self.output_encoding
            if encoding is None or (encoding == "mulaw" and rate != 8000):
                encoding = "mulaw" if rate == 8000 else "linear16"
        return normalize_output_format(encoding, rate)

    def messages_for(
        self, user_text: str, default_prompt: str, context: tuple[tuple[str, str], ...] | None = None
    ) -> list[tuple[str, str]]:
        """The chat to send to the LLM: system prompt, history (or the request's context), the new text."""
        prompt = self.system_prompt or default_prompt
        convo = list(context) if context is not None else list(self.history)
        if convo and convo[0][0] == "system":
            return [*convo, ("user", user_text)]
        return [("system", prompt), *convo, ("user", user_text)]

    def add_turn(self, user_text: str, answer: str, epoch: int | None = None) -> None:
        """Remember one exchange (dropped if the history was reset since `epoch`), keeping the latest turns."""
        if epoch is not None and epoch != self.history_epoch:
            return
        self.history.append(("user", user_text))
        if answer:
            self.history.append(("assistant", answer))
        excess = len(self.history) - 2 * self.max_history_turns
        if excess > 0:
            del self.history[:excess]
        # Never start with an answer whose question was trimmed away.
        while self.history and self.history[0][0] != "user":
            del self.history[0]

    def cancel_generation(self) -> int:
        """Invalidate the answer in flight; returns the new generation number."""
        self.generation += 1
        return self.generation
