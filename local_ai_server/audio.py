"""Pure audio helpers: PCM16/float conversion, G.711 mu-law, resampling, wire format negotiation, WAV."""

from __future__ import annotations

import io
import math
import os
import wave
from typing import Final

import numpy as np
import soxr

from local_ai_server.errors import UnsupportedAudio

__all__ = [
    "INTERNAL_RATE",
    "SUPPORTED_INPUT_RATES",
    "SUPPORTED_OUTPUT",
    "StreamResampler",
    "alaw_decode",
    "alaw_encode",
    "encode_output",
    "float32_to_pcm16",
    "is_silent",
    "mulaw_decode",
    "mulaw_encode",
    "normalize_output_format",
    "pcm16_to_float32",
    "read_wav",
    "resample",
    "rms_dbfs",
    "wav_bytes",
]

# The rate the STT engine (faster-whisper) consumes.
INTERNAL_RATE: Final[int] = 16000

SUPPORTED_INPUT_RATES: Final[tuple[int, ...]] = (8000, 16000, 22050, 24000, 44100, 48000)
SUPPORTED_OUTPUT: Final[dict[str, tuple[int, ...]]] = {
    "mulaw": (8000,),
    "linear16": (8000, 16000, 22050, 24000, 48000),
}

_DEFAULT_OUTPUT: Final[tuple[str, int]] = ("mulaw", 8000)
_DEFAULT_OUTPUT_RATE: Final[dict[str, int]] = {"mulaw": 8000, "linear16": 16000}

_OUTPUT_ALIASES: Final[dict[str, str]] = {
    **{a: "mulaw" for a in ("mulaw", "ulaw", "mu-law", "g711_ulaw", "pcm_mulaw")},
    **{a: "linear16" for a in ("linear16", "pcm16", "pcm16le", "pcm_s16le", "slin", "slin16")},
}
_INPUT_ALIASES: Final[dict[str, str]] = {
    **{a: "mulaw" for a in ("mulaw", "ulaw", "mu-law", "g711_ulaw", "pcm_mulaw")},
    **{a: "pcm16le" for a in ("pcm16le", "pcm16", "linear16", "slin", "pcm_s16le")},
}
_INPUT_RATES: Final[dict[str, tuple[int, ...]]] = {"pcm16le": SUPPORTED_INPUT_RATES, "mulaw": (8000,)}

# ---------------------------------------------------------------------------
# PCM16 <-> float32
# ---------------------------------------------------------------------------

_INT16_SCALE: Final[float] = 32768.0


def pcm16_to_float32(data: bytes) -> np.ndarray:
    """Convert little-endian signed 16-bit PCM to float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    # Dividing by a power of two is exact, so float32_to_pcm16 inverts this bit for bit.
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(_INT16_SCALE)


def float32_to_pcm16(x: np.ndarray) -> bytes:
    """Convert float samples (nominally [-1, 1]) to little-endian PCM16, clipping and rounding."""
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    # NaN would turn into an arbitrary int16 value; treat it as silence instead.
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    scaled = np.clip(np.rint(arr * _INT16_SCALE), -32768, 32767)
    return scaled.astype("<i2").tobytes()


# ---------------------------------------------------------------------------
# G.711 mu-law (ITU-T G.711, as in Sun's g711.c / the Reese-Campbell coder)
# ---------------------------------------------------------------------------

_ULAW_BIAS: Final[int] = 0x84
_ULAW_CLIP: Final[int] = 32635
# Upper bound of each of the 8 segments of the biased magnitude.
_ULAW_SEG_END: Final[np.ndarray] = np.array([0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF, 0x7FFF])


def _build_ulaw_decode_table() -> np.ndarray:
    """Return the 256-entry code -> int16 table (Sun's ulaw2linear)."""
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    values = np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS)
    return values.astype("<i2")


