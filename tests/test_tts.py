"""The TTS engine on the real joe-medium voice: sentences of every length do not grow its memory."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from local_ai_server.engines.tts import PiperTts
from local_ai_server.heap import malloc_trim
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
