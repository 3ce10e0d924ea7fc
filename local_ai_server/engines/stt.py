"""faster-whisper adapter: transcribe one utterance (16 kHz mono float32) in the calling thread.

Whisper encodes a fixed 30 s window, however short the utterance: on a CPU that window is most of the
cost of a transcript (~0.4 s for tiny.en on 2 cores, for a 3 s question). CTranslate2 accepts a
shorter mel input, so an utterance is encoded in a window just longer than itself (its length plus
`pad_s` of silence, rounded up to whole seconds): the same transcript at a fraction of the cost
(bench/stt_window.py measures both, WER included). Utterances that do not fit, or `pad_s=None`, take
faster-whisper's own 30 s path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RATE_HZ = 16000
HOP = 160  # samples per mel frame (10 ms)
FULL_FRAMES = 3000  # Whisper's 30 s window
WINDOW_STEP_FRAMES = 100  # windows are whole seconds: fewer distinct shapes, no tail cut mid-word
# A transcript longer than this many tokens per second of audio is a loop, not speech.
MAX_TOKENS_PER_S = 12
# Whisper's hallucinations on noise look like this: likely no speech, and not confident.
NO_SPEECH_PROB = 0.8
NO_SPEECH_LOGPROB = -1.0


@dataclass(frozen=True)
class Transcript:
    """The text of one utterance and how sure the model was."""

    text: str
    confidence: float | None
    audio_s: float


def window_frames(samples: int, pad_s: float, min_s: float = 0.0) -> int | None:
    """Mel frames of the encoder window for `samples` of audio plus `pad_s` of silence (at least `min_s`
    in all); None if over 30 s."""
    need = max(math.ceil(samples / HOP) + math.ceil(pad_s * RATE_HZ / HOP), math.ceil(min_s * RATE_HZ / HOP))
    frames = math.ceil(need / WINDOW_STEP_FRAMES) * WINDOW_STEP_FRAMES
    return frames if frames <= FULL_FRAMES else None


def token_cap(audio_s: float, prompt_tokens: int, model_max: int) -> int:
    """The longest decode (prompt included) an utterance of `audio_s` may produce: speech has ~3-4 tokens
    a second, so anything far beyond that is the model looping on its own output."""
    return min(model_max, prompt_tokens + 8 + int(audio_s * MAX_TOKENS_PER_S))


def _words_only(text: str) -> str:
    """`text`, or "" when it has no letter or digit: Whisper writes "." or "..." for silence."""
    return text if any(c.isalnum() for c in text) else ""


def _norm(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


def cut_repetition(text: str) -> str:
    """`text` up to where it starts repeating itself ("Can I pay? Can I pay? Can I"), Whisper's typical
    failure when its window ends soon after the speech (and now and then on a full one).

    The cut is at the earliest word from which every word equals the one a period earlier, up to the
    end (or all but its last two words), when that run is at least three words long and either repeats
    a whole period or restarts the transcript from its first word. Shorter echoes ("I think, I think
    so", "thank you, thank you") are speech, and are kept.
    """
    words = text.split()
    keys = [_norm(w) for w in words]
    n = len(keys)
    best = n
    for period in range(1, n - 2):
        for garbage in (0, 1, 2):
            end = n - garbage
            j = end
            while j - period > 0 and keys[j - 1] == keys[j - 1 - period]:
                j -= 1
            run = end - j
            if run >= 3 and (run >= period or j == period) and j < best:
                best = j
    return text if best == n else " ".join(words[:best])


class WhisperStt:
    """A loaded faster-whisper model; `transcribe` must run in a worker thread."""

    def __init__(self, model_path: Path, *, threads: int, compute_type: str = "int8", language: str = "en",
                 beam_size: int = 1, device: str = "cpu", pad_s: float | None = 2.0,
                 min_window_s: float = 4.0) -> None:
        from faster_whisper import WhisperModel  # heavy import, only when a model is loaded
        from faster_whisper.tokenizer import Tokenizer

        if not (model_path / "model.bin").is_file():
            raise FileNotFoundError("STT model directory has no model.bin")
        self.path = model_path
        self.language = language
        self.beam_size = beam_size
        self.pad_s = pad_s
        self.min_window_s = min_window_s
        self.cut_loops = True
        self._model = WhisperModel(str(model_path), device=device, compute_type=compute_type,
                                   cpu_threads=threads, num_workers=1)
        multilingual = bool(self._model.model.is_multilingual)
        self._tokenizer = Tokenizer(self._model.hf_tokenizer, multilingual, task="transcribe",
                                    language=language if multilingual else "en")
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        t = self._tokenizer
        # What faster-whisper suppresses with suppress_tokens=[-1]: symbols that are not speech, and the
        # task tokens.
        self._suppress = sorted({*t.non_speech_tokens, t.transcribe, t.translate, t.sot, t.sot_prev, t.sot_lm,
                                 t.no_speech})

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe one utterance; all decoding happens here, in this thread."""
        if audio.size == 0:
            return Transcript("", None, 0.0)
        audio = audio.astype(np.float32, copy=False)
        frames = None if self.pad_s is None else window_frames(audio.size, self.pad_s, self.min_window_s)
        if frames is None:
            return self._transcribe_full(audio)
        return self._transcribe_window(audio, frames)

    def _transcribe_window(self, audio: np.ndarray, frames: int) -> Transcript:
        """Encode the utterance in a `frames`-long window and decode it greedily, without timestamps."""
        import ctranslate2

        features = self._model.feature_extractor(audio)
        window = np.zeros((features.shape[0], frames), dtype=np.float32)
        n = min(frames, features.shape[1])
        window[:, :n] = features[:, :n]  # zero padding, as faster-whisper pads its 30 s window
        encoded = self._model.model.encode(ctranslate2.StorageView.from_array(window[None]), to_cpu=False)
        audio_s = audio.size / RATE_HZ
        max_length = token_cap(audio_s, len(self._prompt), self._model.max_length)
        result: Any = self._model.model.generate(
            encoded, [self._prompt], beam_size=self.beam_size, max_length=max_length, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True, suppress_tokens=self._suppress,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        # faster-whisper's average log-probability (length penalty 1): the score is per token already.
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else -math.inf
        if result.no_speech_prob > NO_SPEECH_PROB and avg_logprob < NO_SPEECH_LOGPROB:
            return Transcript("", None, audio_s)
        text = _words_only(self._tokenizer.decode(tokens).strip())
        if self.cut_loops:
            text = cut_repetition(text)
        return Transcript(text, math.exp(avg_logprob) if text else None, audio_s)

    def _transcribe_full(self, audio: np.ndarray) -> Transcript:
        """faster-whisper's own path (30 s windows, any length); its segment generator is drained here."""
        segments, _info = self._model.transcribe(
            audio,
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
            if seg.no_speech_prob > NO_SPEECH_PROB and seg.avg_logprob < NO_SPEECH_LOGPROB:
                continue
            texts.append(seg.text)
            logprobs.append(seg.avg_logprob)
        text = _words_only(" ".join(t.strip() for t in texts).strip())
        if self.cut_loops:
            text = cut_repetition(text)
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else None
        return Transcript(text, confidence, audio.size / RATE_HZ)

    def warm_up(self) -> None:
        """Run tiny transcriptions so the first caller does not pay for lazy initialisation."""
        self.transcribe(np.zeros(8000, dtype=np.float32))
        if self.pad_s is not None:
            self._transcribe_full(np.zeros(8000, dtype=np.float32))
