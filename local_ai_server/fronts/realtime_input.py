"""The Realtime endpoint's edges: its path and auth, the wire formats as the core's, a manual turn's audio."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..audio import alaw_decode, mulaw_decode, pcm16_to_float32, resample

PATH = "/v1/realtime"
# The core's input and output for each wire format (A-law is converted here: the core knows PCM and mu-law).
CORE_IN = {"audio/pcm": ("pcm16le", 24000), "audio/pcmu": ("mulaw", 8000), "audio/pcma": ("pcm16le", 8000)}
CORE_OUT = {"audio/pcm": ("linear16", 24000), "audio/pcmu": ("mulaw", 8000), "audio/pcma": ("linear16", 8000)}


def is_realtime_path(path: str) -> bool:
    """Whether a WebSocket request's path (query string allowed) is the Realtime endpoint."""
    return urlsplit(path).path.rstrip("/") == PATH


def model_of(path: str) -> str | None:
    """The `model` the client asked for in the query string."""
    values = parse_qs(urlsplit(path).query).get("model")
    return values[0][:200] if values else None


# A browser cannot set headers on a WebSocket: OpenAI's browser clients offer the subprotocols
# ["realtime", "openai-insecure-api-key.<key>"] instead, and the server answers "realtime".
SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."


def authorized(headers: Any, token: str | None) -> bool:
    """`Authorization: Bearer <token>`, or the browser's key subprotocol, matches the server's token (if any)."""
    if token is None:
        return True
    value = headers.get("Authorization") or ""
    scheme, _, given = value.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    return any(hmac.compare_digest(key.encode(), token.encode()) for key in _offered_keys(headers))


def _offered_keys(headers: Any) -> list[str]:
    """The keys a browser offered as `openai-insecure-api-key.<key>` subprotocols."""
    # websockets' Headers may hold the header more than once; a plain mapping (the unit tests) holds it once.
    values = headers.get_all("Sec-WebSocket-Protocol") if hasattr(headers, "get_all") else \
        [headers.get("Sec-WebSocket-Protocol") or ""]
    offered = [p.strip() for value in values for p in value.split(",")]
    return [p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)]


def subprotocol(path: str, offered: Sequence[str]) -> str | None:
    """The subprotocol to answer: "realtime" on the Realtime path when offered (a browser requires it), else none."""
    return SUBPROTOCOL if SUBPROTOCOL in offered and is_realtime_path(path) else None


def core_input(wire_format: str, payload: bytes) -> tuple[bytes, str, int]:
    """Audio as the client sent it -> (payload, format, rate) the core takes (A-law becomes PCM16)."""
    fmt, rate = CORE_IN[wire_format]
    return (alaw_decode(payload) if wire_format == "audio/pcma" else payload), fmt, rate


class ManualBuffer:
    """The input audio of a turn committed by hand (turn_detection null), bounded in seconds."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.seconds = 0.0
        self._segments: list[tuple[bytes, str, int]] = []

    def add(self, payload: bytes, fmt: str, rate: int) -> bool:
        """Keep one append (in the format it came in); False, and nothing kept, past `max_s`."""
        seconds = len(payload) / (2 if fmt == "pcm16le" else 1) / rate
        if self.seconds + seconds > self.max_s:
            return False
        self._segments.append((payload, fmt, rate))
        self.seconds += seconds
        return True

    def take(self) -> list[tuple[bytes, str, int]]:
        """Everything buffered, leaving the buffer empty."""
        segments, self._segments, self.seconds = self._segments, [], 0.0
        return segments

    def clear(self) -> None:
        """Forget what is buffered."""
        self.take()


def to_16k(segments: list[tuple[bytes, str, int]]) -> np.ndarray:
    """A manual turn's audio as 16 kHz float32 (what the STT engine takes)."""
    parts = [resample(pcm16_to_float32(mulaw_decode(p) if fmt == "mulaw" else p), rate, 16000)
             for p, fmt, rate in segments]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
