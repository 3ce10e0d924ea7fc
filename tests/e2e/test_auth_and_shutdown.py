"""Authentication exactly as the protocol says, and a graceful SIGTERM with no orphans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from .conftest import Client, ServerProc, connect, pid_exists, start_server
from .test_concurrency import LONG_ENV, _start_long

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def auth_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("auth"), models_dir, env={"LOCAL_WS_AUTH_TOKEN": TOKEN})
    yield srv
    assert srv.stop() == 0


async def test_auth_ok(auth_server: ServerProc) -> None:
    c = await connect(auth_server, auth=False)
    reply = await c.request({"type": "auth", "auth_token": TOKEN, "call_id": "a1"}, "auth_response")
    assert reply == {"type": "auth_response", "status": "ok"}
    status = await c.request({"type": "status"}, "status_response")
    assert status["config"]["auth_required"] is True
    # The alias `token` works too.
    c2 = await connect(auth_server, auth=False)
    assert (await c2.request({"type": "auth", "token": TOKEN}, "auth_response"))["status"] == "ok"
    await c.close()
    await c2.close()


async def test_messages_before_auth_are_refused_and_dropped(auth_server: ServerProc) -> None:
    c = await connect(auth_server, auth=False)
    for msg in ({"type": "status"}, {"type": "llm_request", "text": "hi"}):
        reply = await c.request(msg, "auth_response")
        assert reply == {"type": "auth_response", "status": "error", "message": "authentication_required"}
    before = len(c.got.items)
    await c.send(b"\x00\x00" * 160)
    await c.wait_for(lambda m: len(c.got.items) > before)
    assert c.got.items[-1][1] == {"type": "auth_response", "status": "error", "message": "authentication_required"}
    assert not c.got.json("status_response") and not c.got.json("llm_response")
    await c.close()


async def test_wrong_token_three_times_closes_1008(auth_server: ServerProc) -> None:
    c = await connect(auth_server, auth=False)
    for i in range(3):
        reply = await c.request({"type": "auth", "auth_token": f"wrong-{i}"}, "auth_response")
        assert reply == {"type": "auth_response", "status": "error", "message": "invalid_auth_token"}
    for _ in range(100):
        if c.closed_code is not None:
            break
        await asyncio.sleep(0.05)
    assert c.closed_code == 1008
    # The token never appears in the server's logs.
    assert TOKEN not in auth_server.logs() and "wrong-0" not in auth_server.logs()


async def test_sigterm_closes_sessions_1001_and_leaves_no_orphans(models_dir: Path, tmp_path: Path) -> None:
    # An answer of 1500 tokens outlasts the drain: it is closed at the drain's timeout (tests/e2e/test_drain.py
    # has the calls that end their turn first).
    srv = start_server(tmp_path, models_dir, env={**LONG_ENV, "LOCAL_DRAIN_TIMEOUT_S": "1",
                                                  "LOCAL_DRAIN_NOTICE_S": "0.2"})
    c: Client = await connect(srv)
    await _start_long(c, "sigterm")
    status = await c.request({"type": "status"}, "status_response")
    pids = status["pool"]["pids"]
    assert pids and all(pid_exists(p) for p in pids)
    t0 = time.monotonic()
    code = await asyncio.to_thread(srv.stop, 30)
    elapsed = time.monotonic() - t0
    assert code == 0, srv.logs()[-2000:]
    for _ in range(100):
        if c.closed_code is not None:
            break
        await asyncio.sleep(0.05)
    assert c.closed_code == 1001
    assert not any(pid_exists(p) for p in pids), "LLM worker outlived the server"
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s (limit 10s)"
    drained = [e for e in srv.log_events() if e.get("event") == "server.drained"]
    assert [e["closed"] for e in drained] == [{"timeout": 1}], srv.logs()[-2000:]
    with pytest.raises(OSError):
        await websockets.connect(srv.url, open_timeout=2)
