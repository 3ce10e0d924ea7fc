"""Utterance segmentation, streaming: VAD speech probabilities plus an energy gate (the model is in engines/vad.py)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512  # Silero's window at 16 kHz: 32 ms
WINDOW_MS = WINDOW * 1000 / SAMPLE_RATE
CONTEXT = 64  # samples of the previous window Silero v5/v6 expects in front of each window


class VadStream(Protocol):
    """Speech probabilities for consecutive 512-sample windows of one audio stream."""

    def probs(self, windows: np.ndarray) -> np.ndarray:
        """Probabilities (n,) for windows shaped (n, 512); keeps state across calls."""
        ...


@dataclass(frozen=True)
class SegmenterSettings:
    """How utterances are cut: thresholds and durations."""

    silence_ms: int = 500
    energy_threshold: int = 100  # int16-scale RMS per window; below it a window is never speech
    vad_threshold: float = 0.5
    onset_ms: int = 64  # consecutive speech needed to open an utterance (ignores clicks)
    preroll_ms: int = 320  # audio kept from before the onset: Whisper needs the word's attack
    tail_ms: int = 200  # silence kept after the last speech window
    min_speech_ms: int = 120  # utterances with less voiced audio are dropped as noise
    max_utterance_s: float = 30.0


@dataclass(frozen=True)
class UtteranceStart:
    """Speech began (the caller started talking)."""

    at_ms: float


@dataclass(frozen=True)
class UtteranceEnd:
    """An utterance ended; `audio` is 16 kHz float32 with pre-roll and a short tail."""

    audio: np.ndarray
    reason: str  # "silence" | "max_length" | "flush"
    speech_ms: float
    at_ms: float
    # Identifies the audio: equal keys mean equal audio (see Segmenter.pending_final_key).
    key: tuple[int, int] = (0, 0)


Event = UtteranceStart | UtteranceEnd


class Segmenter:
    """Cuts a 16 kHz float32 stream into utterances; feed() any chunk size, get events back."""

    def __init__(self, vad: VadStream, settings: SegmenterSettings = SegmenterSettings()) -> None:
        self.vad = vad
        self.settings = settings
        self._pending = np.zeros(0, dtype=np.float32)
        self._preroll: collections.deque[np.ndarray] = collections.deque(
            maxlen=max(1, int(settings.preroll_ms / WINDOW_MS))
        )
        self._utterance: list[np.ndarray] = []
        self._onset = 0
        self._silence = 0
        self._voiced = 0
        self._last_voiced_index = 0
        self._clock_ms = 0.0
        self._serial = 0
        self.in_speech = False

    def update(self, settings: SegmenterSettings) -> None:
        """Change thresholds mid-stream (set_mode)."""
        self.settings = settings
        keep = max(1, int(settings.preroll_ms / WINDOW_MS))
        if keep != self._preroll.maxlen:
            self._preroll = collections.deque(self._preroll, maxlen=keep)

    @property
    def speech_ms(self) -> float:
        """Voiced milliseconds in the current utterance."""
        return self._voiced * WINDOW_MS

    @property
    def utterance_ms(self) -> float:
        """Length of the current utterance so far."""
        return len(self._utterance) * WINDOW_MS

    def utterance_audio(self) -> np.ndarray:
        """The current utterance so far (for partial transcripts)."""
        if not self._utterance:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._utterance)

    def feed(self, audio: np.ndarray) -> list[Event]:
        """Consume audio, return the utterance starts and ends it completes."""
        if audio.size == 0:
            return []
        buf = np.concatenate([self._pending, audio.astype(np.float32, copy=False)]) if self._pending.size else (
            audio.astype(np.float32, copy=False))
        n = buf.size // WINDOW
        self._pending = buf[n * WINDOW:].copy()
        if n == 0:
            return []
        windows = buf[: n * WINDOW].reshape(n, WINDOW)
        probs = self.vad.probs(windows)
        rms = np.sqrt(np.mean(np.square(windows, dtype=np.float32), axis=1)) * 32768.0
        events: list[Event] = []
        for i in range(n):
            self._step(windows[i], float(probs[i]), float(rms[i]), events)
        return events

    def _step(self, window: np.ndarray, prob: float, rms: float, events: list[Event]) -> None:
        s = self.settings
        self._clock_ms += WINDOW_MS
        loud = rms >= s.energy_threshold
        if not self.in_speech:
            self._preroll.append(window)
            self._onset = self._onset + 1 if (prob >= s.vad_threshold and loud) else 0
            if self._onset * WINDOW_MS >= s.onset_ms:
                self.in_speech = True
                self._serial += 1
                self._utterance = list(self._preroll)
                self._preroll.clear()
                self._voiced = self._onset
                self._silence = 0
                self._last_voiced_index = len(self._utterance)
                events.append(UtteranceStart(at_ms=self._clock_ms))
            return
        self._utterance.append(window)
        # Hysteresis: once speaking, a slightly lower probability still counts as speech.
        if prob >= s.vad_threshold - 0.15 and loud:
            self._silence = 0
            self._voiced += 1
            self._last_voiced_index = len(self._utterance)
        else:
            self._silence += 1
        if self._silence * WINDOW_MS >= s.silence_ms:
            self._end("silence", events)
        elif self.utterance_ms >= s.max_utterance_s * 1000:
            self._end("max_length", events)

    @property
    def clock_ms(self) -> float:
        """Audio consumed so far, in whole windows."""
        return self._clock_ms

    @property
    def silence_ms(self) -> float:
        """Non-speech at the end of the utterance in progress (0 while the caller speaks)."""
        return self._silence * WINDOW_MS if self.in_speech else 0.0

    def pending_final_key(self) -> tuple[int, int]:
        """Identifies the audio the utterance in progress would end with if it ended now."""
        return (self._serial, self._last_voiced_index)

    def pending_final_audio(self) -> np.ndarray:
        """The audio the utterance would end with now: once the tail of silence is in, ending later adds
        nothing, so a transcription of it started early is the final one (speculative STT)."""
        keep = min(len(self._utterance), self._last_voiced_index + int(self.settings.tail_ms / WINDOW_MS))
        return np.concatenate(self._utterance[:keep]) if keep else np.zeros(0, dtype=np.float32)

    def _end(self, reason: str, events: list[Event]) -> None:
        audio = self.pending_final_audio()
        key = self.pending_final_key()
        speech_ms = self.speech_ms
        self._reset_utterance()
        if speech_ms >= self.settings.min_speech_ms:
            events.append(UtteranceEnd(audio=audio, reason=reason, speech_ms=speech_ms, at_ms=self._clock_ms,
                                       key=key))

    def _reset_utterance(self) -> None:
        self.in_speech = False
        self._utterance = []
        self._onset = self._silence = self._voiced = 0
        self._last_voiced_index = 0

    def end_now(self, reason: str = "turn") -> UtteranceEnd | None:
        """End the utterance in progress at its pending audio (the turn detector judged it complete)."""
        if not self.in_speech:
            return None
        events: list[Event] = []
        self._end(reason, events)
        return events[0] if events and isinstance(events[0], UtteranceEnd) else None

    def flush(self) -> UtteranceEnd | None:
        """End the utterance in progress now (idle timeout, end of stream); None if there is none."""
        if not self.in_speech:
            self._pending = np.zeros(0, dtype=np.float32)
            return None
        if self._pending.size:
            self._utterance.append(self._pending)
            self._pending = np.zeros(0, dtype=np.float32)
        events: list[Event] = []
        self._last_voiced_index = len(self._utterance)
        self._end("flush", events)
        return events[0] if events and isinstance(events[0], UtteranceEnd) else None

    def reset(self) -> None:
        """Drop everything buffered (barge-in of a new call, stop_session)."""
        self._pending = np.zeros(0, dtype=np.float32)
        self._preroll.clear()
        self._reset_utterance()
