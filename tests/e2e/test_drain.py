"""Graceful drain on SIGTERM, on the real server: a call in the middle of an answer finishes it and then gets
1001, idle calls of every front (AVA, Realtime, Wyoming) go once the notice has passed, a new connection is
refused, /ready says "draining"; a second signal ends the drain at once."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe

from .conftest import Client, ServerProc, connect, free_port, start_server
from .test_concurrency import LONG_ENV, _start_long

pytestmark = pytest.mark.e2e
BOUND_S = 60  # a hang guard, never a timing assertion


def drain_env(**extra: str) -> dict[str, str]:
    return {**LONG_ENV, "LOCAL_DRAIN_NOTICE_S": "0.5", "LOCAL_DRAIN_TIMEOUT_S": "60", **extra}


async def wait_draining(srv: ServerProc) -> dict[str, Any]:
    """/ready once the server drains (it says so at once, while the port stays open for the probes)."""
    for _ in range(int(BOUND_S / 0.05)):
        status, body = await asyncio.to_thread(srv.http, "/ready")
        if status == 503 and json.loads(body)["status"] == "draining":
            return dict(json.loads(body))
        await asyncio.sleep(0.05)
    raise AssertionError(f"/ready never said draining:\n{srv.tail()}")


async def wait_closed(c: Client) -> int | None:
    await asyncio.wait_for(asyncio.shield(c._reader), BOUND_S)
    return c.closed_code


def events(srv: ServerProc, name: str) -> list[dict[str, Any]]:
    return [e for e in srv.log_events() if e.get("event") == name]


async def test_a_call_mid_answer_finishes_it_then_gets_1001_while_idle_calls_go_first(
        models_dir: Path, tmp_path: Path) -> None:
    wy_port = free_port()
    srv = start_server(tmp_path, models_dir, env=drain_env(LOCAL_LLM_MAX_TOKENS="160",
                                                           LOCAL_WYOMING_URI=f"tcp://127.0.0.1:{wy_port}"))
    try:
        busy = await connect(srv)
        idle = await connect(srv)
        assert (await idle.request({"type": "status"}, "status_response"))["type"] == "status_response"
        realtime = Client(await websockets.connect(f"ws://127.0.0.1:{srv.port}/v1/realtime?model=m",
                                                   max_size=None, ping_interval=None))
        await realtime.wait_type("session.created")
        wyoming = AsyncTcpClient("127.0.0.1", wy_port)
        await wyoming.connect()
        await wyoming.write_event(Describe().event())
        assert (await asyncio.wait_for(wyoming.read_event(), BOUND_S)).type == "info"  # type: ignore[union-attr]
        await _start_long(busy, "mid")  # its tokens flow: the answer is under way

        srv.proc.send_signal(signal.SIGTERM)
        ready = await wait_draining(srv)
        assert ready["calls"] == 4
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(srv.url, open_timeout=BOUND_S)
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body or b"{}")["status"] == "draining"
        assert srv.http("/health")[0] == 200  # alive: a supervisor must not kill a draining server

        # The idle calls go once the notice has passed, while the busy one is still answering.
        assert await wait_closed(idle) == 1001
        assert await wait_closed(realtime) == 1001
        assert await asyncio.wait_for(wyoming.read_event(), BOUND_S) is None  # Wyoming: the stream ends
        assert not busy.got.json("llm_response") and busy.closed_code is None

        # The busy call gets its whole answer, and then 1001.
        answer = await busy.wait_type("llm_response", timeout=BOUND_S, request_id="mid")
        tokens = [m for m in busy.got.json("llm_token") if m.get("request_id") == "mid"]
        assert answer["text"].strip() == "".join(t["token"] for t in tokens).strip()
        assert not busy.got.json("error")
        assert await wait_closed(busy) == 1001
        assert [k for k, _ in busy.got.items][-1] == "json"  # nothing after the answer but the close
        await wyoming.disconnect()

        assert await asyncio.to_thread(srv.proc.wait, BOUND_S) == 0, srv.tail()
        (draining,), (drained,) = events(srv, "server.draining"), events(srv, "server.drained")
        assert draining["calls"] == 4 and draining["timeout_s"] == 60 and draining["notice_s"] == 0.5
        assert drained["open_at_start"] == {"ava": 2, "realtime": 1, "wyoming": 1}
        assert drained["closed"] == {"between_turns": 4} and drained["left"] == 0
        done = [e for e in events(srv, "turn.done") if e.get("kind") == "llm_request"]
        assert done and done[-1]["tokens"] == 160  # the whole answer, up to LOCAL_LLM_MAX_TOKENS
    finally:
        srv.stop(10, reap=True)


async def test_a_second_signal_ends_the_drain_at_once(models_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, models_dir, env=drain_env())
    try:
        c = await connect(srv)
        await _start_long(c, "endless")  # 1500 tokens: far longer than this test waits
        srv.proc.send_signal(signal.SIGTERM)
        await wait_draining(srv)
        await asyncio.sleep(1.0)  # past the notice: the call is kept, as it is mid-answer
        assert c.closed_code is None
        srv.proc.send_signal(signal.SIGINT)
        assert await wait_closed(c) == 1001
        assert not c.got.json("llm_response")  # cut, not finished
        assert await asyncio.to_thread(srv.proc.wait, BOUND_S) == 0, srv.tail()
        (drained,) = events(srv, "server.drained")
        assert drained["closed"] == {"stopped": 1}
        assert [e["draining"] for e in events(srv, "server.signal")] == [False, True]
    finally:
        srv.stop(10, reap=True)
