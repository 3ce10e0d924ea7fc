"""Property-based fuzzing of the running server: hostile messages never take it down or break others."""

from __future__ import annotations

import asyncio
import base64
import collections
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
from local_ai_server.protocol import normalize_type

from .conftest import ServerProc, start_server

SERVER_TYPES = {
    "auth_response", "mode_ready", "stt_result", "llm_token", "llm_response", "tts_audio", "tts_response",
    "barge_in_ack", "switch_response", "reload_response", "status_response", "capabilities_response", "error",
    "llm_tool_response", "backends_response", "backend_schema_response",
}
CLIENT_TYPES = ["auth", "set_mode", "audio", "llm_request", "tts_request", "switch_model", "status",
                "capabilities", "barge_in", "tool_context", "SET-MODE", " Status ", "llm-request", "llm_tool_request",
                "tool_result", "backends", "backend_schema", "Tool-Result"]
# The one answer each request type gets (besides, or instead of, one `error`); None: no reply owed.
ANSWERS: dict[str, str | None] = {
    "auth": "auth_response", "set_mode": "mode_ready", "llm_request": "llm_response",
    "tts_request": "tts_response", "switch_model": "switch_response", "status": "status_response",
    "capabilities": "capabilities_response", "barge_in": "barge_in_ack", "audio": None, "tool_context": None,
    "llm_tool_request": "llm_tool_response", "tool_result": "llm_response", "backends": "backends_response",
    "backend_schema": "backend_schema_response",
}
# Every field of every client message type.
KEYS = ["type", "text", "mode", "call_id", "request_id", "data", "audio", "rate", "sample_rate", "format",
        "stream", "context", "output_encoding", "output_sample_rate_hz", "encoding", "sample_rate_hz",
        "segment_energy_threshold", "segment_silence_ms", "scope", "llm_config", "stt_config", "tts_config",
        "llm_model_path", "stt_model_path", "tts_model_path", "dry_run", "reason", "auth_token", "token",
        "system_prompt", "model_path", "protocol_version", "rollback_assistant", "tools", "messages",
        "prior_messages", "role", "content", "allowed_tools", "tool_policy", "tool_choice", "latest_user_text",
        "tool_name", "result", "is_error", "function_call_id", "backend_type", "backend_name", "parameters",
        "description", "name", "tool_calls"]
EXAMPLES = 200
MESSAGES_PER_EXAMPLE = 50  # 200 x 50 = 10,000 messages per run

# Strings the OS, the encoder or an engine may choke on: lone surrogates (valid JSON escapes, unencodable
# in UTF-8), NUL and other control characters, over-long names and paths, other users' homes.
hostile_text = st.one_of(
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=10),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=8), st.sampled_from(["\x00", "\ud800", "\udfff",
                                                                               "\x7f", "\n", "\u200b"]),
              st.text(max_size=8)),
    st.sampled_from(["x" * 300 + ".gguf", "models/" + "a/" * 2100 + "m.gguf", "~nobody-here/m.gguf", "~root",
                     "/dev/zero", "/proc/self/mem", "models", ".", "..", "\u00e9\u0301.gguf", "*" * 50,
                     "\U0001F600" * 20]),
)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=40) | hostile_text
           | st.sampled_from(["full", "stt", "llm", "tts", "mulaw", "linear16", "16000", "session", "global",
                              "stop_session", "../../etc/passwd", "", "system", "user", "assistant"]))
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
    obj = _typed_object(frame)
    return obj is not None and "reload" in obj["type"].lower()


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
    sent = {"n": 0, "answered": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages, min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE))
    def one_connection(frames: list[str | bytes]) -> None:
        frames = [f for f in frames if not _is_heavy_admin(f)]
        sent["n"] += len(frames)
        sent["answered"] += asyncio.run(_session(fuzz_server.url, frames))

    try:
        one_connection()
    finally:
        good.stop.set()
        good.join(180)
    assert sent["n"] >= 9000
    assert sent["answered"] >= 1500, sent  # requests whose one answer was checked
    assert fuzz_server.proc.poll() is None, "server died"
    assert fuzz_server.http("/health")[0] == 200
    assert not good.failures, good.failures
    assert good.turns >= 3
    # No message made a handler fail unexpectedly, and nothing was logged as an error.
    events = fuzz_server.log_events()
    assert not [e for e in events if e.get("event") in ("message.failed", "task.failed")
                or e.get("level") == "error"]
    assert "never retrieved" not in fuzz_server.logs() and "Traceback" not in fuzz_server.logs()


def _tracked(frames: list[str | bytes]) -> tuple[list[str | bytes], dict[str, str | None]]:
    """The frames with a unique request_id on every typed message that has none: {id: the answer owed}."""
    out: list[str | bytes] = []
    owed: dict[str, str | None] = {}
    for i, frame in enumerate(frames):
        obj = _typed_object(frame)
        if obj is not None and "request_id" not in obj:
            mtype = normalize_type(obj["type"])
            if mtype in ANSWERS:
                rid = f"fz-{i}"
                obj["request_id"] = rid
                owed[rid] = ANSWERS[mtype]
                frame = json.dumps(obj)
        out.append(frame)
    return out, owed


def _typed_object(frame: str | bytes) -> dict[str, Any] | None:
    if isinstance(frame, bytes):
        return None
    try:
        obj = json.loads(frame)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("type"), str) else None


async def _session(url: str, frames: list[str | bytes]) -> int:
    """Send the frames, cancel what is still running, then a status as a sentinel.

    Every reply must conform, and every request with an id must get exactly one answer: its own reply
    type or an `error` (at most one of each: a failed tts_request gets both, as AVA clients need).
    """
    frames, owed = _tracked(frames)
    answers: dict[str, list[str]] = collections.defaultdict(list)
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
        for frame in frames:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "barge_in", "request_id": "fz-cancel"}))
        await ws.send(json.dumps({"type": "status", "request_id": "sentinel"}))
        previous: Any = None
        sentinel = False
        deadline = asyncio.get_running_loop().time() + 90
        while not (sentinel and all(answers.get(r) for r, t in owed.items() if t is not None)):
            remaining = deadline - asyncio.get_running_loop().time()
            missing = [r for r, t in owed.items() if t is not None and not answers.get(r)]
            assert remaining > 0, f"no answer to {missing}: {[f for f in frames if _rid_in(f, missing)][:5]}"
            try:
                raw = await asyncio.wait_for(ws.recv(), remaining)
            except websockets.ConnectionClosed as exc:
                # Only a frame over the limit or failed auth may close a connection.
                assert exc.rcvd is not None and exc.rcvd.code in (1009, 1008), exc
                return 0
            _check_reply(raw, previous)
            previous = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(previous, dict):
                continue
            rid = previous.get("request_id")
            if rid == "sentinel" and previous.get("type") == "status_response":
                sentinel = True
            if isinstance(rid, str) and rid in owed and previous["type"] in ("error", owed[rid]):
                answers[rid].append(previous["type"])
    for rid, kinds in answers.items():
        assert kinds.count("error") <= 1 and kinds.count(owed[rid] or "-") <= 1, (rid, kinds)
    return sum(1 for r, t in owed.items() if t is not None)


def _rid_in(frame: str | bytes, rids: list[str]) -> bool:
    obj = _typed_object(frame)
    return obj is not None and obj.get("request_id") in rids
