"""The ctypes clause splitter: piper's exact output, without the C helper's leak."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

from local_ai_server.engines.tts import PiperTts
from local_ai_server.setup.selection import default_models_dir, read_selection

TEXTS = [
    "Hello there.",
    "Is it raining in Paris? I hope not! Bring a coat, a hat: and an umbrella; just in case.",
    "Your order 4521 ships on the 3rd of May, at 10:30 am",
    "Café, naïve, Zürich and São Paulo.",
    "",
    "   ",
    "Ünïcödé ☃ and emoji 🎉 too.",
    "A very long sentence " * 30 + "ends here.",
]


@pytest.fixture(scope="module")
def bridge() -> Any:
    """piper's espeakbridge as the server uses it: after loading the real voice and speaking once."""
    from piper import espeakbridge

    selection = read_selection(default_models_dir())
    if selection is None:
        pytest.fail("no models installed: run ./install.sh (scripts/test.sh does)")
    PiperTts(selection.path("tts"), threads=1).warm_up()
    assert getattr(espeakbridge, "leak_free", False), "PiperTts did not install the ctypes splitter"
    return espeakbridge


def test_same_clauses_as_piper(bridge: Any) -> None:
    original = bridge.original_get_phonemes
    for text in TEXTS:
        assert bridge.get_phonemes(text) == original(text), text
    clauses = bridge.get_phonemes(TEXTS[1])
    assert [c[1] for c in clauses] == ["?", "!", ",", ":", ";", "."]
    assert [c[2] for c in clauses] == [True, True, False, False, False, True]


def test_no_memory_kept_per_clause(bridge: Any) -> None:
    # piper's C helper kept two objects (the clause tuple and its phoneme string) for every clause.
    def blocks_after(fn: Any, n: int) -> int:
        gc.collect()
        before = sys.getallocatedblocks()
        for _ in range(n):
            fn("One, two. Three?")
        gc.collect()
        return sys.getallocatedblocks() - before

    leaked = blocks_after(bridge.original_get_phonemes, 300)
    kept = blocks_after(bridge.get_phonemes, 300)
    assert kept < 50, f"{kept} blocks kept over 300 calls (piper's own helper: {leaked})"


def test_embedded_null_is_refused_like_piper(bridge: Any) -> None:
    with pytest.raises(ValueError):
        bridge.get_phonemes("a\x00b")
