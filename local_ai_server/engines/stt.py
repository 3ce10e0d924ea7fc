"""faster-whisper adapter: transcribe one utterance (16 kHz mono float32) in the calling thread."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Transcript:
    """The text of one utterance and how sure the model was."""

    text: str
    confidence: float | None
    audio_s: float


class WhisperStt:
    """A loaded faster-whisper model; `transcribe` must run in a worker thread."""

    def __init__(self, model_path: Path, *, threads: int, compute_type: str = "int8", language: str = "en",
                 beam_size: int = 1, device: str = "cpu") -> None:
        from faster_whisper import WhisperModel  # heavy import, only when a model is loaded

        if not (model_path / "model.bin").is_file():
            raise FileNotFoundError("STT model directory has no model.bin")
        self.path = model_path
        self.language = language
        self.beam_size = beam_size
        self._model = WhisperModel(str(model_path), device=device, compute_type=compute_type,
                                   cpu_threads=threads, num_workers=1)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe one utterance; the segment generator is drained here, in this thread."""
        if audio.size == 0:
            return Transcript("", None, 0.0)
        segments, _info = self._model.transcribe(
            audio.astype(np.float32, copy=False),
            language=self.language,
            beam_size=self.beam_size,
            vad_filter=False,  # the caller already segmented the stream with Silero VAD
            condition_on_previous_text=False,
            without_timestamps=True,
            temperature=0.0,
        )
        texts: list[str] = []
        logprobs: list[float] = []
        for seg in segments:  # lazy: decoding happens while iterating
            if seg.no_speech_prob > 0.8 and seg.avg_logprob < -1.0:
                continue  # Whisper's hallucinations on noise look like this
            texts.append(seg.text)
            logprobs.append(seg.avg_logprob)
        text = " ".join(t.strip() for t in texts).strip()
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else None
        return Transcript(text, confidence, audio.size / 16000.0)

    def warm_up(self) -> None:
        """Run one tiny transcription so the first caller does not pay for lazy initialisation."""
        self.transcribe(np.zeros(8000, dtype=np.float32))
