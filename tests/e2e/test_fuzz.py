"""Property-based fuzzing of the running server: hostile messages never take it down or break others."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from local_ai_server.errors import ERROR_CODES

from .conftest import ServerProc, start_server

SERVER_TYPES = {
    "auth_response", "mode_ready", "stt_result", "llm_token", "llm_response", "tts_audio", "tts_response",
    "barge_in_ack", "switch_response", "reload_response", "status_response", "capabilities_response", "error",
}
CLIENT_TYPES = ["auth", "set_mode", "audio", "llm_request", "tts_request", "switch_model", "status",
                "capabilities", "barge_in", "tool_context", "SET-MODE", " Status ", "llm-request"]
KEYS = ["type", "text", "mode", "call_id", "request_id", "data", "rate", "format", "stream", "context",
        "output_encoding", "output_sample_rate_hz", "encoding", "sample_rate_hz", "segment_energy_threshold",
        "segment_silence_ms", "scope", "llm_config", "stt_config", "tts_config", "llm_model_path", "dry_run",
        "reason", "auth_token", "token", "system_prompt", "model_path"]
EXAMPLES = 200
MESSAGES_PER_EXAMPLE = 50  # 200 x 50 = 10,000 messages per run

scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
           | st.text(max_size=40) | st.sampled_from(["full", "stt", "llm", "tts", "mulaw", "linear16", "16000",
                                                     "session", "stop_session", "../../etc/passwd", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)
audio_b64 = st.binary(max_size=2000).map(lambda b: base64.b64encode(b).decode())
typed = st.builds(
    lambda t, fields: {"type": t, **fields},
    st.sampled_from(CLIENT_TYPES),
    st.dictionaries(st.sampled_from(KEYS[1:]), json_values | audio_b64, max_size=5),
)
messages = st.one_of(
    typed.map(json.dumps),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values, max_size=6).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=4000),
)


def _is_heavy_admin(frame: str | bytes) -> bool:
    """Reloads spawn model workers: legal, but too slow to repeat hundreds of times here."""
    if isinstance(frame, bytes):
        return False
    try:
        obj = json.loads(frame)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("type"), str) and "reload" in obj["type"].lower()


def _check_reply(frame: str | bytes, previous: Any) -> None:
    """A reply conforms to the protocol: known type, valid error envelope, audio only after its header."""
    if isinstance(frame, bytes):
        assert isinstance(previous, dict) and previous.get("type") == "tts_audio", "binary without header"
        assert previous["byte_length"] == len(frame)
        return
    msg = json.loads(frame)
    assert isinstance(msg, dict) and msg.get("type") in SERVER_TYPES, msg
    if msg["type"] == "error":
        assert msg["code"] in ERROR_CODES, msg
        text = msg["message"]
        assert isinstance(text, str) and "Traceback" not in text and ".py" not in text and "/work" not in text


class WellBehaved(threading.Thread):
    """A normal caller on its own loop and connection, doing real turns while the fuzzer runs."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.turns = 0
        self.failures: list[str] = []

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with websockets.connect(self.url, max_size=None) as ws:
            i = 0
            while not self.stop.is_set():
                i += 1
                rid = f"good-{i}"
                kind = ("llm_request", "llm_response") if i % 2 else ("tts_request", "tts_response")
                await ws.send(json.dumps({"type": kind[0], "text": "Hello, how are you?", "request_id": rid}))
                try:
                    while True:
                        raw = await asyncio.wait_for(ws.recv(), 120)
                        if isinstance(raw, str):
                            msg = json.loads(raw)
                            if msg.get("request_id") == rid and msg["type"] in (kind[1], "error"):
                                break
                except (asyncio.TimeoutError, websockets.ConnectionClosed) as exc:
                    self.failures.append(f"{rid}: {exc!r}")
                    return
                if msg["type"] == "error":
                    self.failures.append(f"{rid}: {msg}")
                else:
                    self.turns += 1


@pytest.fixture(scope="module")
def fuzz_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("fuzz"), models_dir, env={"LOCAL_LLM_MAX_TOKENS": "16"})
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


def test_fuzzed_messages_never_break_the_server(fuzz_server: ServerProc) -> None:
    good = WellBehaved(fuzz_server.url)
    good.start()
    sent = {"n": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages, min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE))
    def one_connection(frames: list[str | bytes]) -> None:
        frames = [f for f in frames if not _is_heavy_admin(f)]
        sent["n"] += len(frames)
        asyncio.run(_session(fuzz_server.url, frames))

    try:
        one_connection()
    finally:
        good.stop.set()
        good.join(180)
    assert sent["n"] >= 9000
    assert fuzz_server.proc.poll() is None, "server died"
    assert fuzz_server.http("/health")[0] == 200
    assert not good.failures, good.failures
    assert good.turns >= 3
    # No message made a handler fail unexpectedly, and nothing was logged as an error.
    events = fuzz_server.log_events()
    assert not [e for e in events if e.get("event") == "message.failed" or e.get("level") == "error"]


async def _session(url: str, frames: list[str | bytes]) -> None:
    """Send the frames, then a status as a sentinel; every reply up to it must conform."""
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
        for frame in frames:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "status", "request_id": "sentinel"}))
        previous: Any = None
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), 60)
            except websockets.ConnectionClosed as exc:
                # Only a frame over the limit or failed auth may close a connection.
                assert exc.rcvd is not None and exc.rcvd.code in (1009, 1008), exc
                return
            _check_reply(raw, previous)
            previous = json.loads(raw) if isinstance(raw, str) else raw
            if isinstance(previous, dict) and previous.get("request_id") == "sentinel" and \
                    previous.get("type") == "status_response":
                return
