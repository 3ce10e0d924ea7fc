"""Admission on a full box (LOCAL_MAX_CALLS=1): a new call is refused `busy` at its start on every front,
/ready says `full`, and the call in progress is untouched. Each front through a client nobody here wrote:
websockets (AVA), the `openai` SDK (Realtime), the `wyoming` package's client (Home Assistant's)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from openai import AsyncOpenAI
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.handle import NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize

from .conftest import Client, ServerProc, connect, free_port, start_server

pytestmark = pytest.mark.e2e
TIMEOUT = 120
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def box(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server that takes one call at a time, with the Wyoming front on a free port (`box.wyoming_port`)."""
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("full"), models_dir,
                       env={"LOCAL_MAX_CALLS": "1", "LOCAL_WYOMING_URI": f"tcp://127.0.0.1:{port}"})
    srv.wyoming_port = port  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.tail()


def ready(srv: ServerProc) -> tuple[int, dict[str, Any]]:
    status, body = srv.http("/ready")
    return status, json.loads(body)


async def ready_again(srv: ServerProc, timeout: float = 30) -> None:
    """Wait until /ready says 200 (the place of a call that ended is freed as its connection closes)."""
    deadline = time.monotonic() + timeout
    while (status := (await asyncio.to_thread(ready, srv))[0]) != 200:
        assert time.monotonic() < deadline, f"/ready stayed {status}"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def call_in_progress(srv: ServerProc) -> AsyncIterator[Client]:
    """An AVA call that took the box's one place (its set_mode is its first request for work)."""
    await ready_again(srv)
    first = await connect(srv)
    try:
        reply = await first.request({"type": "set_mode", "mode": "llm", "call_id": "first", "request_id": "m"},
                                    "mode_ready")
        assert reply["mode"] == "llm"
        status, body = await asyncio.to_thread(ready, srv)
        assert (status, body["status"], body["calls"], body["max_calls"]) == (503, "full", 1, 1), body
        yield first
    finally:
        await first.close()
    await ready_again(srv)


async def answered(c: Client, rid: str) -> str:
    reply = await c.request({"type": "llm_request", "text": QUESTION, "request_id": rid}, "llm_response", TIMEOUT)
    assert reply.get("text"), reply
    return str(reply["text"])


def wyoming(srv: ServerProc) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", srv.wyoming_port)  # type: ignore[attr-defined]


async def test_ava_call_on_a_full_box_gets_busy_and_1013_while_the_call_in_progress_is_served(box: ServerProc) -> None:
    async with call_in_progress(box) as first:
        second = await connect(box)
        try:
            # A monitor is not a call: status is answered on a full box, and the connection stays.
            status = await second.request({"type": "status", "request_id": "s"}, "status_response")
            assert status["request_id"] == "s"
            await second.send({"type": "llm_request", "text": QUESTION, "request_id": "q2", "call_id": "second"})
            err = await second.wait_type("error", request_id="q2")
            assert err["code"] == "busy", err
            await asyncio.wait_for(asyncio.shield(second._reader), TIMEOUT)  # the server closes it
            assert second.closed_code == 1013
            assert not second.got.json("llm_response")
        finally:
            await second.close()
        # The call in progress is untouched.
        await answered(first, "q1")
        assert box.metric("las_calls_refused_total", 'front="ava"') >= 1
    # Its place is free: the next call is served.
    third = await connect(box)
    try:
        await answered(third, "q3")
    finally:
        await third.close()


async def test_realtime_call_on_a_full_box_gets_an_error_event_then_1013(box: ServerProc) -> None:
    sdk = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{box.port}/v1",
                      websocket_base_url=f"ws://127.0.0.1:{box.port}/v1")
    async with call_in_progress(box) as first:
        events: list[Any] = []

        async def read_all(conn: Any) -> None:
            async for ev in conn:
                events.append(ev)

        with pytest.raises(websockets.ConnectionClosedError) as closed:
            async with sdk.realtime.connect(model="local-test") as conn:
                await asyncio.wait_for(read_all(conn), TIMEOUT)
        assert [e.type for e in events] == ["error"], events
        assert events[0].error.code == "busy" and events[0].error.type == "server_error"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        await answered(first, "q1")
        assert box.metric("las_calls_refused_total", 'front="realtime"') >= 1
    async with sdk.realtime.connect(model="local-test") as conn:
        first_event = await asyncio.wait_for(conn.recv(), TIMEOUT)
        assert first_event.type == "session.created"


async def test_wyoming_request_on_a_full_box_gets_busy_then_the_connection_closes(box: ServerProc) -> None:
    async with call_in_progress(box) as first:
        async with wyoming(box) as c:
            # describe is not a call (Home Assistant asks it to list the services): answered on a full box.
            await c.write_event(Describe().event())
            info = await asyncio.wait_for(c.read_event(), TIMEOUT)
            assert info is not None and Info.is_type(info.type)
            await c.write_event(Synthesize(text="Hello there.").event())
            err = await asyncio.wait_for(c.read_event(), TIMEOUT)
            assert err is not None and err.type == "error" and err.data["code"] == "busy", err
            assert await asyncio.wait_for(c.read_event(), TIMEOUT) is None  # closed
        async with wyoming(box) as c:
            # Home Assistant's conversation client reads one event after its transcript: not-handled.
            await c.write_event(Transcript(text=QUESTION).event())
            reply = await asyncio.wait_for(c.read_event(), TIMEOUT)
            assert reply is not None and NotHandled.is_type(reply.type), reply
        await answered(first, "q1")
        assert box.metric("las_calls_refused_total", 'front="wyoming"') >= 2
    async with wyoming(box) as c:
        await c.write_event(Synthesize(text="Hello there.").event())
        chunks = 0
        while True:
            event = await asyncio.wait_for(c.read_event(), TIMEOUT)
            assert event is not None and event.type != "error", event
            chunks += AudioChunk.is_type(event.type)
            if event.type == "audio-stop":
                break
        assert chunks > 0
