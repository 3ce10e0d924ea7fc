"""glibc heap settings: fewer malloc arenas and periodic trimming keep a long-running server's RSS flat."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
DEFAULT_ARENAS = 2


def _libc() -> Any:
    """glibc, or None on other C libraries."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - probe: musl and macOS have no mallopt/malloc_trim
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def limit_arenas(default: int = DEFAULT_ARENAS) -> int | None:
    """Cap malloc arenas in this process and (through MALLOC_ARENA_MAX) in the workers it spawns.

    glibc gives every thread that allocates its own arena (up to 8 per core); the STT, TTS, VAD and
    helper threads each keep their own high-water mark of freed blocks. A 4-minute soak with 10 callers:
    peak RSS 1014 -> 881 MB and RSS at rest 574 -> 522 MB with two arenas, no fewer turns. An operator's
    own MALLOC_ARENA_MAX wins (glibc has read it already). Call before any thread starts.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        value = os.environ["MALLOC_ARENA_MAX"]
        return int(value) if value.isdigit() else None
    libc = _libc()
    if libc is None:
        return None
    os.environ["MALLOC_ARENA_MAX"] = str(default)  # spawned LLM workers read it at start
    libc.mallopt(M_ARENA_MAX, default)
    return default


def malloc_trim() -> Any:
    """glibc's malloc_trim, or None on other C libraries."""
    libc = _libc()
    return None if libc is None else libc.malloc_trim


class _Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def in_use_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (heap and mmapped chunks), or None without glibc.

    Unlike RSS this does not move with freed-but-kept pages, so it shows a native leak of a few KB.
    """
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _Mallinfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)
