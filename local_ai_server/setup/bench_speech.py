"""The bench's STT and TTS probes, in process: Piper speaks a known sentence, faster-whisper transcribes it."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from local_ai_server.setup.bench_llm import BenchError
from local_ai_server.setup.registry import load_registry
from local_ai_server.setup.selection import default_models_dir, default_registry_path

DEFAULT_STT_MODEL = "whisper-tiny.en"
DEFAULT_TTS_MODEL = "piper-en_US-joe-medium"
# ~3 s spoken; plain words without digits, which Whisper may write either way.
STT_SENTENCE = "The weather is lovely today, so let us take a long walk in the park."
# ~15 words: a typical first sentence of an answer.
TTS_SENTENCE = "Thank you for calling, I can help you change your booking or answer any other question."
STT_RATE_HZ = 16000
SPEECH_RUNS = 3


@dataclass(frozen=True)
class SttMeasurement:
    """One STT probe: the median time to transcribe a known utterance and what came out."""

    ms: float
    transcript: str
    expected: str
    audio_s: float
    wer: float


# --- STT and TTS probes (in process) ----------------------------------------------------------------


def probe_tts(model_path: Path, threads: int, *, text: str = TTS_SENTENCE, runs: int = SPEECH_RUNS) -> float:
    """Median ms for Piper to synthesize `text` (one ~15-word sentence) after a warm-up."""
    from local_ai_server.engines.tts import PiperTts

    try:
        tts = PiperTts(Path(model_path), threads=threads)
    except FileNotFoundError as exc:
        raise BenchError(f"TTS probe: {exc}") from None
    tts.warm_up()
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        audio = tts.synthesize_all(text)
        times.append((time.perf_counter() - t0) * 1000)
        # A sentence this long is seconds of speech; far less means the voice is broken.
        if audio.size < tts.sample_rate:
            raise BenchError(f"TTS probe: {Path(model_path).name} produced {audio.size / tts.sample_rate:.2f} s "
                             f"of audio for a {len(text.split())}-word sentence")
    return round(statistics.median(times), 1)


def default_voice_path() -> Path:
    """The joe voice (what speaks the STT probe's input) in the default models dir."""
    registry = load_registry(default_registry_path())
    model = registry.models.get(DEFAULT_TTS_MODEL)
    if model is None:
        raise BenchError(f"STT probe: registry has no {DEFAULT_TTS_MODEL} voice to speak the test utterance")
    return default_models_dir() / model.dest


def measure_stt(model_dir: Path, threads: int, *, voice_path: Path | None = None, text: str = STT_SENTENCE,
                runs: int = SPEECH_RUNS) -> SttMeasurement:
    """Transcribe `text` spoken by a Piper voice (default: joe), resampled to 16 kHz; median ms after a warm-up."""
    from local_ai_server.audio import resample
    from local_ai_server.engines.stt import WhisperStt
    from local_ai_server.engines.tts import PiperTts

    try:
        # The same rendition every run: the word error rate check must not depend on Piper's noise.
        voice = PiperTts(Path(voice_path) if voice_path is not None else default_voice_path(), threads=1,
                         variation=False)
        stt = WhisperStt(Path(model_dir), threads=threads)
    except FileNotFoundError as exc:
        raise BenchError(f"STT probe: {exc}") from None
    audio = resample(voice.synthesize_all(text), voice.sample_rate, STT_RATE_HZ)
    del voice
    stt.transcribe(audio)  # warm-up on the real input: the first call pays lazy initialisation
    times, transcript = [], ""
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        transcript = stt.transcribe(audio).text
        times.append((time.perf_counter() - t0) * 1000)
    return SttMeasurement(ms=round(statistics.median(times), 1), transcript=transcript, expected=text,
                          audio_s=round(audio.size / STT_RATE_HZ, 2), wer=round(word_error_rate(text, transcript), 3))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference length, ignoring case and punctuation."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


