"""glibc heap settings: the arena cap reaches this process and the workers it spawns; the operator's wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from local_ai_server import heap


def test_default_cap_is_exported_for_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first, so monkeypatch restores the variable's original state after limit_arenas() sets it.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "")
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert heap.limit_arenas() == heap.DEFAULT_ARENAS
    assert os.environ["MALLOC_ARENA_MAX"] == str(heap.DEFAULT_ARENAS)
    # A spawned process (as the LLM workers are) sees the cap.
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(heap.DEFAULT_ARENAS)


def test_the_operators_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "6")
    assert heap.limit_arenas() == 6
    assert os.environ["MALLOC_ARENA_MAX"] == "6"


def test_trim_is_callable_on_glibc() -> None:
    trim = heap.malloc_trim()
    assert trim is not None, "this machine runs glibc: malloc_trim must be found"
    assert trim(0) in (0, 1)


def test_in_use_bytes_sees_an_allocation_and_its_release() -> None:
    before = heap.in_use_bytes()
    assert before is not None, "this machine runs glibc >= 2.33: mallinfo2 must be found"
    block = bytearray(8 * 1024 * 1024)  # above the mmap threshold: its own chunk
    held = heap.in_use_bytes()
    assert held is not None and held - before >= 8 * 1024 * 1024
    del block
    after = heap.in_use_bytes()
    assert after is not None and after < held - 4 * 1024 * 1024
