"""The small interfaces the call core needs: where its events go, and the engines it runs on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..engines.llm import SamplingParams
from ..engines.stt import Transcript
from ..errors import RequestId, ServerError
from ..vad import VadStream
from .events import Event

if TYPE_CHECKING:
    from .turn import Turn

T = TypeVar("T")


class Answering(Protocol):
    """What listening hands its transcripts to: the call."""

    def guess(self, text: str, mode: str, request_id: RequestId) -> Any:
        """Start answering a transcript the caller may still add to (held); None if not worth it."""

    def drop_guess(self, guess: Any) -> None:
        """The guess was for other words: forget it unheard."""

    def heard(self, text: str, mode: str, request_id: RequestId, ended_at: float, stt_ms: float,
              guess: Any) -> None:
        """A final transcript in an answering mode: confirm the guess or answer afresh."""

    def error(self, err: ServerError) -> None:
        """Tell the caller's client."""


class Sink(Protocol):
    """Where a call's events go: a front renders them onto its connection."""

    def control(self, event: Event) -> None:
        """An event that must not wait behind speech (errors, acknowledgements)."""

    def data(self, event: Event, turn: Turn | None = None) -> None:
        """Ordered output; dropped unsent if `turn` was cancelled meanwhile."""

    def discard_speech(self) -> int:
        """Drop queued speech and voice-turn output, keeping replies owed to requests; returns how many."""


class TokenSource(Protocol):
    """Where an answer's text comes from: an LLM job, or a text known in advance."""

    last_tokens: int
    stats: dict[str, Any]

    def stream(self) -> AsyncIterator[str]:
        """The answer's text, piece by piece."""

    def cancel(self) -> None:
        """Stop generating (barge-in, disconnect)."""


class Llm(Protocol):
    """A language model serving many calls: submit a chat, stream its answer."""

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> TokenSource:
        """Queue one generation; raises Busy or NotReady."""

    def snapshot(self) -> dict[str, Any]:
        """state, workers, busy, queued: whether a guess may take a worker."""


class Engines(Protocol):
    """What a call runs on: speech-to-text, voice activity, the LLM, text-to-speech, helper threads."""

    @property
    def pool(self) -> Llm:
        """The language model."""

    @property
    def default_prompt(self) -> str:
        """The server-wide system prompt."""

    @property
    def stt_inflight(self) -> int:
        """Transcriptions queued or running (partials yield to finals)."""

    def stt_available(self) -> bool:
        """Whether audio can be segmented: a VAD, and an STT model loaded or loading."""

    def stt_loaded(self) -> bool:
        """Whether a transcription can start now."""

    def vad_stream(self) -> VadStream:
        """Fresh voice-activity state for one audio stream."""

    async def transcribe(self, audio: np.ndarray, kind: str = "final") -> Transcript:
        """16 kHz float32 audio to text; raises NotReady without a model."""

    async def synthesize(self, text: str, due: float | None = None) -> tuple[np.ndarray, int]:
        """Text to (float32 audio, sample rate); raises NotReady without a voice.

        `due`: when the audio is needed (time.monotonic()); what is needed sooner is synthesized first.
        """

    async def run_aux(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (decoding, resampling) off the event loop."""

    def sampling(self) -> SamplingParams:
        """The configured sampling parameters."""

    def turn_available(self) -> bool:
        """Whether the turn detector is loaded (smart turn detection)."""

    async def turn_probability(self, audio: np.ndarray) -> float:
        """Probability that the caller finished, judged from the utterance so far; raises NotReady."""
