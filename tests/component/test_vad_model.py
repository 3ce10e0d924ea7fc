"""The streaming Segmenter with the real Silero VAD model on speech synthesized by the installed Piper voice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from local_ai_server.audio import resample
from local_ai_server.engines.vad import SileroVad
from local_ai_server.vad import SAMPLE_RATE, WINDOW, Event, Segmenter, SegmenterSettings, UtteranceEnd, UtteranceStart
from tests.unit.test_vad import _event_key, ends, starts

SENTENCES = (
    "The weather today is sunny and warm.",
    "Please call me back tomorrow morning.",
    "My account number is four five six.",
)
CHUNK = SAMPLE_RATE // 50  # 20 ms


@dataclass(frozen=True)
class Spoken:
    """Three synthesized sentences at 16 kHz."""

    sentences: tuple[np.ndarray, ...]


@pytest.fixture(scope="module")
def silero() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def spoken() -> Spoken:
    from local_ai_server.engines.tts import PiperTts
    from local_ai_server.setup.selection import default_models_dir, read_selection

    models_dir = default_models_dir()
    selection = read_selection(models_dir)
    if selection is None:
        pytest.fail(f"no models installed in {models_dir}: run ./install.sh first")
    tts = PiperTts(models_dir / selection.tts.path, threads=1, variation=False)
    parts = tuple(resample(tts.synthesize_all(s), tts.sample_rate, SAMPLE_RATE) for s in SENTENCES)
    for p in parts:
        assert 0.8 < p.size / SAMPLE_RATE < 6.0 and float(np.max(np.abs(p))) > 0.1
    return Spoken(parts)


def feed_in_chunks(seg: Segmenter, audio: np.ndarray, chunk: int = CHUNK) -> list[Event]:
    events: list[Event] = []
    for i in range(0, audio.size, chunk):
        events += seg.feed(audio[i:i + chunk])
    return events


def test_silero_batch_equals_window_by_window(silero: SileroVad, spoken: Spoken) -> None:
    audio = spoken.sentences[0]
    windows = audio[: audio.size // WINDOW * WINDOW].reshape(-1, WINDOW)
    batch = silero.stream().probs(windows)
    stream = silero.stream()
    stepwise = np.concatenate([stream.probs(windows[i:i + 3]) for i in range(0, len(windows), 3)])
    assert batch.shape == (len(windows),)
    np.testing.assert_allclose(stepwise, batch, atol=1e-5)
    assert batch.max() > 0.9 and batch.min() < 0.5


def test_three_sentences_give_three_utterances(silero: SileroVad, spoken: Spoken) -> None:
    pause = np.zeros(SAMPLE_RATE, dtype=np.float32)  # 1 s
    lead = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    pieces = [lead]
    bounds: list[tuple[float, float]] = []
    t = lead.size
    for s in spoken.sentences:
        bounds.append((t / SAMPLE_RATE, (t + s.size) / SAMPLE_RATE))
        pieces += [s, pause]
        t += s.size + pause.size
    audio = np.concatenate(pieces)

    seg = Segmenter(silero.stream())
    events = feed_in_chunks(seg, audio)
    assert [type(e) for e in events] == [UtteranceStart, UtteranceEnd] * 3
    utterances = ends(events)
    for end, sentence, (_s_start, s_end) in zip(utterances, spoken.sentences, bounds):
        assert end.reason == "silence"
        assert end.audio.dtype == np.float32
        assert abs(end.audio.size / SAMPLE_RATE - sentence.size / SAMPLE_RATE) <= 0.6
        # The end fires in the pause that follows its sentence, before the next one begins.
        assert s_end < end.at_ms / 1000 < s_end + 1.0
        assert end.speech_ms > 500
    for begin, (s_start, s_end) in zip(starts(events), bounds):
        assert s_start < begin.at_ms / 1000 < s_end
    assert seg.flush() is None


def test_real_model_chunking_does_not_change_events(silero: SileroVad, spoken: Spoken) -> None:
    pause = np.zeros(SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([pause, spoken.sentences[1], pause])
    small = feed_in_chunks(Segmenter(silero.stream()), audio)
    whole = feed_in_chunks(Segmenter(silero.stream()), audio, chunk=audio.size)
    assert len(ends(small)) == 1
    assert [_event_key(e) for e in small] == [_event_key(e) for e in whole]


@pytest.mark.parametrize("noise_std", [0.0, 0.001, 0.003])
@pytest.mark.parametrize("energy_threshold", [100, 0])
def test_silence_and_low_noise_give_no_utterance(silero: SileroVad, noise_std: float,
                                                 energy_threshold: int) -> None:
    rng = np.random.default_rng(7)
    audio = (rng.standard_normal(4 * SAMPLE_RATE) * noise_std).astype(np.float32)
    seg = Segmenter(silero.stream(), SegmenterSettings(energy_threshold=energy_threshold))
    assert feed_in_chunks(seg, audio) == []
    assert not seg.in_speech and seg.flush() is None
