"""Audio a Wyoming client streams for transcription: any rate, width and channel count, bounded, to 16 kHz mono."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..audio import INTERNAL_RATE, resample

WIDTHS = (1, 2, 4)  # bytes per sample: unsigned 8-bit (as in WAV), signed 16-bit, signed 32-bit
MAX_CHANNELS = 8
MIN_RATE, MAX_RATE = 1000, 192000


class BadAudio(ValueError):
    """An audio chunk this server cannot read (its message is for the client)."""


@dataclass
class Segment:
    """Consecutive bytes of one format."""

    rate: int
    width: int
    channels: int
    data: bytearray = field(default_factory=bytearray)


def check_format(rate: object, width: object, channels: object) -> tuple[int, int, int]:
    """The format of a chunk as ints; raises BadAudio for one that cannot be PCM."""
    for name, value in (("rate", rate), ("width", width), ("channels", channels)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadAudio(f"audio {name} must be an integer")
    assert isinstance(rate, int) and isinstance(width, int) and isinstance(channels, int)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadAudio(f"audio rate must be {MIN_RATE} to {MAX_RATE} Hz, got {rate}")
    if width not in WIDTHS:
        raise BadAudio(f"audio width must be 1, 2 or 4 bytes, got {width}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadAudio(f"audio channels must be 1 to {MAX_CHANNELS}, got {channels}")
    return rate, width, channels


class AudioIn:
    """One utterance's audio as it arrives, up to `max_s` seconds; converted once, when it ends."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.segments: list[Segment] = []
        self.seconds = 0.0
        self.overflowed = False

    def add(self, audio: bytes, rate: object, width: object, channels: object) -> None:
        """Append one chunk; raises BadAudio for a bad format, or once when the utterance gets too long."""
        r, w, c = check_format(rate, width, channels)
        if self.overflowed:
            return
        seconds = len(audio) / (w * c * r)
        if self.seconds + seconds > self.max_s:
            self.overflowed = True
            raise BadAudio(f"audio longer than {self.max_s:g} s: it is not transcribed")
        if not self.segments or (self.segments[-1].rate, self.segments[-1].width,
                                 self.segments[-1].channels) != (r, w, c):
            self.segments.append(Segment(r, w, c))
        # Whole as it came: a sample split across two chunks is joined again (only the very end is cut).
        self.segments[-1].data += audio
        self.seconds += seconds

    def to_16k_mono(self) -> np.ndarray:
        """All of it as 16 kHz mono float32 (blocking: run it off the event loop)."""
        parts = [resample(_mono_float(s), s.rate, INTERNAL_RATE) for s in self.segments if s.data]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _mono_float(seg: Segment) -> np.ndarray:
    frame = seg.width * seg.channels
    raw = bytes(seg.data[:len(seg.data) - len(seg.data) % frame])
    if seg.width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif seg.width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    else:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    if seg.channels > 1:
        x = x.reshape(-1, seg.channels).mean(axis=1, dtype=np.float32)
    return x
