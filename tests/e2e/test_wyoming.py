"""The Wyoming front against the `wyoming` package's own client (what Home Assistant uses), real models."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient, AsyncUnixClient
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from local_ai_server.audio import float32_to_pcm16, is_silent, pcm16_to_float32, resample

from .conftest import ServerProc, connect, free_port, start_server
from .test_concurrency import LONG_CONTEXT, LONG_ENV, LONG_PROMPT
from .test_voice import SENTENCE, wer

pytestmark = pytest.mark.e2e
TIMEOUT = 60
TWO_SENTENCES = "The weather is sunny today. Tomorrow it will rain in the afternoon."


@pytest.fixture(scope="module")
def wy(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server with the Wyoming front on a free TCP port (`wy.wyoming_port`), and long generations allowed."""
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("wy"), models_dir,
                       env={**LONG_ENV, "LOCAL_WYOMING_URI": f"tcp://127.0.0.1:{port}"})
    srv.wyoming_port = port  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


def client(srv: ServerProc) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", srv.wyoming_port)  # type: ignore[attr-defined]


async def read_until(c: Any, last: str, timeout: float = TIMEOUT) -> list[Event]:
    """Every event up to and including the first of type `last`."""
    events: list[Event] = []
    while True:
        event = await asyncio.wait_for(c.read_event(), timeout)
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type == last:
            return events


def pcm_of(x: np.ndarray, rate: int, width: int, channels: int) -> bytes:
    """16 kHz float audio as PCM of another rate, width and channel count."""
    y = resample(x, 16000, rate)
    if width == 1:
        raw = (np.clip(y, -1, 1) * 127 + 128).astype(np.uint8)
    else:
        raw = np.frombuffer(float32_to_pcm16(y), dtype="<i2")
    return np.repeat(raw[:, None], channels, axis=1).tobytes()


async def transcribe(c: Any, pcm: bytes, rate: int, width: int, channels: int) -> list[Event]:
    await c.write_event(Transcribe(language="en").event())
    await c.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = rate * width * channels // 10  # 100 ms chunks, as Home Assistant sends them
    for i in range(0, len(pcm), step):
        await c.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=pcm[i:i + step]).event())
    await c.write_event(AudioStop().event())
    return await read_until(c, "transcript-stop")


def speech_of(events: list[Event]) -> tuple[np.ndarray, int]:
    """The audio-chunk payloads as float audio, and their rate."""
    chunks = [AudioChunk.from_event(e) for e in events if e.type == "audio-chunk"]
    assert chunks, [e.type for e in events]
    assert {(c.width, c.channels) for c in chunks} == {(2, 1)}
    return pcm16_to_float32(b"".join(c.audio for c in chunks)), chunks[0].rate


# ---------------------------------------------------------------------- describe


