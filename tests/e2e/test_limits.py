"""Limits and transport security: per-connection caps, utterance cap, one reload at a time, TLS, Origin."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.typing import Origin

from .conftest import Client, ServerProc, pcm16, silence, start_server


async def test_requests_in_flight_per_connection_are_capped(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    for i in range(12):
        await c.send({"type": "tts_request", "text": f"Request number {i} is here.", "request_id": i})
    busy = await c.wait_for(lambda m: m.get("type") == "error" and m.get("code") == "busy")
    assert isinstance(busy["request_id"], int)
    # Everything accepted is still answered; the connection keeps working.
    answered = {m["request_id"] for m in c.got.json("tts_response")}
    refused = {m["request_id"] for m in c.got.json("error") if m["code"] == "busy"}
    for _ in range(600):
        answered = {m["request_id"] for m in c.got.json("tts_response")}
        refused = {m["request_id"] for m in c.got.json("error") if m["code"] == "busy"}
        if len(answered | refused) == 12:
            break
        await asyncio.sleep(0.05)
    assert answered | refused == set(range(12)) and not answered & refused
    assert len(answered) >= 8


async def test_only_one_reload_at_a_time(client_factory: Callable[..., Any]) -> None:
    c = await client_factory()
    await c.send({"type": "reload_llm", "request_id": "r1"})
    await c.send({"type": "reload_llm", "request_id": "r2"})
    err = await c.wait_for(lambda m: m.get("type") == "error" and m.get("request_id") == "r2")
    assert err["code"] == "busy"
    ok = await c.wait_for(lambda m: m.get("type") == "reload_response" and m.get("request_id") == "r1", timeout=120)
    assert ok["status"] == "success"


async def test_status_is_answered_while_a_reload_loads(client_factory: Callable[..., Any]) -> None:
    """The new worker loads off the loop: status asked after the reload started is answered before it ends."""
    admin, probe = await client_factory(), await client_factory()
    await admin.send({"type": "reload_llm", "request_id": "rl"})
    for i in range(5):
        reply = await probe.request({"type": "status", "request_id": f"s{i}"}, "status_response")
        assert reply["request_id"] == f"s{i}"
    assert not admin.got.json("reload_response"), "five status round trips took longer than loading a model"
    done = await admin.wait_for(lambda m: m.get("type") == "reload_response", timeout=120)
    assert done["status"] == "success" and done["request_id"] == "rl"


async def test_endless_utterance_is_cut_with_an_error(models_dir: Path, tmp_path: Path,
                                                      speak: Callable[[str], np.ndarray]) -> None:
    srv = start_server(tmp_path, models_dir, env={"LOCAL_STT_MAX_UTTERANCE_S": "2"})
    try:
        c = Client(await websockets.connect(srv.url, ping_interval=None))
        await c.request({"type": "set_mode", "mode": "stt", "call_id": "long"}, "mode_ready")
        speech = np.concatenate([speak("This sentence keeps going and going without any pause at all for a while "
                                       "because the caller never stops talking to the machine."), silence(1.0)])
        await c.stream(speech, frame_ms=40, realtime=False)
        err = await c.wait_type("error", timeout=60)
        assert err["code"] == "payload_too_large" and "2 s" in err["message"]
        final = await c.wait_for(lambda m: m.get("type") == "stt_result" and m.get("is_final"), timeout=60)
        assert final["text"]
        await c.close()
    finally:
        assert srv.stop() == 0


async def test_audio_sent_faster_than_real_time_is_held_to_the_queue_cap(
        models_dir: Path, tmp_path: Path, speak: Callable[[str], np.ndarray]) -> None:
    """200 s of audio in one burst: frames past LOCAL_STT_MAX_QUEUED_S are refused, the session goes on."""
    srv = start_server(tmp_path, models_dir, env={"LOCAL_STT_MAX_QUEUED_S": "5"})
    try:
        c = Client(await websockets.connect(srv.url, ping_interval=None))
        await c.request({"type": "set_mode", "mode": "stt", "call_id": "flood"}, "mode_ready")
        second = pcm16(silence(1.0))
        for _ in range(200):  # no pacing: as fast as the socket takes them
            await c.send(second)
        status = await c.request({"type": "status"}, "status_response")
        assert status["status"] == "ok"
        busy = [m for m in c.got.json("error") if m.get("code") == "busy"]
        assert busy and "5 s of audio" in busy[0]["message"], c.got.json("error")
        # Refused frames changed nothing: a real utterance afterwards is transcribed.
        await asyncio.sleep(1.0)
        mark = len(c.got.items)
        await c.stream(np.concatenate([speak("Please check the status of my order."), silence(1.0)]))
        final = await c.wait_for(lambda m: m.get("type") == "stt_result" and m.get("is_final") and m.get("text")
                                 and any(v is m for _, v in c.got.items[mark:]), timeout=60)
        assert "order" in final["text"].lower()
        await c.close()
    finally:
        assert srv.stop() == 0


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


async def test_tls(models_dir: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    srv: ServerProc = start_server(tmp_path, models_dir, wait="none",
                                   env={"LOCAL_WS_TLS_CERT": str(cert), "LOCAL_WS_TLS_KEY": str(key)})
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        for _ in range(300):
            try:
                ws = await websockets.connect(f"wss://127.0.0.1:{srv.port}/", ssl=ctx)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("TLS server never accepted a connection")
        await ws.send(json.dumps({"type": "status"}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "status_response"
        await ws.close()
        # Plain ws:// to a TLS port fails: nothing is served unencrypted.
        with pytest.raises((OSError, websockets.InvalidHandshake, asyncio.TimeoutError)):
            await websockets.connect(f"ws://127.0.0.1:{srv.port}/", open_timeout=3)
    finally:
        assert srv.stop() == 0


async def test_origin_allow_list(models_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, models_dir, wait="listening",
                       env={"LOCAL_WS_ALLOWED_ORIGINS": "https://good.example"})
    try:
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(srv.url, origin=Origin("https://evil.example"))
        assert info.value.response.status_code == 403
        ok = await websockets.connect(srv.url, origin=Origin("https://good.example"))
        await ok.close()
        # Non-browser clients send no Origin and are not affected.
        plain = await websockets.connect(srv.url)
        await plain.close()
    finally:
        assert srv.stop() == 0


async def test_a_client_that_stops_reading_is_disconnected(models_dir: Path, tmp_path: Path) -> None:
    """A real slow reader: its replies pile up unsent; the server closes it, memory stays bounded, others live."""
    import socket

    srv = start_server(tmp_path, models_dir, env={"LOCAL_WS_SEND_QUEUE_MAX": "16", "LOCAL_WS_MAX_INFLIGHT": "4"})
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        # max_queue=1: the client library stops reading the socket once one message waits unread.
        slow = await websockets.connect(srv.url, sock=sock, max_queue=1, max_size=None, ping_interval=None)
        text = ("This is a long sentence that the server has to speak at a high sample rate, so that every "
                "reply is large and the connection fills up quickly when nobody reads it.")
        closed = False
        for i in range(80):
            try:
                await slow.send(json.dumps({"type": "tts_request", "text": text, "request_id": i,
                                            "output_encoding": "linear16", "output_sample_rate_hz": 48000}))
            except websockets.ConnectionClosed:
                closed = True
                break
            await asyncio.sleep(0.3)
            if "connection.send_queue_overflow" in srv.logs():
                break
        for _ in range(300):
            if "connection.send_queue_overflow" in srv.logs() and "session.closed" in srv.logs():
                break
            await asyncio.sleep(0.1)
        assert "connection.send_queue_overflow" in srv.logs(), "the server never noticed the client stopped reading"
        assert '"session.closed"' in srv.logs() or closed
        # Everybody else is still served.
        other = Client(await websockets.connect(srv.url))
        reply = await other.request({"type": "status"}, "status_response")
        assert reply["status"] == "ok" and reply["sessions"] == 1
        await other.close()
        slow.transport.abort()
    finally:
        assert srv.stop() == 0
