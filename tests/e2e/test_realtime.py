"""The OpenAI Realtime front against the `openai` SDK's own realtime client, with the real models."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websockets.typing import Subprotocol

from local_ai_server.audio import float32_to_pcm16, is_silent, mulaw_decode, pcm16_to_float32, resample

from .conftest import ServerProc, silence, start_server
from .test_concurrency import LONG_CONTEXT, LONG_ENV, LONG_PROMPT
from .test_voice import SENTENCE, wer

pytestmark = pytest.mark.e2e
TOKEN = "realtime-test-token"
TIMEOUT = 90
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def rt(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server with a token (the SDK sends it as a bearer token) and long generations allowed."""
    srv = start_server(tmp_path_factory.mktemp("rt"), models_dir, env={**LONG_ENV, "LOCAL_WS_AUTH_TOKEN": TOKEN})
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


def sdk(srv: ServerProc, key: str = TOKEN) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{srv.port}/v1",
                       websocket_base_url=f"ws://127.0.0.1:{srv.port}/v1")


class Events:
    """Every server event of a connection, as the SDK parsed it, read in the background."""

    def __init__(self, conn: AsyncRealtimeConnection) -> None:
        self.conn = conn
        self.all: list[Any] = []
        self._new = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for ev in self.conn:
            self.all.append(ev)
            self._new.set()

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.all if e.type == kind]

    def index(self, ev: Any) -> int:
        return next(i for i, e in enumerate(self.all) if e is ev)

    async def wait(self, pred: Callable[[Any], bool], after: int = 0, timeout: float = TIMEOUT) -> Any:
        """The first event from index `after` on that matches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for ev in self.all[after:]:
                if pred(ev):
                    return ev
            if self._task.done():
                raise AssertionError(f"connection ended; got {[e.type for e in self.all]}")
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out; got {[e.type for e in self.all][-40:]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def type(self, kind: str, after: int = 0, timeout: float = TIMEOUT) -> Any:
        return await self.wait(lambda e: e.type == kind, after, timeout)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def connected(srv: ServerProc) -> AsyncIterator[tuple[AsyncRealtimeConnection, Events]]:
    """A Realtime connection through the SDK, with its events read in the background."""
    async with sdk(srv).realtime.connect(model="local-test") as conn:
        events = Events(conn)
        try:
            yield conn, events
        finally:
            await events.close()


@pytest.fixture
async def session(rt: ServerProc) -> AsyncIterator[tuple[AsyncRealtimeConnection, Events]]:
    async with connected(rt) as pair:
        yield pair


def speech_24k(speak: Callable[[str], np.ndarray], text: str, lead: float = 0.3, tail: float = 1.2) -> bytes:
    """A spoken sentence (the installed Piper voice) as 24 kHz PCM16, with silence around it."""
    return float32_to_pcm16(resample(np.concatenate([silence(lead), speak(text), silence(tail)]), 16000, 24000))


async def stream(conn: AsyncRealtimeConnection, pcm: bytes, frame_ms: int = 40, realtime: bool = True) -> None:
    """input_audio_buffer.append at real-time pace."""
    step = 24000 * 2 * frame_ms // 1000
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i, start in enumerate(range(0, len(pcm), step)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start:start + step]).decode())
        if realtime:
            delay = t0 + (i + 1) * frame_ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)


def response_audio(events: Events, response_id: str) -> bytes:
    return b"".join(base64.b64decode(e.delta) for e in events.of("response.output_audio.delta")
                    if e.response_id == response_id)


async def ask(conn: AsyncRealtimeConnection, text: str) -> None:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})


def assert_unique_event_ids(events: Events) -> None:
    ids = [e.event_id for e in events.all]
    assert len(ids) == len(set(ids)), "an event_id was sent twice"


async def test_session_update_round_trip(session: tuple[AsyncRealtimeConnection, Events]) -> None:
    conn, ev = session
    created = await ev.type("session.created")
    s = created.session
    assert s.type == "realtime" and s.model == "local-test"
    assert s.audio.input.format.type == "audio/pcm" and s.audio.input.format.rate == 24000
    assert s.audio.output.format.type == "audio/pcm" and s.audio.input.turn_detection.type == "server_vad"
    # An unknown field too: the typed params do not know it, hence the cast.
    await conn.session.update(session=cast(Any, {
        "type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"],
        "audio": {"input": {"format": {"type": "audio/pcmu"},
                            "turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                               "silence_duration_ms": 700, "create_response": False}},
                  "output": {"format": {"type": "audio/pcma"}, "voice": "alloy"}},
        "some_future_field": {"x": 1}}))
    updated = (await ev.type("session.updated")).session
    assert updated.instructions == "Be brief." and updated.output_modalities == ["text"]
    assert updated.audio.input.format.type == "audio/pcmu" and updated.audio.output.format.type == "audio/pcma"
    td = updated.audio.input.turn_detection
    assert (td.threshold, td.prefix_padding_ms, td.silence_duration_ms, td.create_response, td.interrupt_response) \
        == (0.6, 200, 700, False, True)
    # A bad value: an error naming the field, and nothing of that update applied.
    mark = len(ev.all)
    await conn.send(cast(Any, {"type": "session.update", "event_id": "evt_bad_fmt",
                               "session": {"type": "realtime", "instructions": "changed",
                                           "audio": {"input": {"format": {"type": "audio/opus"}}}}}))
    err = await ev.type("error", mark)
    assert err.error.event_id == "evt_bad_fmt" and err.error.param == "session.audio.input.format"
    assert err.error.type == "invalid_request_error"
    # Beta flat fields; turn_detection null (manual turns).
    await conn.send(cast(Any, {"type": "session.update", "session": {
        "modalities": ["text", "audio"], "input_audio_format": "pcm16", "turn_detection": None}}))
    again = (await ev.type("session.updated", mark)).session
    assert again.instructions == "Be brief." and again.output_modalities == ["audio"]
    assert again.audio.input.format.type == "audio/pcm" and again.audio.input.turn_detection is None
    assert_unique_event_ids(ev)


async def test_server_vad_spoken_turn(session: tuple[AsyncRealtimeConnection, Events],
                                      speak: Callable[[str], np.ndarray]) -> None:
    conn, ev = session
    await conn.session.update(session={"type": "realtime", "instructions": "Answer in one short sentence."})
    await ev.type("session.updated")
    await stream(conn, speech_24k(speak, SENTENCE))
    done = await ev.type("response.done")
    assert done.response.status == "completed"
    kinds = [e.type for e in ev.all]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.input_audio_transcription.completed", "response.created",
             "response.output_item.added", "response.content_part.added", "response.output_audio.delta",
             "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
             "response.output_item.done", "response.done"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    started, stopped = ev.of("input_audio_buffer.speech_started")[0], ev.of("input_audio_buffer.speech_stopped")[0]
    committed = ev.of("input_audio_buffer.committed")[0]
    heard = ev.of("conversation.item.input_audio_transcription.completed")[0]
    assert started.item_id == stopped.item_id == committed.item_id == heard.item_id
    assert stopped.audio_end_ms > started.audio_start_ms
    assert wer(SENTENCE, heard.transcript) <= 0.2, heard.transcript
    for delta in ev.of("conversation.item.input_audio_transcription.delta"):
        assert delta.item_id == heard.item_id
    rid = done.response.id
    pcm = response_audio(ev, rid)
    seconds = len(pcm) / 2 / 24000
    transcript = ev.of("response.output_audio_transcript.done")[0].transcript
    assert transcript.strip()
    assert "".join(d.delta for d in ev.of("response.output_audio_transcript.delta")) == transcript
    # Plausible length: speech for the words of the answer (a word takes 0.1 to 1.5 s to say).
    words = len(transcript.split())
    assert 0.1 * words <= seconds <= 1.5 * words + 2, (seconds, transcript)
    assert not is_silent(pcm16_to_float32(pcm))
    assert done.response.output[0].content[0].transcript == transcript
    assert done.response.usage.output_tokens > 0
    assert_unique_event_ids(ev)


async def test_manual_turn_commit_then_response(session: tuple[AsyncRealtimeConnection, Events],
                                                speak: Callable[[str], np.ndarray]) -> None:
    conn, ev = session
    await conn.session.update(session={"type": "realtime", "instructions": "Answer in one short sentence.",
                                       "audio": {"input": {"turn_detection": None},
                                                 "output": {"format": {"type": "audio/pcmu"}}}})
    await ev.type("session.updated")
    await stream(conn, speech_24k(speak, QUESTION, tail=0.3), frame_ms=100, realtime=False)
    await conn.input_audio_buffer.commit()
    await conn.response.create()
    done = await ev.type("response.done")
    assert done.response.status == "completed"
    assert not ev.of("input_audio_buffer.speech_started"), "no VAD with turn_detection null"
    kinds = [e.type for e in ev.all]
    assert kinds.index("input_audio_buffer.committed") < kinds.index(
        "conversation.item.input_audio_transcription.completed") < kinds.index("response.created")
    heard = ev.of("conversation.item.input_audio_transcription.completed")[0]
    assert wer(QUESTION, heard.transcript) <= 0.2, heard.transcript
    ulaw = response_audio(ev, done.response.id)
    assert ulaw and not is_silent(pcm16_to_float32(mulaw_decode(ulaw)))
    assert "paris" in ev.of("response.output_audio_transcript.done")[0].transcript.lower()
    # An empty commit is refused; the session goes on.
    mark = len(ev.all)
    await conn.input_audio_buffer.commit(event_id="evt_empty")
    err = await ev.type("error", mark)
    assert err.error.code == "input_audio_buffer_commit_empty" and err.error.event_id == "evt_empty"


async def test_text_only_response(session: tuple[AsyncRealtimeConnection, Events]) -> None:
    conn, ev = session
    await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                       "instructions": "Answer in one short sentence."})
    await ev.type("session.updated")
    await ask(conn, QUESTION)
    item = await ev.type("conversation.item.done")
    assert item.item.role == "user" and item.item.content[0].text == QUESTION
    await conn.response.create()
    done = await ev.type("response.done")
    assert done.response.status == "completed" and done.response.output_modalities == ["text"]
    text = ev.of("response.output_text.done")[0].text
    assert "paris" in text.lower()
    assert "".join(d.delta for d in ev.of("response.output_text.delta")) == text
    assert not ev.of("response.output_audio.delta")
    # Per-response instructions, audio for this one response only; the answer stays in the conversation.
    mark = len(ev.all)
    await ask(conn, "And of Italy?")
    await conn.response.create(response={"instructions": "Answer with the city name only.",
                                         "output_modalities": ["audio"]})
    second = await ev.type("response.done", mark)
    assert second.response.status == "completed"
    assert response_audio(ev, second.response.id)
    assert "rome" in ev.of("response.output_audio_transcript.done")[-1].transcript.lower()


async def long_audio_response(conn: AsyncRealtimeConnection, ev: Events, **session: Any) -> tuple[str, int]:
    """Start an answer that takes long to speak; returns its id once its first audio delta is in."""
    await conn.session.update(session=cast(Any, {"type": "realtime", "instructions": LONG_CONTEXT[0]["content"],
                                                 **session}))
    await ev.type("session.updated")
    await ask(conn, LONG_PROMPT)
    mark = len(ev.all)
    await conn.response.create()
    created = await ev.type("response.created", mark)
    await ev.type("response.output_audio.delta", mark)
    return created.response.id, mark


def assert_nothing_after_done(ev: Events, rid: str) -> Any:
    done = next(e for e in ev.of("response.done") if e.response.id == rid)
    at = ev.index(done)
    late = [e.type for e in ev.all[at + 1:] if getattr(e, "response_id", None) == rid]
    assert late == [], f"events of {rid} after its response.done: {late}"
    return done


async def test_response_cancel(session: tuple[AsyncRealtimeConnection, Events]) -> None:
    conn, ev = session
    rid, mark = await long_audio_response(conn, ev, audio={"input": {"turn_detection": None}})
    await conn.response.cancel()
    done = await ev.type("response.done", mark)
    assert done.response.id == rid and done.response.status == "cancelled"
    assert done.response.status_details.reason == "client_cancelled"
    # A round trip through the same ordered stream: anything of the response still queued would come first.
    await conn.session.update(session={"type": "realtime"})
    await ev.type("session.updated", ev.index(done))
    assert_nothing_after_done(ev, rid)
    # Nothing to cancel now: an error, and the session goes on.
    mark = len(ev.all)
    await conn.response.cancel(event_id="evt_cancel")
    err = await ev.type("error", mark)
    assert err.error.code == "response_cancel_not_active" and err.error.event_id == "evt_cancel"
    assert_unique_event_ids(ev)


async def test_barge_in(session: tuple[AsyncRealtimeConnection, Events], speak: Callable[[str], np.ndarray]) -> None:
    conn, ev = session
    rid, mark = await long_audio_response(conn, ev)
    await stream(conn, speech_24k(speak, QUESTION))
    done = await ev.wait(lambda e: e.type == "response.done" and e.response.id == rid, mark)
    assert done.response.status == "cancelled" and done.response.status_details.reason == "turn_detected"
    started = ev.of("input_audio_buffer.speech_started")[-1]
    assert ev.index(started) < ev.index(done)
    # The spoken question is answered by a new response (create_response), after the cancelled one.
    answer = await ev.wait(lambda e: e.type == "response.done" and e.response.id != rid, ev.index(done))
    assert answer.response.status == "completed"
    assert_nothing_after_done(ev, rid)


async def test_bad_events_get_errors_and_the_session_goes_on(session: tuple[AsyncRealtimeConnection, Events],
                                                             rt: ServerProc) -> None:
    conn, ev = session
    await ev.type("session.created")
    ws = conn._connection  # raw frames: what the SDK itself would never send
    cases: list[tuple[str | bytes, str]] = [
        ("{not json", "invalid_json"),
        ('{"type": "no.such.event", "event_id": "e1"}', "invalid_event_type"),
        ('{"type": "session.update", "event_id": "e2", "session": {"audio": {"input": {"turn_detection": '
         '{"type": "server_vad", "threshold": 2}}}}}', "invalid_value"),
        ('{"type": "input_audio_buffer.append", "event_id": "e3", "audio": "%%%"}', "invalid_value"),
        ('{"type": "input_audio_buffer.commit", "event_id": "e4"}', "invalid_value"),
        ('{"type": "conversation.item.create", "event_id": "e5", "item": {"type": "message", "role": "user"}}',
         "invalid_type"),
        (b"\x00\x01", "invalid_event"),
    ]
    for frame, code in cases:
        mark = len(ev.all)
        await ws.send(frame)
        err = await ev.type("error", mark)
        assert err.error.code == code, (frame, err)
        assert "/" not in err.error.message and "Traceback" not in err.error.message
    assert [e.error.event_id for e in ev.of("error")][1:6] == ["e1", "e2", "e3", "e4", "e5"]
    # Still usable.
    await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
    await ask(conn, QUESTION)
    await conn.response.create()
    done = await ev.type("response.done")
    assert done.response.status == "completed"
    assert not [e for e in rt.log_events() if e.get("level") == "error"]


async def test_wrong_key_is_refused_at_the_handshake(rt: ServerProc) -> None:
    with pytest.raises(Exception) as info:
        async with sdk(rt, key="wrong").realtime.connect(model="x") as conn:
            await conn.recv()
    assert "401" in str(info.value)


async def test_a_browser_key_goes_as_a_subprotocol(rt: ServerProc) -> None:
    """OpenAI's browser convention: ["realtime", "openai-insecure-api-key.<key>"]; the server answers "realtime"."""
    url = f"ws://127.0.0.1:{rt.port}/v1/realtime?model=x"
    offered = [Subprotocol("realtime"), Subprotocol(f"openai-insecure-api-key.{TOKEN}")]
    async with websockets.connect(url, subprotocols=offered) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, subprotocols=[Subprotocol("realtime"),
                                                         Subprotocol("openai-insecure-api-key.wrong")]):
            pass
    assert info.value.response.status_code == 401