def _build_ulaw_encode_table() -> np.ndarray:
    """Return the 65536-entry table indexed by the uint16 view of an int16 sample."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    # G.711 is sign-magnitude: both signs quantise the magnitude the same way, so
    # encode(-x) == encode(x) ^ 0x80 (int32 keeps abs(-32768) from overflowing).
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), _ULAW_CLIP) + _ULAW_BIAS
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left").astype(np.int32)
    uval = (seg << 4) | ((mag >> (seg + 3)) & 0x0F)
    return (uval ^ mask).astype(np.uint8)


_ULAW_DECODE: Final[np.ndarray] = _build_ulaw_decode_table()
_ULAW_ENCODE: Final[np.ndarray] = _build_ulaw_encode_table()


def mulaw_encode(pcm16: bytes) -> bytes:
    """Encode little-endian PCM16 to G.711 mu-law bytes (one byte per sample)."""
    if len(pcm16) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    return _ULAW_ENCODE[np.frombuffer(pcm16, dtype="<u2")].tobytes()


def mulaw_decode(data: bytes) -> bytes:
    """Decode G.711 mu-law bytes to little-endian PCM16."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)].tobytes()


# ---------------------------------------------------------------------------
# G.711 A-law (ITU-T G.711: 13-bit magnitude, 8 segments, even bits inverted with 0x55)
# ---------------------------------------------------------------------------

# Upper bound of each segment of the 13-bit magnitude.
_ALAW_SEG_END: Final[np.ndarray] = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _build_alaw_decode_table() -> np.ndarray:
    """Return the 256-entry code -> int16 table."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype("<i2")


def _build_alaw_encode_table() -> np.ndarray:
    """Return the 65536-entry table indexed by the uint16 view of an int16 sample."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32) >> 3
    # Sign-magnitude again: negative samples code the magnitude of -x - 1 with the sign bit clear.
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left").astype(np.int32)
    shift = np.where(seg < 2, 1, seg)
    aval = (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, aval)  # past the last segment: clipped to the largest code
    return (aval ^ mask).astype(np.uint8)


_ALAW_DECODE: Final[np.ndarray] = _build_alaw_decode_table()
_ALAW_ENCODE: Final[np.ndarray] = _build_alaw_encode_table()


def alaw_encode(pcm16: bytes) -> bytes:
    """Encode little-endian PCM16 to G.711 A-law bytes (one byte per sample)."""
    if len(pcm16) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    return _ALAW_ENCODE[np.frombuffer(pcm16, dtype="<u2")].tobytes()


def alaw_decode(data: bytes) -> bytes:
    """Decode G.711 A-law bytes to little-endian PCM16."""
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)].tobytes()


# ---------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------


def _as_mono_float32(x: np.ndarray) -> np.ndarray:
    """Return x as a contiguous 1-D float32 array (soxr wants exactly that)."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))


def resample(x: np.ndarray, src_hz: int, dst_hz: int, quality: str = "HQ") -> np.ndarray:
    """Resample mono float32 audio from src_hz to dst_hz with soxr (identity when equal)."""
    arr = _as_mono_float32(x)
    if src_hz == dst_hz:
        return arr
    if src_hz <= 0 or dst_hz <= 0:
        raise ValueError("sample rates must be positive")
    if arr.size == 0:
        return np.zeros(0, dtype=np.float32)
    out: np.ndarray = soxr.resample(arr, src_hz, dst_hz, quality=quality)
    return np.asarray(out, dtype=np.float32)


class StreamResampler:
    """Chunked mono float32 resampler (soxr.ResampleStream) for streamed 20 ms frames."""

    def __init__(self, src_hz: int, dst_hz: int, quality: str = "HQ") -> None:
        """Create a resampler from src_hz to dst_hz; a no-op when the rates are equal."""
        if src_hz <= 0 or dst_hz <= 0:
            raise ValueError("sample rates must be positive")
        self.src_hz = src_hz
        self.dst_hz = dst_hz
        self._stream: soxr.ResampleStream | None = None
        if src_hz != dst_hz:
            self._stream = soxr.ResampleStream(src_hz, dst_hz, 1, dtype="float32", quality=quality)

    def process(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample one chunk; pass last=True on the final chunk to drain the filter tail."""
        arr = _as_mono_float32(chunk)
        if self._stream is None:
            return arr
        out = np.asarray(self._stream.resample_chunk(arr, last=last), dtype=np.float32)
        if last:
            # A drained soxr stream cannot take more input; clearing makes the object
            # reusable for the next utterance without paying the filter set-up again.
            self._stream.clear()
        return out

    def reset(self) -> None:
        """Drop any buffered state, ready for an unrelated signal."""
        if self._stream is not None:
            self._stream.clear()


