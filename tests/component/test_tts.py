"""The TTS engine on the real joe-medium voice: sentences of every length do not grow its memory."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from local_ai_server.engines.tts import PiperTts
from local_ai_server.heap import in_use_bytes, malloc_trim
from local_ai_server.setup.selection import default_models_dir, read_selection

WORDS = ("the quick brown fox jumps over a lazy dog while seven tired engineers measure how much memory "
         "a voice server keeps after every call").split()


@pytest.fixture(scope="module")
def voice() -> Path:
    selection = read_selection(default_models_dir())
    if selection is None:
        pytest.fail("no models installed: run ./install.sh (scripts/test.sh does)")
    return selection.path("tts")


def rss_mb() -> float:
    """Resident memory of this process."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * 4096 / 1e6


def test_sentences_of_changing_length_do_not_grow_memory(voice: Path) -> None:
    # onnxruntime's default arena kept ~10 MB more for every new longest sentence and never gave it back
    # (+430 MB after 50 sentences): the 30-minute soak grew the server by a quarter.
    trim = malloc_trim()
    assert trim is not None, "this machine runs glibc"
    tts = PiperTts(voice, threads=1, variation=False)
    rng = random.Random(7)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) + "." for _ in range(40)]
    for text in texts[:3]:
        tts.synthesize_all(text)
    trim(0)
    before = rss_mb()
    for text in texts:
        audio = tts.synthesize_all(text)
        assert audio.size > 0 and np.isfinite(audio).all()
    trim(0)
    grown = rss_mb() - before
    assert grown < 60, f"RSS grew by {grown:.0f} MB over {len(texts)} sentences"


def test_every_new_sentence_length_costs_no_native_memory(voice: Path) -> None:
    # onnxruntime's memory-pattern cache kept a plan per distinct input shape: ~25-40 KB of heap for
    # every sentence of a length not seen before (~1.5 MB over these 40), for as long as the server ran.
    # Counted in malloc's in-use bytes, which freed-but-kept pages do not blur as they blur RSS.
    tts = PiperTts(voice, threads=1, variation=False)
    tts.warm_up()
    rng = random.Random(11)
    texts = [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for words in range(1, 41)]
    before = in_use_bytes()
    assert before is not None, "this machine runs glibc >= 2.33"
    for text in texts:
        assert tts.synthesize_all(text).size > 0
    after = in_use_bytes()
    assert after is not None
    grown_kb = (after - before) / 1024
    assert grown_kb < 800, f"malloc holds {grown_kb:.0f} KB more after {len(texts)} new sentence lengths"
