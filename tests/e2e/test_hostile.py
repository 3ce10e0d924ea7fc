"""Hostile input, round two: every request answered once, every reply encodable, every buffer bounded."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from .conftest import Client, ServerProc, start_server

SURROGATE = "\\ud800"
BUDGET = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def hostile_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("hostile"), models_dir,
                       env={"LOCAL_WS_SEND_BUFFER_BYTES": str(BUDGET), "LOCAL_LLM_MAX_TOKENS": "16"})
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


def unhandled(srv: ServerProc) -> list[str]:
    """Log lines of exceptions nobody handled (a request that got no answer leaves one)."""
    return [line for line in srv.logs().splitlines()
            if "never retrieved" in line or '"level": "error"' in line or "Traceback" in line]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def with_surrogate(obj: dict[str, Any], key: str) -> str:
    """The frame with `key`'s value replaced by a string holding a lone surrogate (valid JSON)."""
    return json.dumps(obj).replace(f'"{key}": "X"', f'"{key}": "a{SURROGATE}b"')


async def _raw_frame_reply(srv: ServerProc, frame: str,
                           until: str | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Send one frame, then a status; the replies up to the status (and the `until` type), and any close code."""
    async with websockets.connect(srv.url, max_size=None, ping_interval=None) as ws:
        await ws.send(frame)
        await ws.send(json.dumps({"type": "status", "request_id": "after"}))
        got: list[dict[str, Any]] = []
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(raw, bytes):
                    continue
                got.append(json.loads(raw))
                types = {m["type"] for m in got}
                if "status_response" in types and (until is None or until in types):
                    return got, None
        except websockets.ConnectionClosed as exc:
            return got, exc.rcvd.code if exc.rcvd else 1006


@pytest.mark.parametrize("key,obj", [
    ("request_id", {"type": "status", "request_id": "X"}),
    ("call_id", {"type": "llm_request", "text": "hi", "call_id": "X", "request_id": "r"}),
    ("text", {"type": "tts_request", "text": "X", "request_id": "r"}),
    ("text", {"type": "llm_request", "text": "X", "request_id": "r"}),
])
async def test_an_unencodable_string_gets_an_error_not_a_dropped_connection(
        hostile_server: ServerProc, key: str, obj: dict[str, Any]) -> None:
    """Before: the server echoed the surrogate, the send failed and the connection dropped (1006)."""
    got, closed = await _raw_frame_reply(hostile_server, with_surrogate(obj, key))
    assert closed is None, f"connection closed {closed}"
    errors = [m for m in got if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "invalid_field", got
    assert "lone surrogate" in errors[0]["message"] and key in errors[0]["message"]
    assert errors[0].get("request_id") == (None if key == "request_id" else "r")


@pytest.mark.parametrize("text,audible", [("Hello\x00world.", True), ("***", False),
                                          ("\U0001F600 \U0001F44D", False), ("|||---|||", False)])
async def test_every_tts_request_gets_its_tts_response(hostile_server: ServerProc, text: str,
                                                       audible: bool) -> None:
    """Before: NUL, or text that cleans to nothing speakable, left the request unanswered."""
    got, closed = await _raw_frame_reply(hostile_server, json.dumps({"type": "tts_request", "text": text,
                                                                     "request_id": "t"}), "tts_response")
    assert closed is None
    replies = [m for m in got if m.get("request_id") == "t"]
    assert [m["type"] for m in replies] == ["tts_response"], got
    assert replies[0]["text"] == text.replace("\x00", " ")
    assert (replies[0]["byte_length"] > 1000) == audible


async def test_text_of_control_characters_only_is_one_invalid_field(hostile_server: ServerProc) -> None:
    got, closed = await _raw_frame_reply(hostile_server, json.dumps({"type": "tts_request", "text": "\x07\x08",
                                                                     "request_id": "t"}), "error")
    replies = [m for m in got if m.get("request_id") == "t"]
    assert closed is None and [(m["type"], m["code"]) for m in replies] == [("error", "invalid_field")]


@pytest.mark.parametrize("path", [
    "models/a\x00b.gguf", "x" * 300 + ".gguf", "~unknownuser-xyz/model.gguf", "a/" * 2100 + "m.gguf",
    "models/\u00e9\u0301.gguf",
])
@pytest.mark.parametrize("kind", ["switch_model", "reload_llm"])
async def test_a_path_the_os_refuses_gets_exactly_one_answer(hostile_server: ServerProc, path: str,
                                                             kind: str) -> None:
    """Before: the OS error escaped the handler ("Task exception was never retrieved"), no reply at all."""
    msg: dict[str, Any] = {"type": kind, "request_id": "p"}
    msg["llm_model_path" if kind == "switch_model" else "model_path"] = path
    async with websockets.connect(hostile_server.url, max_size=None) as ws:
        c = Client(ws)
        reply_type = "switch_response" if kind == "switch_model" else "reload_response"
        await c.send(msg)
        err = await c.wait_type("error", timeout=30, request_id="p")
        assert err["code"] in ("invalid_field", "payload_too_large")
        status = await c.request({"type": "status", "request_id": "s"}, "status_response")
        assert status["models"]["llm"]["loaded"]
        await asyncio.sleep(0.2)
        # One error; refused after parsing (the path does not resolve), also the request's own reply.
        answers = [m["type"] for m in c.got.json() if m.get("request_id") == "p"]
        assert answers.count("error") == 1 and answers.count(reply_type) <= 1, answers
        assert all(m["status"] == "error" for m in c.got.json(reply_type))
        await c.close()
    assert not unhandled(hostile_server)


async def test_a_megabyte_system_item_is_refused_before_the_model(hostile_server: ServerProc) -> None:
    async with websockets.connect(hostile_server.url, max_size=None) as ws:
        c = Client(ws)
        err = await c.request({"type": "llm_request", "text": "hi", "request_id": "big",
                               "context": [{"role": "system", "content": "x" * 1_000_000}]}, "error")
        assert err["code"] == "payload_too_large" and err["request_id"] == "big"
        await c.close()
    assert hostile_server.metric("las_llm_generations_total", 'outcome="error"') == 0


async def _stop_reading_client(srv: ServerProc) -> websockets.ClientConnection:
    """A real client that reads nothing once one message waits unread (max_queue=1, a tiny socket buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    return await websockets.connect(srv.url, sock=sock, max_queue=1, max_size=None, ping_interval=None)


async def test_a_client_flooding_status_without_reading_is_closed_with_memory_bounded(
        hostile_server: ServerProc) -> None:
    """Before: 1.8 MB of status requests made the server hold ~210 MB for as long as the connection lived."""
    pid = hostile_server.proc.pid
    before = rss_kb(pid)
    slow = await _stop_reading_client(hostile_server)
    sent = 0
    frame = json.dumps({"type": "status"})
    try:
        for _ in range(60_000):  # ~1 MB of requests
            await slow.send(frame)
            sent += len(frame)
            if sent % 40_000 < len(frame):
                await asyncio.sleep(0.01)
    except websockets.ConnectionClosed:
        pass
    for _ in range(100):
        if "connection.send_queue_overflow" in hostile_server.logs():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    grown_mb = (rss_kb(pid) - before) / 1024
    slow.transport.abort()
    assert "connection.send_queue_overflow" in hostile_server.logs()
    print(f"status flood: sent {sent / 1e6:.2f} MB, server RSS +{grown_mb:.1f} MB")
    assert grown_mb < 40, f"server grew {grown_mb:.1f} MB for a client that sent {sent / 1e6:.1f} MB"
    await _others_still_served(hostile_server)


async def test_a_ping_flood_from_a_client_that_never_reads_is_dropped(hostile_server: ServerProc) -> None:
    """Before: every pong waited in the socket buffer (90 MB of pings -> +84 MB held)."""
    pid = hostile_server.proc.pid
    before = rss_kb(pid)
    slow = await _stop_reading_client(hostile_server)
    payload = b"p" * 120  # control frames carry at most 125 bytes: many small pings, as a flood would be
    sent = 0
    try:
        for i in range(400_000):
            await slow.ping(payload + str(i).encode())
            sent += len(payload)
            if i % 2000 == 0:
                await asyncio.sleep(0)
    except websockets.ConnectionClosed:
        pass
    for _ in range(100):
        if "connection.not_reading" in hostile_server.logs():
            break
        await asyncio.sleep(0.1)
    grown_mb = (rss_kb(pid) - before) / 1024
    slow.transport.abort()
    assert "connection.not_reading" in hostile_server.logs(), f"sent {sent / 1e6:.1f} MB of pings"
    print(f"ping flood: sent {sent / 1e6:.2f} MB, server RSS +{grown_mb:.1f} MB")
    assert grown_mb < BUDGET / 2**20 + 30, f"server grew {grown_mb:.1f} MB"
    await _others_still_served(hostile_server)


async def _others_still_served(srv: ServerProc) -> None:
    async with websockets.connect(srv.url) as ws:
        c = Client(ws)
        reply = await c.request({"type": "status", "request_id": "ok"}, "status_response")
        assert reply["status"] == "ok"
        await c.close()


def _http_raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes as an HTTP request; (status code, whole response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
    (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /ready HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"PUT /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /h\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 300 + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", 426),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 10000 + b"\r\n\r\n", 431),
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404),
    (b"GET /console/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /console/index.html HTTP/1.1\r\nHost: x\r\n\r\n", 404),
])
def test_malformed_http_gets_a_4xx_never_a_5xx(hostile_server: ServerProc, request_bytes: bytes,
                                               status: int) -> None:
    code, _ = _http_raw(hostile_server.port, request_bytes)
    assert code == status


def test_head_on_a_probe_has_the_headers_without_a_body(hostile_server: ServerProc) -> None:
    code, data = _http_raw(hostile_server.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert code == 200 and b"Content-Length:" in head and body == b""


def test_head_on_the_console_has_the_headers_without_a_body(hostile_server: ServerProc) -> None:
    code, data = _http_raw(hostile_server.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert code == 200 and b"Content-Type: text/html" in head and b"Content-Length:" in head and body == b""


def test_a_hostile_host_header_never_reaches_the_csp(hostile_server: ServerProc) -> None:
    """The console's CSP names the Host it was asked for only when that is a plain host[:port]."""
    code, data = _http_raw(hostile_server.port, b"GET / HTTP/1.1\r\nHost: evil.example; script-src *\r\n\r\n")
    head = data.partition(b"\r\n\r\n")[0].decode()
    csp = next(line for line in head.split("\r\n") if line.lower().startswith("content-security-policy:"))
    assert code == 200 and "evil" not in csp and "connect-src 'self';" in csp


def test_nothing_was_left_unhandled(hostile_server: ServerProc) -> None:
    """Last in the module: no exception escaped a handler during any of the tests above."""
    assert not unhandled(hostile_server), unhandled(hostile_server)[:5]
