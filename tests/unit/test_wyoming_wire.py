"""The Wyoming wire reader and writer, the listen address and the audio intake: no socket, no model."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wyoming.audio import AudioChunk
from wyoming.event import Event, async_read_event

from local_ai_server.fronts.wyoming import TextStream
from local_ai_server.fronts.wyoming_audio import AudioIn, BadAudio
from local_ai_server.fronts.wyoming_wire import TooLarge, WireError, WireLimits, WireParser, encode
from local_ai_server.wyoming_uri import DEFAULT_PORT, parse_uri

pytestmark = pytest.mark.unit


def _read_with_wyoming(raw: bytes) -> Event | None:
    """The `wyoming` package's own reader on our bytes: what every Wyoming peer sees."""

    async def main() -> Event | None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await async_read_event(reader)

    return asyncio.run(main())


def test_encoded_events_read_back_with_the_wyoming_package() -> None:
    event = AudioChunk(rate=22050, width=2, channels=1, audio=b"\x01\x02" * 500).event()
    got = _read_with_wyoming(encode(event))
    assert got is not None
    assert got.type == "audio-chunk" and got.payload == event.payload
    assert AudioChunk.from_event(got).rate == 22050


def test_an_event_without_data_has_no_data_length() -> None:
    header = json.loads(encode(Event(type="describe")).split(b"\n")[0])
    assert header["type"] == "describe" and "data_length" not in header and "version" in header


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["audio-chunk", "synthesize", "describe"]),
                          st.dictionaries(st.sampled_from(["text", "rate", "x"]), st.integers(0, 99), max_size=3),
                          st.binary(max_size=300)), min_size=1, max_size=6),
       st.integers(1, 50))
def test_any_split_of_the_stream_gives_the_same_events(events: list[tuple[str, dict[str, int], bytes]],
                                                       step: int) -> None:
    raw = b"".join(encode(Event(type=t, data=d, payload=p or None)) for t, d, p in events)
    parser = WireParser()
    out: list[Event] = []
    for i in range(0, len(raw), step):
        out += parser.feed(raw[i:i + step])
    assert [(e.type, e.data, e.payload or b"") for e in out] == [(t, d, p) for t, d, p in events]
    assert parser.buffered == 0


def test_data_after_the_header_is_merged_into_its_data() -> None:
    body = json.dumps({"text": "hi"}).encode()
    raw = json.dumps({"type": "synthesize", "data": {"a": 1}, "data_length": len(body)}).encode() + b"\n" + body
    (event,) = WireParser().feed(raw)
    assert event.data == {"a": 1, "text": "hi"}


def test_blank_lines_between_events_are_skipped_without_recursion() -> None:
    raw = b"\n" * 50_000 + encode(Event(type="ping"))
    assert [e.type for e in WireParser().feed(raw)] == ["ping"]


