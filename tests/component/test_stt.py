"""The STT engine on the real tiny.en model: the short encoder window hears what the 30 s one hears."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from local_ai_server.audio import resample
from local_ai_server.engines.stt import FULL_FRAMES, WhisperStt, cut_repetition, token_cap, window_frames
from local_ai_server.engines.tts import PiperTts
from local_ai_server.setup.bench import word_error_rate
from local_ai_server.setup.selection import default_models_dir, read_selection

SENTENCES = [
    "Please check the status of my order.",
    "I would like to change my delivery address.",
    "Could you please tell me whether the museum is open on public holidays and how much the tickets cost?",
]


@pytest.fixture(scope="module")
def models() -> tuple[Path, Path]:
    selection = read_selection(default_models_dir())
    if selection is None:
        pytest.fail("no models installed: run ./install.sh (scripts/test.sh does)")
    return selection.path("stt"), selection.path("tts")


@pytest.fixture(scope="module")
def speech(models: tuple[Path, Path]) -> dict[str, np.ndarray]:
    tts = PiperTts(models[1], threads=2, variation=False)
    return {s: resample(tts.synthesize_all(s), tts.sample_rate, 16000) for s in SENTENCES}


@pytest.fixture(scope="module")
def stt(models: tuple[Path, Path]) -> WhisperStt:
    engine = WhisperStt(models[0], threads=2)
    engine.warm_up()
    return engine


def test_window_is_the_utterance_plus_padding_in_whole_seconds() -> None:
    assert window_frames(16000 * 3, 1.0) == 400  # 3 s + 1 s
    assert window_frames(16000 * 3 + 1, 1.0) == 500  # a sample more needs the next second
    assert window_frames(16000 * 2, 0.0) == 200
    assert window_frames(16000 * 1, 2.0, min_s=4.0) == 400  # a short "yes" still gets 4 s
    assert window_frames(16000 * 29, 1.0) == FULL_FRAMES
    assert window_frames(16000 * 29 + 160, 1.0) is None  # does not fit: the full path takes it


@pytest.mark.parametrize("looped, kept", [
    ("Can I book a table for two? Can I book a table for", "Can I book a table for two?"),
    ("Are you open on Sunday evening? Are you open on Sunday evening? Are", "Are you open on Sunday evening?"),
    ("The weather is lovely today, so let us take a long walk in the park. So let us take a long walk in the "
     "park. So let us take", "The weather is lovely today, so let us take a long walk in the park."),
    ("No Thank You No Thank You No Thank You No No", "No Thank You"),
    ("yes yes yes yes yes", "yes"),
])
def test_loops_are_cut_where_they_start(looped: str, kept: str) -> None:
    assert cut_repetition(looped) == kept


@pytest.mark.parametrize("speech", [
    "I think, I think so.", "Thank you, thank you.", "No, no, no.", "it is what it is", "Yes, yes",
    "I need to cancel the order, please cancel the order", "Please check the status of my order.", "",
])
def test_ordinary_repetition_in_speech_is_kept(speech: str) -> None:
    assert cut_repetition(speech) == speech


def test_short_window_transcribes_like_the_full_one(stt: WhisperStt, speech: dict[str, np.ndarray]) -> None:
    # Piper speaks each sentence a little differently every time, so one word may go wrong either way:
    # the claim is about the whole set.
    short_wer, full_wer = [], []
    for text, audio in speech.items():
        stt.pad_s = 2.0
        short = stt.transcribe(audio)
        stt.pad_s = None
        full = stt.transcribe(audio)
        short_wer.append(word_error_rate(text, short.text))
        full_wer.append(word_error_rate(text, full.text))
        assert short.confidence is not None and 0 < short.confidence <= 1
        assert short.audio_s == pytest.approx(audio.size / 16000)
    stt.pad_s = 2.0
    assert sum(short_wer) / len(short_wer) <= 0.1, short_wer
    assert sum(short_wer) <= sum(full_wer) + 0.15, (short_wer, full_wer)


def test_silence_and_noise_give_no_words(stt: WhisperStt) -> None:
    assert stt.transcribe(np.zeros(16000 * 2, dtype=np.float32)).text == ""
    noise = np.random.default_rng(3).normal(0, 0.01, 16000 * 2).astype(np.float32)
    words = stt.transcribe(noise).text.split()
    assert len(words) <= 2  # at most a stray word: no invented sentences
    assert stt.transcribe(np.zeros(0, dtype=np.float32)).text == ""


def test_long_utterance_takes_the_full_path(stt: WhisperStt, speech: dict[str, np.ndarray]) -> None:
    # 31 s: the last sentence, then silence; too long for a short window.
    audio = np.concatenate([speech[SENTENCES[2]], np.zeros(16000 * 31 - speech[SENTENCES[2]].size, np.float32)])
    assert window_frames(audio.size, 1.0) is None
    assert word_error_rate(SENTENCES[2], stt.transcribe(audio).text) <= 0.1


def test_token_cap_bounds_a_looping_decode() -> None:
    assert token_cap(2.0, 2, 448) == 2 + 8 + 24
    assert token_cap(0.1, 2, 448) == 11  # a blip may still say a word or two
    assert token_cap(60.0, 2, 448) == 448  # never past the model's own limit
    # Generous for real speech: a fast talker says ~4 tokens a second.
    assert token_cap(5.0, 2, 448) - 2 > 5.0 * 4 * 2