async def test_a_server_vad_turn_is_answered_early_in_the_documented_order(
        rt: ServerProc, session: tuple[AsyncRealtimeConnection, Events], speak: Callable[[str], np.ndarray]) -> None:
    """The response starts on the early transcript (held): the client sees nothing of it before the final."""
    conn, ev = session
    td = {"type": "server_vad", "silence_duration_ms": 1000}  # a long window: the early transcript lands inside it
    await conn.session.update(session=cast(Any, {"type": "realtime", "instructions": "Answer in one short sentence.",
                                                 "audio": {"input": {"turn_detection": td}}}))
    mark = ev.index(await ev.type("session.updated")) + 1
    await stream(conn, speech_24k(speak, QUESTION, tail=1.5))
    done = await ev.type("response.done", mark)
    rid, logged = done.response.id, rt.log_events()
    (start,) = [e for e in logged if e.get("event") == "realtime.response" and e.get("response") == rid]
    turn = [e for e in logged if e.get("event") == "turn.done" and e.get("session") == start["session"]][-1]
    assert (done.response.status, start["early"], turn["speculative"]) == ("completed", True, True)
    # Exactly the documented sequence: the answer's deltas collapsed, the user transcript's left out.
    kinds: list[str] = []
    for e in ev.all[mark:]:
        kind = "delta" if e.type.endswith("audio.delta") or e.type.endswith("transcript.delta") else e.type
        if e.type != "conversation.item.input_audio_transcription.delta" and (kind != "delta" or kinds[-1:] != [kind]):
            kinds.append(kind)
    assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.added",
                     "conversation.item.input_audio_transcription.completed", "conversation.item.done",
                     "response.created", "rate_limits.updated", "response.output_item.added",
                     "conversation.item.added", "response.content_part.added", "delta", "response.output_audio.done",
                     "response.output_audio_transcript.done", "response.content_part.done",
                     "response.output_item.done", "conversation.item.done", "response.done"], kinds
    assert {e.response_id for e in ev.all[mark:] if getattr(e, "response_id", None)} == {rid}
    deltas = [e.delta for e in ev.all[mark:] if e.type == "response.output_audio_transcript.delta"]
    assert "".join(deltas) == ev.of("response.output_audio_transcript.done")[-1].transcript != ""
    assert_unique_event_ids(ev)
