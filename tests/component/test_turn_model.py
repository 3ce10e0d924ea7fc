"""Smart Turn v3.2 on real speech (the embedded Piper voice): a finished question is complete, a cut one is not."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from local_ai_server.audio import resample
from local_ai_server.engines.tts import PiperTts
from local_ai_server.engines.turn import SmartTurn
from local_ai_server.setup.registry import load_registry
from local_ai_server.setup.selection import default_models_dir, read_selection, repo_root

THRESHOLD = 0.5  # the server's default LOCAL_TURN_THRESHOLD
PAUSE = np.zeros(3200, dtype=np.float32)  # the 200 ms pause at which the server asks the detector


@pytest.fixture(scope="module")
def detector() -> SmartTurn:
    root = repo_root()
    assert root is not None
    path = default_models_dir() / load_registry(root / "registry.json").models["smart-turn-v3.2-cpu"].dest
    if not path.is_file():
        pytest.fail(f"{path} missing: run ./install.sh (scripts/test.sh does)")
    return SmartTurn(path, threads=1)


@pytest.fixture(scope="module")
def speak() -> Callable[[str], np.ndarray]:
    selection = read_selection(default_models_dir())
    assert selection is not None, "no models installed: run ./install.sh"
    tts = PiperTts(selection.path("tts"), threads=1, variation=False)

    def _speak(text: str) -> np.ndarray:
        audio = resample(tts.synthesize_all(text), tts.sample_rate, 16000)
        voiced = np.nonzero(np.abs(audio) > 0.01)[0]
        return audio[: voiced[-1] + 1]  # the speech itself, without Piper's trailing silence

    return _speak


# The unfinished half two ways: the finished recording stopped where the prefix ends ("cut"), and the
# prefix spoken on its own ("alone"). bench/turn_detector.py shows the detector is not always right on
# such cuts (8 questions: see its output); these are cases it gets right with a clear margin.
@pytest.mark.parametrize(("question", "prefix", "how"), [
    ("What time do you open tomorrow morning?", "What time do you", "cut"),
    ("What is the weather like in Paris today?", "What is the weather like in", "alone"),
])
def test_finished_question_is_complete_and_the_cut_one_is_not(detector: SmartTurn, speak: Callable[[str], np.ndarray],
                                                              question: str, prefix: str, how: str) -> None:
    full = speak(question)
    part = speak(prefix)
    cut = full[: part.size] if how == "cut" else part
    p_full = detector.probability(np.concatenate([full, PAUSE]))
    p_cut = detector.probability(np.concatenate([cut, PAUSE]))
    assert p_full >= THRESHOLD, (question, p_full)
    assert p_cut < THRESHOLD, (prefix, p_cut)


def test_features_are_whisper_log_mels_of_the_last_8_s(detector: SmartTurn) -> None:
    rng = np.random.default_rng(1)
    short = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    feats = detector.features(short)
    assert feats.shape == (80, 800) and feats.dtype == np.float32
    # A short clip is padded in front: the last second is where the sound is, the start is the floor.
    assert feats[:, -50:].mean() > feats[:, :50].mean() + 0.5
    # Longer audio keeps only its last 8 s: 10 s ending in the same clip gives the same features.
    long = np.concatenate([(rng.standard_normal(9 * 16000) * 0.3).astype(np.float32), short])
    tail = detector.features(long)
    np.testing.assert_allclose(tail, detector.features(long[-128000:]), atol=1e-5)
    assert detector.probability(np.zeros(0, dtype=np.float32)) == 0.0
