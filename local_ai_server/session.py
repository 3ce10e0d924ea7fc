"""Per-connection state: call id, mode, history, prompt, audio formats, segmenter settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from .audio import normalize_output_format
from .errors import RequestId
from .tools import Tool

DEFAULT_CALL_ID = "unknown"
# Added to the system prompt for the turn after a barge-in that rolled the interrupted answer back (as
# AVA's server does): the model must not pick the dropped answer up again.
INTERRUPTED_NOTE = ("IMPORTANT: The caller interrupted the previous answer. Do not resume, repeat or continue it. "
                    "Answer only what the caller has just said.")


@dataclass
class Session:
    """What one WebSocket connection remembers between messages."""

    id: int
    call_id: str = DEFAULT_CALL_ID
    mode: str = "full"
    system_prompt: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    # The request each history message came from (its turn's request id), kept beside `history`, so that a
    # front can later edit what one exchange left there (edit_message).
    history_keys: list[RequestId] = field(default_factory=list)
    output_encoding: str | None = None
    output_sample_rate_hz: int | None = None
    segment_energy_threshold: int | None = None
    segment_silence_ms: int | None = None
    # Speech probability that opens an utterance, and audio kept from before it (None: server defaults).
    segment_vad_threshold: float | None = None
    segment_preroll_ms: int | None = None
    # Turn detection (voice/endpoint.py); None: the server's LOCAL_TURN_* defaults.
    turn_detection: str | None = None
    turn_threshold: float | None = None
    turn_short_ms: int | None = None
    turn_long_ms: int | None = None
    input_rate: int = 16000
    input_format: str = "pcm16le"
    authenticated: bool = False
    auth_failures: int = 0
    # The call's tools (tool_context): every tool declared, the names allowed, the policy.
    tools: tuple[Tool, ...] = ()
    allowed_tools: tuple[str, ...] = ()
    tool_policy: str = "auto"
    # A barge-in rolled an answer back: the next answer is told so (cleared once one is given).
    interrupted: bool = False
    max_history_turns: int = 8
    # Bumped whenever the history is reset, so a turn that outlives the reset cannot write into it.
    history_epoch: int = 0

    def adopt_call_id(self, call_id: str | None) -> bool:
        """Switch to `call_id` if it is new; a new call starts with an empty history."""
        if not call_id or call_id == self.call_id:
            return False
        self.call_id = call_id
        self.reset_history()
        self.tools, self.allowed_tools, self.tool_policy = (), (), "auto"
        return True

    def reset_history(self) -> None:
        """Forget the conversation (new call, stop_session)."""
        self.history.clear()
        self.history_keys.clear()
        self.history_epoch += 1
        self.interrupted = False

    def rollback(self) -> bool:
        """Forget the last exchange if it ends with an answer (barge-in with rollback_assistant)."""
        self.interrupted = True
        self._keys_in_step()
        if not self.history or self.history[-1][0] != "assistant":
            return False
        self._pop()
        if self.history and self.history[-1][0] == "user":
            self._pop()
        return True

    def _pop(self) -> None:
        self.history.pop()
        self.history_keys.pop()

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
        if self.interrupted:
            prompt = f"{prompt}\n{INTERRUPTED_NOTE}"
        convo = list(context) if context is not None else list(self.history)
        # An empty text (AVA after a tool ran) asks for an answer to the context as it stands.
        new = [("user", user_text)] if user_text.strip() else []
        if convo and convo[0][0] == "system":
            return [*convo, *new]
        return [("system", prompt), *convo, *new]

    def add_turn(self, user_text: str, answer: str, epoch: int | None = None, key: RequestId = None) -> None:
        """Remember one exchange (dropped if the history was reset since `epoch`), keeping the latest turns.

        `key` names the request the exchange answered, for edit_message.
        """
        if epoch is not None and epoch != self.history_epoch:
            return
        self._keys_in_step()
        self.history.append(("user", user_text))
        self.history_keys.append(key)
        if answer:
            self.history.append(("assistant", answer))
            self.history_keys.append(key)
        excess = len(self.history) - 2 * self.max_history_turns
        if excess > 0:
            del self.history[:excess]
            del self.history_keys[:excess]
            # Never start with an answer whose question was trimmed away.
            while self.history and self.history[0][0] != "user":
                del self.history[0]
                del self.history_keys[0]

    def edit_message(self, key: RequestId, role: str, text: str | None) -> bool:
        """Rewrite the `role` message of the exchange `key` to `text` (None or "": remove it).

        False when the history holds no such message (never written, trimmed away, or reset since).
        """
        if key is None:
            return False
        self._keys_in_step()
        for i, (k, (r, _)) in enumerate(zip(self.history_keys, self.history, strict=True)):
            if k == key and r == role:
                if text:
                    self.history[i] = (role, text)
                else:
                    del self.history[i]
                    del self.history_keys[i]
                return True
        return False

    def _keys_in_step(self) -> None:
        """One key per message: a history set some other way has no keys for what it holds."""
        if len(self.history_keys) != len(self.history):
            self.history_keys[:] = [None] * len(self.history)