# ---------------------------------------------------------------------------
# Wire formats
# ---------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    """Tell a real int from bool (a JSON `true` must not pass as rate 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_output_format(encoding: str | None, rate: int | None) -> tuple[str, int, bool]:
    """Resolve a client's requested output format to (encoding, rate, fell_back)."""
    if encoding is None and rate is None:
        return (*_DEFAULT_OUTPUT, False)
    if encoding is None:
        canonical: str | None = _DEFAULT_OUTPUT[0]
    elif isinstance(encoding, str):
        canonical = _OUTPUT_ALIASES.get(encoding.strip().lower())
    else:
        canonical = None
    if canonical is None:
        return (*_DEFAULT_OUTPUT, True)
    if rate is None:
        return (canonical, _DEFAULT_OUTPUT_RATE[canonical], False)
    if not _is_int(rate) or rate not in SUPPORTED_OUTPUT[canonical]:
        return (*_DEFAULT_OUTPUT, True)
    return (canonical, int(rate), False)


def encode_output(pcm16_mono_float: np.ndarray, src_hz: int, encoding: str, rate: int) -> bytes:
    """Resample float32 mono audio from src_hz to rate and encode it as mulaw or linear16 bytes."""
    canonical = _OUTPUT_ALIASES.get(encoding.strip().lower()) if isinstance(encoding, str) else None
    if canonical is None or rate not in SUPPORTED_OUTPUT[canonical]:
        # Callers are expected to pass the result of normalize_output_format; anything
        # else is a server bug, not a client error.
        raise ValueError(f"unsupported output format {encoding!r} at {rate!r} Hz")
    pcm = float32_to_pcm16(resample(pcm16_mono_float, src_hz, rate))
    return mulaw_encode(pcm) if canonical == "mulaw" else pcm


def _short(value: object) -> str:
    """Render a client-supplied value for an error message, bounded in length."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------
# Levels
# ---------------------------------------------------------------------------


def rms_dbfs(x: np.ndarray) -> float:
    """Return the RMS level in dB relative to full scale 1.0 (int16 arrays are scaled); -inf if silent."""
    arr = np.asarray(x)
    if arr.size == 0:
        return -math.inf
    if np.issubdtype(arr.dtype, np.integer):
        values = arr.astype(np.float64) / _INT16_SCALE
    else:
        values = arr.astype(np.float64)
    rms = float(np.sqrt(np.mean(np.square(values))))
    return 20.0 * math.log10(rms) if rms > 0.0 else -math.inf


def is_silent(x: np.ndarray, threshold_dbfs: float = -60.0) -> bool:
    """Tell whether x's RMS level is below threshold_dbfs."""
    return rms_dbfs(x) < threshold_dbfs


# ---------------------------------------------------------------------------
# WAV
# ---------------------------------------------------------------------------


def wav_bytes(pcm16: bytes, rate: int) -> bytes:
    """Wrap mono little-endian PCM16 in a WAV container."""
    if len(pcm16) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16)
    return buf.getvalue()


def read_wav(path_or_bytes: str | os.PathLike[str] | bytes) -> tuple[np.ndarray, int]:
    """Read a mono 16-bit WAV file or WAV bytes into (float32 samples, rate)."""
    source: io.BytesIO | str
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(path_or_bytes))
    else:
        source = os.fspath(path_or_bytes)
    try:
        with wave.open(source, "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            if channels != 1 or width != 2:
                raise UnsupportedAudio(
                    f"WAV must be mono 16-bit PCM, got {channels} channel(s) of {8 * width}-bit samples"
                )
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        # wave's own messages are fine, but never echo the path back to a client.
        raise UnsupportedAudio(f"not a readable PCM WAV file ({exc})") from exc
    return pcm16_to_float32(frames), rate


def normalize_input_format(fmt: str | None, rate: int | None) -> str:
    """Canonical input format ("pcm16le" | "mulaw") for a client's format and rate, or UnsupportedAudio."""
    canonical = _INPUT_ALIASES.get(fmt.strip().lower()) if isinstance(fmt, str) else "pcm16le"
    if canonical is None:
        raise UnsupportedAudio(f"unsupported audio format {_short(fmt)}; use pcm16le or mulaw")
    if rate is not None:
        rates = _INPUT_RATES[canonical]
        if not _is_int(rate) or rate not in rates:
            allowed = ", ".join(str(r) for r in rates)
            raise UnsupportedAudio(f"unsupported sample rate {_short(rate)} for {canonical}; use one of {allowed}")
    return canonical
