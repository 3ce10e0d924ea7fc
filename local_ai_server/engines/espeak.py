"""Piper's espeak-ng clause splitter, called through ctypes: the bundled C helper leaks what it returns."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

# espeak-ng's speak_lib.h / translate.h values, as piper's espeakbridge.c uses them.
CHARS_AUTO = 0
PHONEMES_IPA = 0x02
_CLAUSE = 0x00040000
_SENTENCE = 0x00080000
_COMMA_INTONATION = 0x00001000
TERMINATORS = {
    40 | _SENTENCE: ".",
    40 | 0x00002000 | _SENTENCE: "?",
    45 | 0x00003000 | _SENTENCE: "!",
    20 | _COMMA_INTONATION | _CLAUSE: ",",
    30 | _CLAUSE: ":",
    30 | _COMMA_INTONATION | _CLAUSE: ";",
}

Clause = tuple[str, str, bool]
_LOCK = threading.Lock()  # espeak-ng keeps one global translator; ctypes calls run without the GIL


def clauses_via(fn: Any) -> Callable[[str], list[Clause]]:
    """get_phonemes() over espeak_TextToPhonemesWithTerminator, with the C helper's exact output."""

    def get_phonemes(text: str) -> list[Clause]:
        if "\x00" in text:
            raise ValueError("embedded null character")  # what the C helper's argument parsing says
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        cursor = ctypes.c_void_p(ctypes.addressof(buf))
        out: list[Clause] = []
        with _LOCK:
            while True:
                terminator = ctypes.c_int(0)
                raw = fn(ctypes.byref(cursor), CHARS_AUTO, PHONEMES_IPA, ctypes.byref(terminator))
                if raw is None:
                    break  # undecodable text: espeak did not move the cursor, so looping would never end
                flags = terminator.value & 0x000FFFFF
                out.append((raw.decode("utf-8", "replace"), TERMINATORS.get(flags, ""),
                            flags & _SENTENCE == _SENTENCE))
                if not cursor.value:
                    break
        return out

    return get_phonemes


def install() -> bool:
    """Swap piper's leaking espeakbridge.get_phonemes for the ctypes one; False if it cannot be found.

    The C helper appends each clause's tuple to its result list without releasing its own reference,
    so every clause ever spoken (a tuple and its phoneme string, ~170 bytes) stays in memory for good.
    """
    from piper import espeakbridge as bridge

    espeakbridge: Any = bridge  # patched below: attributes the stub does not declare
    if getattr(espeakbridge, "leak_free", False):
        return True
    try:
        lib = ctypes.CDLL(espeakbridge.__file__)  # the same loaded library, so the same initialised espeak
        fn = lib.espeak_TextToPhonemesWithTerminator
    except (OSError, AttributeError):
        return False
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    espeakbridge.original_get_phonemes = espeakbridge.get_phonemes
    espeakbridge.get_phonemes = clauses_via(fn)
    espeakbridge.leak_free = True
    return True