@pytest.mark.parametrize("raw, message", [
    (b"not json\n", "header is not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"data": {}}\n', "no event type"),
    (b'{"type": "x", "data": [1]}\n', "header data is not a JSON object"),
    (b'{"type": "x", "payload_length": -1}\n', "non-negative"),
    (b'{"type": "x", "payload_length": true}\n', "non-negative"),
    (b'{"type": "x", "data_length": 2}\n[]', "data is not a JSON object"),
])
def test_malformed_input_is_a_wire_error(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        WireParser().feed(raw)


def test_a_header_line_without_end_is_refused_once_over_the_limit() -> None:
    parser = WireParser(WireLimits(header_bytes=1024))
    parser.feed(b"{" + b" " * 1000)  # under the limit: still waiting for the newline
    with pytest.raises(TooLarge, match="header line"):
        parser.feed(b" " * 100)


@pytest.mark.parametrize("key", ["data_length", "payload_length"])
def test_declared_lengths_over_the_limits_are_refused_before_they_arrive(key: str) -> None:
    parser = WireParser(WireLimits(data_bytes=100, payload_bytes=100))
    with pytest.raises(TooLarge, match=key):
        parser.feed(json.dumps({"type": "audio-chunk", key: 101}).encode() + b"\n")
    assert parser.buffered == 0  # nothing of the announced bytes was waited for


# ---------------------------------------------------------------------- the listen address


@pytest.mark.parametrize("raw, expect", [
    ("tcp://0.0.0.0:10300", ("tcp", "0.0.0.0", 10300)),
    ("tcp://127.0.0.1", ("tcp", "127.0.0.1", DEFAULT_PORT)),
    ("tcp://[::1]:0", ("tcp", "::1", 0)),
    (" tcp://localhost:10301 ", ("tcp", "localhost", 10301)),
])
def test_tcp_addresses(raw: str, expect: tuple[str, str, int]) -> None:
    uri = parse_uri(raw)
    assert (uri.scheme, uri.host, uri.port) == expect
    assert parse_uri(str(uri)) == uri


def test_unix_addresses() -> None:
    uri = parse_uri("unix:///run/las/wyoming.sock")
    assert uri.scheme == "unix" and str(uri.path) == "/run/las/wyoming.sock"
    assert str(parse_uri("unix://relative.sock").path) == "relative.sock"


@pytest.mark.parametrize("raw, message", [
    ("http://x:1", "only tcp"), ("10300", "only tcp"), ("tcp://:10300", "needs a host"),
    ("tcp://h:99999", "port"), ("tcp://h:1/path", "only a host and a port"), ("unix://", "socket path"),
])
def test_bad_addresses_say_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_uri(raw)


# ---------------------------------------------------------------------- audio intake


def _tone(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize("rate, width, channels", [(16000, 2, 1), (44100, 2, 2), (8000, 1, 1), (48000, 4, 2)])
def test_any_pcm_format_becomes_16k_mono_of_the_same_length_and_level(rate: int, width: int, channels: int) -> None:
    x = _tone(rate, 0.5)
    if width == 1:
        raw = (x * 127 + 128).astype(np.uint8)
    elif width == 2:
        raw = (x * 32767).astype("<i2")
    else:
        raw = (x.astype(np.float64) * 2147483647).astype("<i4")
    frames = np.repeat(raw[:, None], channels, axis=1).tobytes()
    audio = AudioIn(max_s=10)
    for i in range(0, len(frames), 999):  # chunks that split samples (and frames) in two
        audio.add(frames[i:i + 999], rate, width, channels)
    out = audio.to_16k_mono()
    assert abs(out.size - 8000) < 0.02 * 8000 + 16
    assert 0.3 < float(np.sqrt(np.mean(out ** 2))) < 0.4  # a 0.5 sine's RMS is 0.354


def test_a_format_change_mid_stream_keeps_both_parts() -> None:
    audio = AudioIn(max_s=10)
    audio.add((_tone(16000, 0.25) * 32767).astype("<i2").tobytes(), 16000, 2, 1)
    audio.add((_tone(48000, 0.25) * 32767).astype("<i2").tobytes(), 48000, 2, 1)
    assert len(audio.segments) == 2
    assert abs(audio.to_16k_mono().size - 8000) < 100


@pytest.mark.parametrize("fmt, message", [((0, 2, 1), "rate"), ((16000, 3, 1), "width"), ((16000, 2, 0), "channels"),
                                          (("16000", 2, 1), "integer"), ((16000, True, 1), "integer")])
def test_formats_that_cannot_be_pcm_are_refused(fmt: tuple[object, object, object], message: str) -> None:
    audio = AudioIn(max_s=10)
    with pytest.raises(BadAudio, match=message):
        audio.add(b"\x00" * 64, *fmt)
    assert audio.seconds == 0


def test_audio_past_the_limit_is_refused_once_and_then_ignored() -> None:
    audio = AudioIn(max_s=1.0)
    second = b"\x00\x00" * 16000
    audio.add(second, 16000, 2, 1)
    with pytest.raises(BadAudio, match="longer than 1 s"):
        audio.add(b"\x00\x00", 16000, 2, 1)
    audio.add(second, 16000, 2, 1)  # no second error, and nothing more held
    assert audio.overflowed and audio.seconds == 1.0


# ---------------------------------------------------------------------- streamed synthesis text


def test_text_stream_yields_what_was_pushed_until_closed_and_bounds_its_size() -> None:
    async def main() -> list[str]:
        stream = TextStream(max_chars=10)
        assert stream.push("Hello, ") and stream.push("you")
        assert not stream.push("-too-long")  # would pass 10 characters: refused whole
        stream.close()
        assert not stream.push("late")
        return [t async for t in stream.stream()]

    assert asyncio.run(main()) == ["Hello, ", "you"]
