"""Typed values the call core emits; a front renders each into its own wire messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestId, ServerError


@dataclass(frozen=True)
class Transcribed:
    """A partial or final transcript of the caller's speech (`error` when STT could not run)."""

    text: str
    final: bool
    mode: str
    request_id: RequestId = None
    confidence: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Token:
    """One streamed piece of an answer (`tokens` model tokens, coalesced)."""

    delta: str
    tokens: int
    request_id: RequestId = None


@dataclass(frozen=True)
class Answer:
    """The whole text of an answer; `mode` and `flags` say what kind of answer it was.

    `usage` holds the generation's token counts its engine reported: output_tokens, and input_tokens and
    cached_tokens (prompt tokens reused from the engine's cache) where it tells them.
    """

    text: str
    request_id: RequestId = None
    mode: str = "llm"
    flags: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Speech:
    """One chunk of spoken answer: encoded audio, where it sits in its utterance, and the words it says."""

    audio: bytes
    encoding: str
    sample_rate_hz: int
    utterance_id: str
    index: int
    final: bool
    mode: str
    request_id: RequestId = None
    text: str = ""  # the sentence spoken ("" for a closing silence)


@dataclass(frozen=True)
class Synthesized:
    """A whole text spoken at once (a TTS request), `audio` empty when there was nothing to say."""

    text: str
    audio: bytes
    encoding: str
    sample_rate_hz: int
    request_id: RequestId = None


@dataclass(frozen=True)
class ToolCalls:
    """Tool calls found in (or instead of) an answer; `gated` when a voice turn became one."""

    text: str
    calls: list[dict[str, Any]]
    path: str
    structured_attempts: int = 0
    request_id: RequestId = None
    gated: bool = False


@dataclass(frozen=True)
class VoiceActivity:
    """The caller started or stopped speaking, `audio_ms` into the call's audio.

    A stop with `transcribed` False ended an utterance too short to keep (noise): no transcript follows it.
    """

    started: bool
    audio_ms: int
    transcribed: bool = True


@dataclass(frozen=True)
class Failure:
    """An error the requester must hear about; never a traceback or a path."""

    error: ServerError


Event = Transcribed | Token | Answer | Speech | Synthesized | ToolCalls | VoiceActivity | Failure
