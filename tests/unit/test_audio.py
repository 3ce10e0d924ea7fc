"""Tests for local_ai_server.audio: G.711 mu-law, resampling, format negotiation, WAV helpers."""

from __future__ import annotations

import sys
import warnings
import wave
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from local_ai_server import audio
from local_ai_server.audio import (
    SUPPORTED_OUTPUT,
    StreamResampler,
    encode_output,
    float32_to_pcm16,
    is_silent,
    mulaw_decode,
    mulaw_encode,
    normalize_output_format,
    pcm16_to_float32,
    read_wav,
    resample,
    rms_dbfs,
    wav_bytes,
)
from local_ai_server.errors import UnsupportedAudio


def _load_audioop() -> ModuleType | None:
    """Import the stdlib audioop as a cross-check when it exists (removed in Python 3.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:
            return None
    return audioop


AUDIOOP = _load_audioop()
ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32)
ALL_CODES = bytes(range(256))


def _pcm(values: np.ndarray | list[int]) -> bytes:
    """Pack ints as little-endian PCM16."""
    return np.asarray(values, dtype=np.int32).astype("<i2").tobytes()


def _enc(value: int) -> int:
    """Encode one sample to its mu-law code."""
    return mulaw_encode(_pcm([value]))[0]


def _dec(code: int) -> int:
    """Decode one mu-law code to its PCM16 value."""
    return int(np.frombuffer(mulaw_decode(bytes([code])), dtype="<i2")[0])


def _tone(freq: float, rate: int, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    """A float32 sine tone."""
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    """Frequency of the largest FFT bin (Hann window, so leakage does not move the peak)."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


# ---------------------------------------------------------------------------
# mu-law
# ---------------------------------------------------------------------------

# G.711 Table 2a decoder output values (14-bit units) times 4 = 16-bit PCM.
# Each row: positive code, decoded value; the negative code is code & 0x7F with value negated.
G711_DECODE_REFERENCE = [
    (0xFF, 0),  # segment 0 start (value 0)
    (0xFE, 8),  # first step of segment 0 (2 * 4)
    (0xF0, 120),  # segment 0 end (30 * 4)
    (0xEF, 132),  # segment 1 start (33 * 4)
    (0xE0, 372),  # segment 1 end (93 * 4)
    (0xDF, 396),  # 99 * 4
    (0xD0, 876),  # 219 * 4
    (0xCF, 924),  # 231 * 4
    (0xC0, 1884),  # 471 * 4
    (0xBF, 1980),  # 495 * 4
    (0xB0, 3900),  # 975 * 4
    (0xAF, 4092),  # 1023 * 4
    (0xA0, 7932),  # 1983 * 4
    (0x9F, 8316),  # 2079 * 4
    (0x90, 15996),  # 3999 * 4
    (0x8F, 16764),  # 4191 * 4
    (0x80, 32124),  # segment 7 end (8031 * 4)
]

# G.711 decision values (14-bit units: 1, 31, 95, 223, 479, 991, 2015, 4063, 8159) times 4:
# the last input of one interval and the first of the next.
G711_ENCODE_REFERENCE = [
    (0, 0xFF),
    (3, 0xFF),
    (4, 0xFE),
    (123, 0xF0),
    (124, 0xEF),
    (379, 0xE0),
    (380, 0xDF),
    (891, 0xD0),
    (892, 0xCF),
    (1915, 0xC0),
    (1916, 0xBF),
    (3963, 0xB0),
    (3964, 0xAF),
    (8059, 0xA0),
    (8060, 0x9F),
    (16251, 0x90),
    (16252, 0x8F),
    (32124, 0x80),
    (32635, 0x80),
    (32767, 0x80),
]


@pytest.mark.parametrize(("code", "value"), G711_DECODE_REFERENCE)
def test_mulaw_decode_reference(code: int, value: int) -> None:
    assert _dec(code) == value
    assert _dec(code & 0x7F) == -value


def test_mulaw_decode_known_values() -> None:
    assert _dec(0x00) == -32124
    assert _dec(0x80) == 32124
    assert _dec(0xFF) == 0
    assert _dec(0x7F) == 0
    assert _dec(0x7E) == -8


@pytest.mark.parametrize(("value", "code"), G711_ENCODE_REFERENCE)
def test_mulaw_encode_reference(value: int, code: int) -> None:
    assert _enc(value) == code
    if value:
        # Sign-magnitude: the negative of a value gets the same code with the sign bit cleared.
        assert _enc(-value) == code & 0x7F


