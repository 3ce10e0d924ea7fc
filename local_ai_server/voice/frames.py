"""Listening's inbound side: audio frames as received, their decoding to 16 kHz, and ended utterances."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..audio import StreamResampler, mulaw_decode, pcm16_to_float32
from ..config import SttConfig
from ..engines.stt import Transcript
from ..errors import RequestId
from ..session import Session
from ..vad import SegmenterSettings, UtteranceEnd


@dataclass(frozen=True)
class Frame:
    """One inbound audio frame as received: raw bytes, their format and rate, and the call's mode then."""

    payload: bytes
    format: str
    rate: int
    mode: str
    request_id: RequestId = None

    @property
    def samples(self) -> int:
        """Samples in the frame."""
        return len(self.payload) // (1 if self.format == "mulaw" else 2)

    @property
    def seconds(self) -> float:
        """Seconds of audio in the frame."""
        return self.samples / self.rate


@dataclass(frozen=True)
class Final:
    """An utterance that ended (None audio: the stream went idle with nothing said)."""

    end: UtteranceEnd | None
    mode: str
    request_id: RequestId
    ended_at: float
    # A transcription of exactly this audio started during the closing silence, and what was answered.
    early: asyncio.Task[Transcript] | None
    guess: Any


class FrameDecoder:
    """Frames to 16 kHz float32 samples; one resampler is kept while the format and rate stay the same."""

    def __init__(self) -> None:
        self._resampler: StreamResampler | None = None
        self._resampler_key: tuple[str, int] | None = None

    def decode(self, frame: Frame) -> np.ndarray:
        """One frame's samples at 16 kHz (a resampler carries its filter state from frame to frame)."""
        pcm = mulaw_decode(frame.payload) if frame.format == "mulaw" else frame.payload
        x = pcm16_to_float32(pcm)
        if frame.rate == 16000:
            return x
        key = (frame.format, frame.rate)
        if self._resampler is None or self._resampler_key != key:
            self._resampler, self._resampler_key = StreamResampler(frame.rate, 16000), key
        return self._resampler.process(x)


def segmenter_settings(session: Session, cfg: SttConfig, smart: bool = False) -> SegmenterSettings:
    """The session's segmentation settings over the server defaults."""
    s = session
    return SegmenterSettings(
        # With smart turn detection the silence cap is the long one; the detector ends turns earlier.
        silence_ms=(s.turn_long_ms if s.turn_long_ms is not None else cfg.turn_long_ms)
        if smart else s.segment_silence_ms if s.segment_silence_ms is not None else cfg.silence_ms,
        energy_threshold=(s.segment_energy_threshold if s.segment_energy_threshold is not None
                          else cfg.energy_threshold),
        vad_threshold=s.segment_vad_threshold if s.segment_vad_threshold is not None else cfg.vad_threshold,
        max_utterance_s=cfg.max_utterance_s,
        **({"preroll_ms": s.segment_preroll_ms} if s.segment_preroll_ms is not None else {}),
    )