async def test_describe_lists_the_loaded_models_as_home_assistant_reads_them(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(Describe().event())
        event = await asyncio.wait_for(c.read_event(), TIMEOUT)
    assert event is not None and Info.is_type(event.type)
    info = Info.from_event(event)
    (asr,), (tts,), (handle,) = info.asr, info.tts, info.handle
    assert asr.supports_transcript_streaming and tts.supports_synthesize_streaming
    assert not handle.supports_handled_streaming  # Home Assistant's agent reads one event after its transcript
    assert [m.name for m in asr.models] == ["whisper-tiny.en"] and asr.models[0].languages == ["en"]
    assert [v.name for v in tts.voices] == ["en_US-joe-medium"] and tts.voices[0].languages == ["en_US"]
    assert [m.name for m in handle.models] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert all(m.installed for m in [*asr.models, *tts.voices, *handle.models])
    assert asr.version and asr.models[0].version  # ours and faster-whisper's, from the installed packages


# ---------------------------------------------------------------------- speech to text


@pytest.mark.parametrize("rate, width, channels", [(16000, 2, 1), (44100, 2, 2), (8000, 1, 1)])
async def test_streamed_speech_is_transcribed_in_any_format(wy: ServerProc, speak: Callable[[str], np.ndarray],
                                                            rate: int, width: int, channels: int) -> None:
    async with client(wy) as c:
        events = await transcribe(c, pcm_of(speak(SENTENCE), rate, width, channels), rate, width, channels)
    types = [e.type for e in events]
    assert types[0] == "transcript-start" and types[-1] == "transcript-stop" and "transcript" in types
    text = Transcript.from_event(events[types.index("transcript")]).text
    chunks = "".join(e.data["text"] for e in events if e.type == "transcript-chunk")
    assert chunks == text  # the streamed chunks join back into the transcript
    assert wer(SENTENCE, text) <= 0.2, text


async def test_audio_in_a_bad_format_is_refused_and_the_connection_goes_on(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(AudioChunk(rate=16000, width=3, channels=1, audio=b"\x00" * 96).event())
        error = await read_until(c, "error")
        assert "width" in error[-1].data["text"] and error[-1].data["code"] == "unsupported_audio"
        await c.write_event(Ping(text="still there").event())
        assert (await read_until(c, "pong"))[-1].data["text"] == "still there"


# ---------------------------------------------------------------------- text to speech


async def test_synthesize_sends_speech_that_says_the_text(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(Synthesize(text=SENTENCE).event())
        events = await read_until(c, "audio-stop")
        assert events[0].type == "audio-start"
        audio, rate = speech_of(events)
        assert rate == 22050 and not is_silent(audio)
        assert 1.5 < audio.size / rate < 10  # a 13-word sentence
        # What was spoken is what was asked: our own transcription of it, on the same connection.
        heard = await transcribe(c, float32_to_pcm16(audio), rate, 2, 1)
    assert wer(SENTENCE, Transcript.from_event(heard[-2]).text) <= 0.2


async def test_streamed_synthesis_speaks_the_first_sentence_before_the_text_is_complete(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(SynthesizeStart().event())
        await c.write_event(SynthesizeChunk(text="The weather is sunny ").event())
        await c.write_event(SynthesizeChunk(text="today. Tomorrow").event())
        # The first sentence is complete: its audio comes while the rest of the text is still to be sent.
        first = await read_until(c, "audio-stop")
        assert first[0].type == "audio-start" and not is_silent(speech_of(first)[0])
        await c.write_event(SynthesizeChunk(text=" it will rain in the afternoon.").event())
        await c.write_event(Synthesize(text=TWO_SENTENCES).event())  # sent for older servers: not spoken twice
        await c.write_event(SynthesizeStop().event())
        rest = await read_until(c, "synthesize-stopped")
    assert [e.type for e in rest if e.type != "audio-chunk"] == ["audio-start", "audio-stop", "synthesize-stopped"]
    first_s = speech_of(first)[0].size / 22050
    rest_s = speech_of(rest)[0].size / 22050
    assert 0.8 < first_s < 4 and 1.2 < rest_s < 6


async def test_streamed_synthesis_speaks_the_first_clause_of_a_long_first_sentence_before_it_ends(
        wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(SynthesizeStart().event())
        await c.write_event(SynthesizeChunk(text="The weather in the mountains is lovely today, ").event())
        await c.write_event(SynthesizeChunk(text="and the warm sun").event())
        # The first sentence is still open (its last words are not even sent): its first clause is spoken.
        first = await read_until(c, "audio-stop")
        assert first[0].type == "audio-start" and not is_silent(speech_of(first)[0])
        await c.write_event(SynthesizeChunk(text=" shines on every peak. It is Paris, France.").event())
        await c.write_event(SynthesizeStop().event())
        rest = await read_until(c, "synthesize-stopped")
    # The rest of the first sentence, then the next one whole (only the first sentence is cut; and a tail of one
    # word, "France.", would not have been).
    assert [e.type for e in rest if e.type != "audio-chunk"] == ["audio-start", "audio-stop"] * 2 + [
        "synthesize-stopped"]


async def test_synthesis_of_nothing_speakable_still_ends(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(Synthesize(text="...").event())
        events = await read_until(c, "audio-stop")
    assert [e.type for e in events] == ["audio-start", "audio-stop"]


# ---------------------------------------------------------------------- conversation


def _llm_requests(srv: ServerProc, since: int) -> list[dict[str, Any]]:
    return [e for e in srv.log_events()[since:] if e.get("event") == "llm.request"]


async def test_a_transcript_is_answered_by_the_llm_and_remembered_on_the_connection(wy: ServerProc) -> None:
    since = len(wy.log_events())
    async with client(wy) as c:
        await c.write_event(Transcript(text="My name is Peter. Please say hello to me.").event())
        first = await asyncio.wait_for(c.read_event(), TIMEOUT)  # Home Assistant reads exactly one event
        assert first is not None and first.type == "handled", first
        assert first.data["text"].strip()
        await c.write_event(Transcript(text="What is my name?").event())
        second = await asyncio.wait_for(c.read_event(), TIMEOUT)
        assert second is not None and second.type == "handled" and second.data["text"].strip()
    turns = _llm_requests(wy, since)
    assert [t["history"] for t in turns] == [0, 2]  # the second turn was asked with the first one's exchange


async def test_an_empty_transcript_is_not_handled(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(Transcript(text="  ").event())
        event = await asyncio.wait_for(c.read_event(), TIMEOUT)
    assert event is not None and event.type == "not-handled" and "empty" in event.data["text"]


async def test_wyoming_is_served_while_a_websocket_caller_generates(wy: ServerProc,
                                                                    speak: Callable[[str], np.ndarray]) -> None:
    ws = await connect(wy)
    try:
        await ws.send({"type": "llm_request", "text": LONG_PROMPT, "request_id": "long", "stream": True,
                       "call_id": "long", "context": LONG_CONTEXT})
        await ws.wait_for(lambda m: m.get("type") == "llm_token")
        async with client(wy) as c:
            await c.write_event(Synthesize(text="One moment please.").event())
            assert not is_silent(speech_of(await read_until(c, "audio-stop"))[0])
            events = await transcribe(c, pcm_of(speak(SENTENCE), 16000, 2, 1), 16000, 2, 1)
            assert wer(SENTENCE, Transcript.from_event(events[-2]).text) <= 0.2
        # The long answer is still being generated: the Wyoming caller did not wait for it, nor stop it.
        assert not ws.got.json("llm_response"), "the generation ended before the Wyoming caller was served"
        tokens = len(ws.got.json("llm_token"))
        await ws.wait_for(lambda m: len(ws.got.json("llm_token")) > tokens + 5)
        await ws.request({"type": "barge_in", "request_id": "stop"}, "barge_in_ack")
    finally:
        await ws.close()


# ---------------------------------------------------------------------- bad input


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes: what a broken client gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("data, code", [
    (b"this is not json\n", "invalid_event"),
    (b'{"type": "audio-chunk", "payload_length": 999999999}\n', "payload_too_large"),
    (b"{" + b" " * 70_000, "payload_too_large"),
])
def test_unreadable_input_gets_an_error_then_the_connection_is_closed(wy: ServerProc, data: bytes, code: str) -> None:
    reply = _raw_exchange(wy.wyoming_port, data)  # type: ignore[attr-defined]
    header = json.loads(reply.split(b"\n", 1)[0])
    assert header["type"] == "error"
    body = json.loads(reply.split(b"\n", 1)[1][:header["data_length"]])
    assert body["code"] == code and "Traceback" not in body["text"] and "/" not in body["text"]
    assert wy.http("/health")[0] == 200


async def test_unknown_events_are_ignored(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(Event(type="no-such-event", data={"x": 1}))
        await c.write_event(Ping(text="after").event())
        events = await read_until(c, "pong")
    assert [e.type for e in events] == ["pong"]


# ---------------------------------------------------------------------- unix socket, streamed answers


async def test_unix_socket_and_streamed_conversation_answers(models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "wyoming.sock"
    srv = start_server(tmp_path, models_dir, env={"LOCAL_WYOMING_URI": f"unix://{path}",
                                                  "LOCAL_WYOMING_HANDLE_STREAMING": "1"})
    try:
        async with AsyncUnixClient(str(path)) as c:
            await c.write_event(Describe().event())
            info = Info.from_event((await read_until(c, "info"))[-1])
            assert info.handle[0].supports_handled_streaming
            await c.write_event(Transcript(text="Say hello in one short sentence.").event())
            events = await read_until(c, "handled-stop")
        types = [e.type for e in events]
        assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"]
        chunks = "".join(e.data["text"] for e in events if e.type == "handled-chunk")
        assert chunks.strip() == events[-2].data["text"] and chunks.strip()
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    assert not path.exists()  # the socket file is removed at shutdown


# ---------------------------------------------------------------------- zeroconf


async def test_zeroconf_announces_the_service_where_home_assistant_finds_it(models_dir: Path, tmp_path: Path) -> None:
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    port = free_port()
    name = f"las-test-{port}"
    srv = start_server(tmp_path, models_dir, env={"LOCAL_WYOMING_URI": f"tcp://0.0.0.0:{port}",
                                                  "LOCAL_WYOMING_ZEROCONF": name})
    browser = AsyncZeroconf()
    try:
        # As Home Assistant's discovery does: the service type, then the address and port it names.
        info = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.")
        assert await info.async_request(browser.zeroconf, 10_000), srv.tail()
        assert info.port == port and info.parsed_addresses()
        async with AsyncTcpClient(info.parsed_addresses()[0], info.port) as c:
            await c.write_event(Describe().event())
            assert Info.is_type((await read_until(c, "info"))[-1].type)
    finally:
        await browser.async_close()
        assert srv.stop() == 0, srv.logs()[-3000:]


async def test_shutdown_ends_open_wyoming_connections_cleanly(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = start_server(tmp_path, models_dir, env={"LOCAL_WYOMING_URI": f"tcp://127.0.0.1:{port}"})
    try:
        async with AsyncTcpClient("127.0.0.1", port) as c:
            # A streamed synthesis left open (its text never ends) and a transcription half sent.
            await c.write_event(SynthesizeStart().event())
            await c.write_event(SynthesizeChunk(text="This sentence never").event())
            await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await c.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\x00\x01" * 1600).event())
            code = await asyncio.to_thread(srv.stop)
            assert code == 0, srv.logs()[-3000:]
            assert await asyncio.wait_for(c.read_event(), TIMEOUT) is None  # closed, not left hanging
    finally:
        srv.stop()
    assert not [e for e in srv.log_events() if e.get("event") in ("task.failed", "tasks.not_stopped")]


async def test_describe_is_answered_while_a_long_synthesis_runs(wy: ServerProc) -> None:
    async with client(wy) as c:
        await c.write_event(Synthesize(text=" ".join([TWO_SENTENCES] * 8)).event())
        await c.write_event(Describe().event())
        events = await read_until(c, "audio-stop")
        types = [e.type for e in events]
        if "info" not in types:
            types += [e.type for e in await read_until(c, "info")]
    # Not queued behind the synthesis: it came before the synthesis ended.
    assert types.index("info") < types.index("audio-stop")