def test_mulaw_encode_extremes() -> None:
    assert _enc(-32768) == 0x00
    assert _enc(-1) == 0x7F  # magnitude 1 is below the first decision value: "negative zero"


def test_mulaw_decode_encode_roundtrip_all_codes() -> None:
    decoded = mulaw_decode(ALL_CODES)
    assert mulaw_decode(mulaw_encode(decoded)) == decoded
    reencoded = mulaw_encode(decoded)
    for code in range(256):
        # 0x7F ("negative zero") decodes to 0, which encodes as 0xFF.
        assert reencoded[code] == (0xFF if code == 0x7F else code)


def test_mulaw_encode_monotonic_and_symmetric() -> None:
    codes = mulaw_encode(_pcm(ALL_INT16))
    levels = np.frombuffer(mulaw_decode(codes), dtype="<i2").astype(np.int32)
    assert np.all(np.diff(levels) >= 0)
    assert len(np.unique(levels)) == 255  # 256 codes, two of them (0x7F, 0xFF) decode to 0
    code_arr = np.frombuffer(codes, dtype=np.uint8)
    pos = code_arr[32768 + 1 :]  # inputs 1..32767
    neg = code_arr[32768 - 1 : 0 : -1]  # inputs -1..-32767
    assert np.array_equal(neg, pos & 0x7F)


