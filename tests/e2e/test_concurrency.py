"""Non-blocking and worker faults, shown by ordering and counters against a server with long generations."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import Client, ServerProc, connect, pid_exists, silence, start_server

# SmolLM2 repeats a word for as long as it is allowed to at temperature 0: a long generation on demand (asked
# to count to 600, it stops at 20 on some CPUs).
LONG_PROMPT = "Repeat the word hello 500 times."
# With the voice system prompt it stops early, so the request brings the model's own default one.
LONG_CONTEXT = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}]
LONG_ENV = {"LOCAL_LLM_MAX_TOKENS": "1500", "LOCAL_LLM_CONTEXT": "4096", "LOCAL_LLM_TEMPERATURE": "0",
            "LOCAL_LLM_REPEAT_PENALTY": "1.0"}


@pytest.fixture(scope="module")
def long_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("long"), models_dir, env=LONG_ENV)
    yield srv
    assert srv.stop() == 0, srv.logs()[-2000:]


async def _start_long(client: Client, request_id: str) -> None:
    """Start a long streamed generation and wait until its tokens flow."""
    await client.send({"type": "llm_request", "text": LONG_PROMPT, "request_id": request_id, "stream": True,
                       "call_id": f"long-{request_id}", "context": LONG_CONTEXT})
    await client.wait_for(lambda m: m.get("type") == "llm_token" and m.get("request_id") == request_id)


async def test_other_callers_are_served_while_the_llm_generates(long_server: ServerProc, speak: Any) -> None:
    a = await connect(long_server)
    b = await connect(long_server)
    try:
        await _start_long(a, "long-1")
        status = await b.request({"type": "status", "request_id": "s"}, "status_response")
        assert status["pool"]["busy"] == 1
        tts = await b.request({"type": "tts_request", "text": "One moment please."}, "tts_response")
        await b.request({"type": "set_mode", "mode": "stt", "call_id": "b"}, "mode_ready")
        await b.stream(np.concatenate([speak("Please check my order status."), silence(1.0)]), frame_ms=20)
        final = await b.wait_for(lambda m: m.get("type") == "stt_result" and m.get("is_final"), timeout=60)
        assert "order" in final["text"].lower()
        # The long answer is still being generated: everything above was served while it ran.
        assert not a.got.json("llm_response"), "the long generation ended before the other caller was served"
        tokens_before = len(a.got.json("llm_token"))
        await a.wait_for(lambda m: len(a.got.json("llm_token")) > tokens_before + 5)
        assert tts["byte_length"] > 0
        ack = await a.request({"type": "barge_in", "request_id": "stop-long"}, "barge_in_ack")
        assert ack["status"] == "ok"
    finally:
        await a.close()
        await b.close()


async def test_killed_worker_becomes_engine_error_and_is_replaced(long_server: ServerProc) -> None:
    a = await connect(long_server)
    try:
        await _start_long(a, "kill-1")
        status = await a.request({"type": "status"}, "status_response")
        pids = status["pool"]["pids"]
        assert len(pids) == 1
        restarts = long_server.metric("las_llm_worker_restarts_total")
        os.kill(pids[0], signal.SIGKILL)
        err = await a.wait_for(lambda m: m.get("type") == "error" and m.get("request_id") == "kill-1", timeout=30)
        assert err["code"] == "engine_error" and "/" not in err["message"]
        assert not [m for m in a.got.json("llm_response") if m.get("request_id") == "kill-1"]
        # The next request is answered by a fresh worker.
        reply = await a.request({"type": "llm_request", "text": "Say hello.", "request_id": "after"},
                                "llm_response", timeout=120)
        assert reply["text"] and reply["request_id"] == "after"
        status = await a.request({"type": "status"}, "status_response")
        assert status["pool"]["pids"] and status["pool"]["pids"][0] != pids[0]
        assert long_server.metric("las_llm_worker_restarts_total") == restarts + 1
        # The killed worker is reaped, not left as a zombie.
        for _ in range(100):
            if not pid_exists(pids[0]):
                break
            await asyncio.sleep(0.05)
        assert not pid_exists(pids[0])
    finally:
        await a.close()


async def test_hung_worker_is_killed_at_the_timeout(models_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, models_dir, env={**LONG_ENV, "LOCAL_LLM_INFER_TIMEOUT_SEC": "3"})
    try:
        a = await connect(srv)
        b = await connect(srv)
        await _start_long(a, "hang-1")
        (pid,) = (await a.request({"type": "status"}, "status_response"))["pool"]["pids"]
        os.kill(pid, signal.SIGSTOP)  # hung: it cannot even read the cancel
        # Other callers are still served while the request waits for its limit.
        st = await b.request({"type": "status", "request_id": "during"}, "status_response")
        assert st["pool"]["busy"] == 1
        err = await a.wait_for(lambda m: m.get("type") == "error" and m.get("request_id") == "hang-1", timeout=60)
        assert err["code"] == "timeout" and "/" not in err["message"]
        for _ in range(200):
            if not pid_exists(pid):
                break
            await asyncio.sleep(0.05)
        assert not pid_exists(pid)  # killed and reaped, not left stopped
        reply = await b.request({"type": "llm_request", "text": "Say hello.", "request_id": "after"},
                                "llm_response", timeout=120)
        assert reply["text"] and reply["request_id"] == "after"
        assert srv.metric("las_llm_worker_restarts_total") == 1
        await a.close()
        await b.close()
    finally:
        assert srv.stop() == 0


async def test_closing_the_connection_stops_the_generation(long_server: ServerProc) -> None:
    cancelled = long_server.metric("las_llm_generations_total", 'outcome="cancelled"')
    completed = long_server.metric("las_llm_generations_total", 'outcome="completed"')
    a = await connect(long_server)
    await _start_long(a, "close-1")
    assert long_server.metric("las_llm_pool_busy") == 1
    await a.close()
    for _ in range(600):
        if long_server.metric("las_llm_pool_busy") == 0:
            break
        await asyncio.sleep(0.1)
    assert long_server.metric("las_llm_pool_busy") == 0
    # The worker reported the generation as cancelled: it stopped, it did not run to its end.
    assert long_server.metric("las_llm_generations_total", 'outcome="cancelled"') == cancelled + 1
    assert long_server.metric("las_llm_generations_total", 'outcome="completed"') == completed


async def test_queue_overflow_answers_busy(models_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, models_dir, env={**LONG_ENV, "LOCAL_LLM_MAX_QUEUE": "1"})
    try:
        c = await connect(srv)
        await _start_long(c, "q-1")
        await c.send({"type": "llm_request", "text": "Hi", "request_id": "q-2"})
        await c.send({"type": "llm_request", "text": "Hi", "request_id": "q-3"})
        err = await c.wait_for(lambda m: m.get("type") == "error" and m.get("request_id") == "q-3")
        assert err["code"] == "busy"
        status = await c.request({"type": "status"}, "status_response")
        assert status["pool"]["queued"] == 1 and status["pool"]["busy"] == 1
        await c.send({"type": "barge_in", "request_id": "stop"})
        await c.wait_type("barge_in_ack")
        await c.close()
    finally:
        assert srv.stop() == 0