def test_mulaw_quantisation_error_bounded() -> None:
    levels = np.frombuffer(mulaw_decode(mulaw_encode(_pcm(ALL_INT16))), dtype="<i2").astype(np.int32)
    err = np.abs(levels - ALL_INT16)
    unclipped = np.abs(ALL_INT16) <= 32124
    # Within a segment of step 2**(seg+3) the error is at most one step.
    assert np.all(err[unclipped] <= np.maximum(8, np.abs(ALL_INT16[unclipped]) // 16 + 8))


def test_mulaw_lengths_and_errors() -> None:
    assert mulaw_encode(b"") == b""
    assert mulaw_decode(b"") == b""
    assert len(mulaw_encode(_pcm([1, 2, 3]))) == 3
    assert len(mulaw_decode(b"\x00\x01")) == 4
    with pytest.raises(ValueError):
        mulaw_encode(b"\x00\x01\x02")


@pytest.mark.skipif(AUDIOOP is None or sys.byteorder != "little", reason="audioop unavailable")
def test_mulaw_matches_audioop() -> None:
    assert AUDIOOP is not None
    assert mulaw_decode(ALL_CODES) == AUDIOOP.ulaw2lin(ALL_CODES, 2)
    ref = np.frombuffer(AUDIOOP.lin2ulaw(_pcm(ALL_INT16), 2), dtype=np.uint8)
    ours = np.frombuffer(mulaw_encode(_pcm(ALL_INT16)), dtype=np.uint8)
    # audioop (like the newer Sun g711.c) shifts the 2's complement sample right by 2
    # before taking the magnitude, i.e. it rounds negative samples towards -inf to a
    # multiple of 4; the sign-magnitude coder here treats -x like x. The two agree on
    # every non-negative sample and on every multiple of 4 (all decoder outputs)...
    agree = (ALL_INT16 >= 0) | (ALL_INT16 % 4 == 0)
    assert np.array_equal(ours[agree], ref[agree])
    # ...and audioop(x) is exactly our coder applied to x rounded down to a multiple of 4.
    floored = np.frombuffer(mulaw_encode(_pcm(ALL_INT16 & ~3)), dtype=np.uint8)
    assert np.array_equal(floored, ref)


# ---------------------------------------------------------------------------
# PCM16 <-> float32
# ---------------------------------------------------------------------------


def test_pcm16_float_roundtrip_exact() -> None:
    data = _pcm(ALL_INT16)
    x = pcm16_to_float32(data)
    assert x.dtype == np.float32
    assert x.min() == -1.0 and x.max() < 1.0
    assert float32_to_pcm16(x) == data


def test_float32_to_pcm16_clips_and_rounds() -> None:
    x = np.array([2.0, -2.0, 0.5, -0.5, 1.4 / 32768, 1.6 / 32768, np.nan, np.inf, -np.inf], dtype=np.float32)
    out = np.frombuffer(float32_to_pcm16(x), dtype="<i2").tolist()
    assert out == [32767, -32768, 16384, -16384, 1, 2, 0, 32767, -32768]


def test_pcm16_to_float32_rejects_odd_length() -> None:
    with pytest.raises(ValueError):
        pcm16_to_float32(b"\x00")


# ---------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------

RATE_PAIRS = [(22050, 8000), (48000, 16000), (8000, 16000), (44100, 16000), (24000, 16000)]


@pytest.mark.parametrize(("src", "dst"), RATE_PAIRS)
@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_resample_preserves_length_and_frequency(src: int, dst: int, freq: float) -> None:
    x = _tone(freq, src)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert abs(len(y) - len(x) * dst / src) <= 2
    assert _peak_hz(y, dst) == pytest.approx(freq, rel=0.01)
    assert rms_dbfs(y) == pytest.approx(rms_dbfs(x), abs=0.5)


def test_resample_identity_and_empty() -> None:
    x = _tone(440.0, 16000, 0.1)
    assert np.array_equal(resample(x, 16000, 16000), x)
    assert resample(np.zeros(0, dtype=np.float32), 8000, 16000).shape == (0,)
    assert resample(x.astype(np.float64), 16000, 8000).dtype == np.float32


@pytest.mark.parametrize("src", [8000, 22050, 24000, 44100, 48000])
def test_stream_resampler_matches_one_shot(src: int) -> None:
    x = _tone(440.0, src, 0.5)
    frame = src // 50  # 20 ms
    rs = StreamResampler(src, 16000)
    starts = range(0, len(x), frame)
    parts = [rs.process(x[i : i + frame], last=i + frame >= len(x)) for i in starts]
    streamed = np.concatenate(parts)
    one_shot = resample(x, src, 16000)
    assert abs(len(streamed) - len(one_shot)) <= 2
    n = min(len(streamed), len(one_shot))
    assert np.max(np.abs(streamed[:n] - one_shot[:n])) < 1e-3


def test_stream_resampler_reusable_after_last_and_identity() -> None:
    x = _tone(440.0, 8000, 0.2)
    rs = StreamResampler(8000, 16000)
    first = rs.process(x, last=True)
    second = rs.process(x, last=True)
    assert np.allclose(first, second, atol=1e-6)
    same = StreamResampler(16000, 16000)
    assert np.array_equal(same.process(x), x)
    assert np.array_equal(same.process(x, last=True), x)


# ---------------------------------------------------------------------------
# Format negotiation and wire encoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "rate", "expected"),
    [
        (None, None, ("mulaw", 8000, False)),
        ("mulaw", None, ("mulaw", 8000, False)),
        ("ulaw", 8000, ("mulaw", 8000, False)),
        ("MU-LAW", 8000, ("mulaw", 8000, False)),
        ("g711_ulaw", None, ("mulaw", 8000, False)),
        ("PCM_MULAW", 8000, ("mulaw", 8000, False)),
        ("linear16", None, ("linear16", 16000, False)),
        ("pcm16", 8000, ("linear16", 8000, False)),
        ("PCM16LE", 22050, ("linear16", 22050, False)),
        ("pcm_s16le", 24000, ("linear16", 24000, False)),
        ("slin", 48000, ("linear16", 48000, False)),
        ("slin16", 16000, ("linear16", 16000, False)),
        (" Linear16 ", 16000, ("linear16", 16000, False)),
        (None, 8000, ("mulaw", 8000, False)),
        (None, 16000, ("mulaw", 8000, True)),
        ("mulaw", 16000, ("mulaw", 8000, True)),
        ("linear16", 11025, ("mulaw", 8000, True)),
        ("linear16", 44100, ("mulaw", 8000, True)),
        ("linear16", "16000", ("mulaw", 8000, True)),
        ("linear16", 16000.0, ("mulaw", 8000, True)),
        ("linear16", True, ("mulaw", 8000, True)),
        ("opus", None, ("mulaw", 8000, True)),
        ("alaw", 8000, ("mulaw", 8000, True)),
        ("", None, ("mulaw", 8000, True)),
        (123, 8000, ("mulaw", 8000, True)),
    ],
)
def test_normalize_output_format(encoding: object, rate: object, expected: tuple[str, int, bool]) -> None:
    assert normalize_output_format(encoding, rate) == expected  # type: ignore[arg-type]


def test_normalize_output_format_accepts_every_supported_pair() -> None:
    for encoding, rates in SUPPORTED_OUTPUT.items():
        for rate in rates:
            assert normalize_output_format(encoding, rate) == (encoding, rate, False)


def test_encode_output_mulaw_and_linear16() -> None:
    x = _tone(440.0, 22050, 0.5)
    mu = encode_output(x, 22050, "mulaw", 8000)
    assert abs(len(mu) - 4000) <= 2
    back = pcm16_to_float32(mulaw_decode(mu))
    assert _peak_hz(back, 8000) == pytest.approx(440.0, rel=0.01)
    assert not is_silent(back)
    lin = encode_output(x, 22050, "linear16", 16000)
    assert abs(len(lin) - 2 * 8000) <= 4
    assert _peak_hz(pcm16_to_float32(lin), 16000) == pytest.approx(440.0, rel=0.01)
    same = encode_output(x, 22050, "linear16", 22050)
    assert same == float32_to_pcm16(x)
    with pytest.raises(ValueError):
        encode_output(x, 22050, "mulaw", 16000)
    with pytest.raises(ValueError):
        encode_output(x, 22050, "opus", 8000)


# ---------------------------------------------------------------------------
# Levels and WAV
# ---------------------------------------------------------------------------


def test_rms_dbfs_and_is_silent() -> None:
    assert rms_dbfs(np.zeros(100, dtype=np.float32)) == -np.inf
    assert rms_dbfs(np.zeros(0, dtype=np.float32)) == -np.inf
    assert rms_dbfs(np.ones(100, dtype=np.float32)) == pytest.approx(0.0)
    assert rms_dbfs(_tone(440.0, 16000, 1.0, amp=1.0)) == pytest.approx(-3.01, abs=0.05)
    assert rms_dbfs(np.full(10, 16384, dtype=np.int16)) == pytest.approx(-6.02, abs=0.01)
    assert is_silent(np.zeros(100, dtype=np.float32))
    assert is_silent(np.full(100, 1e-4, dtype=np.float32))  # -80 dBFS
    assert not is_silent(_tone(440.0, 16000, 0.1, amp=0.01))  # about -43 dBFS
    assert is_silent(_tone(440.0, 16000, 0.1, amp=0.01), threshold_dbfs=-30.0)


def test_wav_roundtrip_bytes_and_path(tmp_path: Path) -> None:
    x = _tone(440.0, 22050, 0.1)
    pcm = float32_to_pcm16(x)
    blob = wav_bytes(pcm, 22050)
    assert blob[:4] == b"RIFF"
    y, rate = read_wav(blob)
    assert rate == 22050 and float32_to_pcm16(y) == pcm
    path = tmp_path / "tone.wav"
    path.write_bytes(blob)
    for source in (path, str(path)):
        z, rate = read_wav(source)
        assert rate == 22050 and float32_to_pcm16(z) == pcm


def test_read_wav_rejects_stereo_and_8bit(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00" * 400)
    with pytest.raises(UnsupportedAudio, match="mono 16-bit") as info:
        read_wav(path)
    assert str(tmp_path) not in info.value.message
    path8 = tmp_path / "eight.wav"
    with wave.open(str(path8), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 100)
    with pytest.raises(UnsupportedAudio, match="8-bit"):
        read_wav(path8)


def test_read_wav_rejects_garbage() -> None:
    with pytest.raises(UnsupportedAudio, match="WAV"):
        read_wav(b"not a wav file at all")


def test_wav_bytes_rejects_odd_length() -> None:
    with pytest.raises(ValueError):
        wav_bytes(b"\x00", 8000)


def test_module_exports_are_public() -> None:
    for name in audio.__all__:
        assert hasattr(audio, name)


def test_normalize_input_format() -> None:
    assert audio.normalize_input_format("PCM16", 16000) == "pcm16le"
    assert audio.normalize_input_format(None, None) == "pcm16le"
    assert audio.normalize_input_format("ulaw", None) == "mulaw"
    assert audio.normalize_input_format("g711_ulaw", 8000) == "mulaw"
    with pytest.raises(UnsupportedAudio, match="format"):
        audio.normalize_input_format("opus", 8000)
    with pytest.raises(UnsupportedAudio, match="rate"):
        audio.normalize_input_format("mulaw", 16000)
    with pytest.raises(UnsupportedAudio, match="rate"):
        audio.normalize_input_format("pcm16le", 11025)
