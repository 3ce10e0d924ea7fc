"""Replay every AVA wire fixture (tests/fixtures/ava/*.json, format in its README.md) against one real server.

Each fixture gets a fresh connection: its `send` messages go out in order (`"$SPEECH_B64"` replaced by the
fixture's sentence spoken by Piper, as base64 PCM16LE 16 kHz), then frames are collected until every required
`expect` entry has matched a different received message, or `timeout_s` runs out. `forbid` types must never show
up; when a fixture forbids anything (or has optional or no expectations) the client listens a grace period longer.

The matcher is a handful of pure functions, unit-tested at the bottom without a server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from tests.paths import FIXTURES

from .conftest import Client, ServerProc, pcm16, silence, start_server

FIXTURES_DIR = FIXTURES / "ava"
FIXTURE_FILES = sorted(FIXTURES_DIR.glob("*.json"))
SPEECH_PLACEHOLDER = "$SPEECH_B64"
DEFAULT_TIMEOUT_S = 20.0  # a fixture without timeout_s (the replay harness in the README uses the same)
GRACE_S = 1.5  # listening on after the last expected message, to catch late forbidden frames
SEND_GAP_S = 0.05  # between two `send` messages (AVA's clients never fire them back to back either)
DEFAULT_LEAD_S, DEFAULT_TAIL_S = 0.3, 1.5
SPEECH_RATE = 16000

Frame = tuple[str, Any]  # ("json", dict) or ("binary", bytes), in arrival order (conftest.Received.items)


class _Missing:
    """What a dotted path yields when the message has no such key (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()

MARKERS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "nonempty-string": lambda v: isinstance(v, str) and v.strip() != "",
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
    "any": lambda v: True,
}


# ---------------------------------------------------------------------------------------------- the matcher


def lookup(msg: Any, path: str) -> Any:
    """The value at a dotted path (`tool_calls.0.name`: keys of objects, indexes of lists), or MISSING."""
    cur = msg
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit():
            index = int(part)
            if index >= len(cur):
                return MISSING
            cur = cur[index]
        else:
            return MISSING
    return cur


def marker_kinds(spec: Any) -> list[str] | None:
    """`"<int>"` -> ["int"] (`"<a|b>"` -> ["a", "b"]); None when `spec` is an exact value, not a marker."""
    if isinstance(spec, str) and len(spec) > 2 and spec[0] == "<" and spec[-1] == ">":
        return spec[1:-1].split("|")
    return None


def json_equal(value: Any, spec: Any) -> bool:
    """Exact JSON equality: true/1 and 8000/8000.0 differ; objects compare key by key, lists item by item."""
    if isinstance(spec, dict):
        return (isinstance(value, dict) and value.keys() == spec.keys()
                and all(json_equal(value[k], spec[k]) for k in spec))
    if isinstance(spec, list):
        return (isinstance(value, list) and len(value) == len(spec)
                and all(json_equal(v, s) for v, s in zip(value, spec)))
    return type(value) is type(spec) and value == spec


def check_value(value: Any, spec: Any) -> bool:
    """Does a message's value (or MISSING) satisfy a fixture's field spec (exact value or marker)?"""
    kinds = marker_kinds(spec)
    if kinds is None:
        return value is not MISSING and json_equal(value, spec)
    for kind in kinds:
        if kind == "absent":
            if value is MISSING:
                return True
        elif kind not in MARKERS:
            raise ValueError(f"unknown marker <{kind}> in {spec!r}")
        elif value is not MISSING and MARKERS[kind](value):
            return True
    return False


def field_mismatches(msg: dict[str, Any], fields: dict[str, Any]) -> list[str]:
    """One line per field of `fields` that `msg` does not satisfy (empty: all do)."""
    out = []
    for path, spec in fields.items():
        value = lookup(msg, path)
        if not check_value(value, spec):
            out.append(f"{path}: got {short(value)}, want {json.dumps(spec)}")
    return out


def frame_mismatches(frames: Sequence[Frame], index: int, expect: dict[str, Any]) -> list[str]:
    """Why frames[index] does not satisfy `expect` (type, fields, binary_follows); empty when it does."""
    kind, msg = frames[index]
    if kind != "json" or not isinstance(msg, dict):
        return ["not a JSON object"]
    if msg.get("type") != expect["type"]:
        return [f"type {msg.get('type')!r}"]
    out = field_mismatches(msg, expect.get("fields", {}))
    if expect.get("binary_follows"):
        if index + 1 >= len(frames):
            out.append("binary_follows: no frame after it (yet)")
        else:
            nkind, nxt = frames[index + 1]
            want = msg.get("byte_length")
            if nkind != "binary":
                out.append(f"binary_follows: next frame is JSON {short(nxt)}")
            elif not MARKERS["int"](want):
                out.append(f"binary_follows: byte_length is {short(lookup(msg, 'byte_length'))}, not an int")
            elif len(nxt) != want:
                out.append(f"binary_follows: next binary frame has {len(nxt)} bytes, byte_length says {want}")
    return out


def match_expectations(frames: Sequence[Frame], expects: Sequence[dict[str, Any]]) -> dict[int, int]:
    """expect index -> frame index, each frame used at most once, as many required expectations as possible.

    A maximum bipartite matching (augmenting paths), required entries first, then optional ones: an
    augmenting path never drops an entry that is already matched, so optional ones cannot cost a required one.
    """
    candidates = [[j for j in range(len(frames)) if not frame_mismatches(frames, j, e)] for e in expects]
    owner: dict[int, int] = {}  # frame index -> expect index

    def augment(i: int, seen: set[int]) -> bool:
        for j in candidates[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    order = ([i for i, e in enumerate(expects) if not e.get("optional")]
             + [i for i, e in enumerate(expects) if e.get("optional")])
    for i in order:
        augment(i, set())
    return {i: j for j, i in owner.items()}


def unmatched_required(expects: Sequence[dict[str, Any]], matched: dict[int, int]) -> list[int]:
    return [i for i, e in enumerate(expects) if not e.get("optional") and i not in matched]


def forbidden_frames(frames: Sequence[Frame], forbid: Sequence[str]) -> list[int]:
    """Indexes of received JSON messages whose type the fixture forbids."""
    return [j for j, (kind, msg) in enumerate(frames)
            if kind == "json" and isinstance(msg, dict) and msg.get("type") in forbid]


# ---------------------------------------------------------------------------------------------- reporting

SUMMARY_KEYS = ("call_id", "request_id", "mode", "status", "code", "error", "message", "is_final", "is_partial",
                "text", "token", "delta", "finish_reason", "tool_path", "tool_calls", "server_gated",
                "tool_result_final", "tool_gateway_done", "encoding", "sample_rate_hz", "byte_length",
                "output_encoding", "output_sample_rate_hz")
MAX_LISTED_FRAMES = 60


def short(value: Any, limit: int = 80) -> str:
    """A value as compact JSON, cut to `limit` characters."""
    if value is MISSING:
        return "<missing>"
    text = json.dumps(value, separators=(",", ":"), default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summarize_frame(frame: Frame) -> str:
    """One line for a received frame: its type and the fields that tell what the server did."""
    kind, msg = frame
    if kind == "binary":
        return f"<binary {len(msg)} bytes>"
    if not isinstance(msg, dict):
        return f"<json {short(msg)}>"
    keys = [k for k in SUMMARY_KEYS if k in msg]
    others = sorted(k for k in msg if k != "type" and k not in SUMMARY_KEYS)
    parts = [f"{k}={short(msg[k], 60)}" for k in keys]
    if others:
        parts.append("+" + ",".join(others))
    return f"{msg.get('type')!r} " + " ".join(parts)


def describe_frames(frames: Sequence[Frame]) -> str:
    lines = [f"  [{j}] {summarize_frame(f)}" for j, f in enumerate(frames[:MAX_LISTED_FRAMES])]
    if len(frames) > MAX_LISTED_FRAMES:
        lines.append(f"  ... and {len(frames) - MAX_LISTED_FRAMES} more frames")
    return "\n".join(lines) if lines else "  (nothing)"


def failure_report(name: str, frames: Sequence[Frame], expects: Sequence[dict[str, Any]], matched: dict[int, int],
                   forbid: Sequence[str], closed_code: int | None) -> str | None:
    """None when the fixture passed; else what was expected, what came closest, and everything received."""
    problems = []
    for i in unmatched_required(expects, matched):
        e = expects[i]
        spec = {k: e[k] for k in ("fields", "binary_follows") if k in e}
        problems.append(f"unmatched expect[{i}] type {e['type']!r} {short(spec, 400)}")
        used = set(matched.values())
        for j, (kind, msg) in enumerate(frames):
            if kind == "json" and isinstance(msg, dict) and msg.get("type") == e["type"]:
                why = frame_mismatches(frames, j, e) or ["matches, but was taken by another expectation"
                                                         if j in used else "matches"]
                problems.append(f"    near miss [{j}]: " + "; ".join(why))
    for j in forbidden_frames(frames, forbid):
        problems.append(f"forbidden type received: [{j}] {summarize_frame(frames[j])}")
    if not problems:
        return None
    closed = "" if closed_code is None else f" (the server closed the connection, code {closed_code})"
    return (f"fixture {name}:\n" + "\n".join(problems)
            + f"\nreceived {len(frames)} frames{closed}:\n{describe_frames(frames)}")


# ---------------------------------------------------------------------------------------------- sending


def substitute(msg: Any, speech_b64: str | None) -> Any:
    """A copy of `msg` with every "$SPEECH_B64" string value replaced by the speech."""
    if isinstance(msg, dict):
        return {k: substitute(v, speech_b64) for k, v in msg.items()}
    if isinstance(msg, list):
        return [substitute(v, speech_b64) for v in msg]
    if msg == SPEECH_PLACEHOLDER:
        if speech_b64 is None:
            raise ValueError(f"{SPEECH_PLACEHOLDER} in a fixture without `speech`")
        return speech_b64
    return msg


def contains_speech(msg: Any) -> bool:
    if isinstance(msg, dict):
        return any(contains_speech(v) for v in msg.values())
    if isinstance(msg, list):
        return any(contains_speech(v) for v in msg)
    return bool(msg == SPEECH_PLACEHOLDER)


def chunk_bytes(data: bytes, chunk_ms: int, rate: int = SPEECH_RATE) -> list[bytes]:
    """PCM16 mono bytes cut into chunks of `chunk_ms` (the last one may be shorter)."""
    step = int(rate * chunk_ms / 1000) * 2
    return [data[i:i + step] for i in range(0, len(data), step)]


def speech_pcm(speech: dict[str, Any], speak: Callable[[str], np.ndarray]) -> bytes:
    audio = np.concatenate([silence(float(speech.get("lead_silence_s", DEFAULT_LEAD_S))), speak(speech["text"]),
                            silence(float(speech.get("tail_silence_s", DEFAULT_TAIL_S)))])
    return pcm16(audio)


def outgoing(fx: dict[str, Any], speak: Callable[[str], np.ndarray]) -> Iterator[tuple[str, float]]:
    """(JSON text, pause before the next one) for every frame the fixture sends.

    A message carrying the speech goes out once with all of it, or, with `speech.chunk_ms`, once per chunk of
    that many milliseconds at real-time pace (how a live call streams).
    """
    speech = fx.get("speech")
    pcm = speech_pcm(speech, speak) if speech else None
    for msg in fx["send"]:
        if pcm is not None and speech is not None and contains_speech(msg) and speech.get("chunk_ms"):
            chunk_ms = int(speech["chunk_ms"])
            for chunk in chunk_bytes(pcm, chunk_ms):
                yield json.dumps(substitute(msg, base64.b64encode(chunk).decode())), chunk_ms / 1000
        else:
            b64 = base64.b64encode(pcm).decode() if pcm is not None else None
            yield json.dumps(substitute(msg, b64)), SEND_GAP_S


# ---------------------------------------------------------------------------------------------- replay


@pytest.fixture(scope="module")
def ava_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One real server with the embedded models for every fixture; no auth token (as AVA's default set-up).

    Temperature 0 keeps the small model's answers the same run to run.
    """
    srv = start_server(tmp_path_factory.mktemp("ava"), models_dir, env={"LOCAL_LLM_TEMPERATURE": "0"})
    yield srv
    code = srv.stop()
    assert code == 0, f"server exit code {code}\n{srv.logs()[-2000:]}"


def load_fixture(path: Path) -> dict[str, Any]:
    fx = json.loads(path.read_text())
    assert isinstance(fx, dict), f"{path.name}: not a JSON object"
    return fx


async def replay(server: ServerProc, fx: dict[str, Any], speak: Callable[[str], np.ndarray]) -> tuple[
        list[Frame], dict[int, int], int | None]:
    """Send the fixture on a fresh connection and collect frames: (frames, matching, close code or None)."""
    expects: list[dict[str, Any]] = fx.get("expect", [])
    forbid: list[str] = fx.get("forbid", [])
    timeout = float(fx.get("timeout_s", DEFAULT_TIMEOUT_S))
    loop = asyncio.get_running_loop()
    frames_out = list(outgoing(fx, speak))  # speech synthesised before the connection opens
    ws = await websockets.connect(server.url, max_size=None, ping_interval=None)
    client = Client(ws)
    try:
        for text, pause in frames_out:
            if client.closed_code is not None:
                break
            started = loop.time()
            await client.send(text)
            await asyncio.sleep(max(0.0, pause - (loop.time() - started)))
        deadline = loop.time() + timeout
        matched: dict[int, int] = {}
        while True:
            matched = match_expectations(client.got.items, expects)
            done = not unmatched_required(expects, matched)
            if done or client.closed_code is not None or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        everything = done and all(i in matched for i in range(len(expects)))
        if done and client.closed_code is None and (forbid or not expects or not everything):
            await asyncio.sleep(GRACE_S)
            matched = match_expectations(client.got.items, expects)
        return list(client.got.items), matched, client.closed_code
    finally:
        await client.close()


@pytest.mark.e2e
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
async def test_ava_fixture(path: Path, ava_server: ServerProc, speak: Callable[[str], np.ndarray]) -> None:
    fx = load_fixture(path)
    frames, matched, closed_code = await replay(ava_server, fx, speak)
    report = failure_report(path.stem, frames, fx.get("expect", []), matched, fx.get("forbid", []), closed_code)
    if report is not None:
        pytest.fail(report, pytrace=False)


# ---------------------------------------------------------------------------------------------- no server

KNOWN_FIXTURE_KEYS = {"description", "source", "ava_server", "speech", "send", "expect", "forbid", "timeout_s"}
KNOWN_EXPECT_KEYS = {"type", "fields", "optional", "binary_follows"}
KNOWN_SPEECH_KEYS = {"text", "lead_silence_s", "tail_silence_s", "chunk_ms"}


def test_there_are_fixtures() -> None:
    assert len(FIXTURE_FILES) >= 30, f"only {len(FIXTURE_FILES)} fixtures in {FIXTURES_DIR}"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_fixture_is_well_formed(path: Path) -> None:
    """Every fixture uses only the README's fields and markers, so a typo fails here, not as a server bug."""
    fx = load_fixture(path)
    assert set(fx) <= KNOWN_FIXTURE_KEYS, f"unknown keys {set(fx) - KNOWN_FIXTURE_KEYS}"
    assert isinstance(fx.get("description"), str) and fx["description"]
    assert isinstance(fx["send"], list) and fx["send"], "nothing to send"
    assert all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in fx["send"])
    assert any(contains_speech(m) for m in fx["send"]) == ("speech" in fx), "$SPEECH_B64 and speech go together"
    if "speech" in fx:
        assert set(fx["speech"]) <= KNOWN_SPEECH_KEYS and isinstance(fx["speech"]["text"], str)
    assert isinstance(fx.get("timeout_s", 1), (int, float))
    forbid = fx.get("forbid", [])
    assert isinstance(forbid, list) and all(isinstance(t, str) for t in forbid)
    for e in fx["expect"]:
        assert set(e) <= KNOWN_EXPECT_KEYS and isinstance(e["type"], str), f"bad expect entry {e}"
        assert e["type"] not in forbid
        for spec in e.get("fields", {}).values():
            for kind in marker_kinds(spec) or []:
                assert kind in MARKERS or kind == "absent", f"unknown marker {spec!r}"


def jf(msg: dict[str, Any]) -> Frame:
    """A received JSON frame."""
    return ("json", msg)


def bf(n: int) -> Frame:
    """A received binary frame of n bytes."""
    return ("binary", b"\x00" * n)


def test_markers() -> None:
    assert check_value("", "<string>") and not check_value(1, "<string>")
    assert check_value("x", "<nonempty-string>") and not check_value("  ", "<nonempty-string>")
    assert check_value(3, "<int>") and not check_value(3.0, "<int>") and not check_value(True, "<int>")
    assert check_value(3.5, "<number>") and check_value(3, "<number>") and not check_value(False, "<number>")
    assert check_value(False, "<bool>") and not check_value(0, "<bool>")
    assert check_value([], "<list>") and not check_value({}, "<list>")
    assert check_value({}, "<object>") and not check_value([], "<object>")
    assert check_value(None, "<null>") and not check_value(MISSING, "<null>") and not check_value(0, "<null>")
    assert check_value(None, "<any>") and not check_value(MISSING, "<any>")
    assert check_value(MISSING, "<absent>") and not check_value(None, "<absent>")
    assert check_value(MISSING, "<absent|string>") and check_value("a", "<absent|string>")
    with pytest.raises(ValueError):
        check_value(1, "<integer>")


def test_exact_values_are_strict_json() -> None:
    assert check_value(8000, 8000) and not check_value(8000.0, 8000) and not check_value(1, True)
    assert check_value(None, None) and not check_value(MISSING, None)
    assert check_value([{"a": [1, True]}], [{"a": [1, True]}])
    assert not check_value([{"a": [1, 1]}], [{"a": [1, True]}])
    assert not check_value({"a": 1, "b": 2}, {"a": 1}), "objects match whole, not as a subset"
    assert not check_value(["system_prompt", "x"], ["system_prompt"])
    assert check_value("<", "<") and check_value("<>", "<>"), "too short to be a marker"


def test_dotted_paths() -> None:
    msg = {"tool_calls": [{"name": "hangup_call", "parameters": {"farewell_message": "Bye"}}],
           "models": {"llm": {"tool_capability": {"level": "none"}}}, "n": None}
    assert lookup(msg, "tool_calls.0.name") == "hangup_call"
    assert lookup(msg, "tool_calls.0.parameters.farewell_message") == "Bye"
    assert lookup(msg, "models.llm.tool_capability.level") == "none"
    assert lookup(msg, "tool_calls.1.name") is MISSING
    assert lookup(msg, "tool_calls.x") is MISSING
    assert lookup(msg, "n") is None and lookup(msg, "n.x") is MISSING and lookup(msg, "absent") is MISSING
    assert field_mismatches(msg, {"tool_calls.0.name": "hangup_call", "tool_calls.1": "<absent>"}) == []
    assert field_mismatches(msg, {"models.llm.tool_capability.level": "full"}) == [
        'models.llm.tool_capability.level: got "none", want "full"']


def test_each_expectation_takes_a_different_message() -> None:
    one = [jf({"type": "stt_result", "text": "hi", "is_final": True})]
    two = one + [jf({"type": "stt_result", "text": "", "is_final": True})]
    exp = [{"type": "stt_result", "fields": {"is_final": True}},
           {"type": "stt_result", "fields": {"text": "<nonempty-string>"}}]
    assert unmatched_required(exp, match_expectations(one, exp)) == [1]
    # Greedy would give frame 0 to the first entry and starve the second; the matching re-routes.
    assert match_expectations(two, exp) == {0: 1, 1: 0}


def test_optional_entries_never_cost_a_required_one() -> None:
    frames = [jf({"type": "llm_response", "text": "x"})]
    exp: list[dict[str, Any]] = [{"type": "llm_response", "optional": True},
                                 {"type": "llm_response", "fields": {"text": "<string>"}}]
    matched = match_expectations(frames, exp)
    assert matched == {1: 0} and unmatched_required(exp, matched) == []
    assert unmatched_required(exp, match_expectations([], exp)) == [1]


def test_binary_follows() -> None:
    exp = [{"type": "tts_audio", "binary_follows": True, "fields": {"byte_length": "<int>"}}]
    header = jf({"type": "tts_audio", "byte_length": 4})
    assert match_expectations([header, bf(4)], exp) == {0: 0}
    assert match_expectations([header], exp) == {}, "binary not arrived yet"
    assert match_expectations([header, bf(3)], exp) == {}
    assert match_expectations([header, jf({"type": "x"}), bf(4)], exp) == {}, "must be the very next frame"
    assert match_expectations([jf({"type": "tts_audio"}), bf(4)], exp) == {}
    assert frame_mismatches([header, bf(3)], 0, exp[0]) == [
        "binary_follows: next binary frame has 3 bytes, byte_length says 4"]


def test_forbid_and_report() -> None:
    frames = [jf({"type": "mode_ready", "mode": "stt"}), jf({"type": "error", "code": "unknown_type"}), bf(2)]
    assert forbidden_frames(frames, ["error"]) == [1] and forbidden_frames(frames, []) == []
    exp = [{"type": "mode_ready", "fields": {"mode": "llm"}}]
    report = failure_report("fx_name", frames, exp, match_expectations(frames, exp), ["error"], None)
    assert report is not None
    assert "fixture fx_name" in report and "unmatched expect[0] type 'mode_ready'" in report
    assert 'mode: got "stt", want "llm"' in report and "forbidden type received: [1]" in report
    assert "'error' code=\"unknown_type\"" in report and "<binary 2 bytes>" in report
    ok = [{"type": "mode_ready", "fields": {"mode": "stt"}}]
    assert failure_report("fx", frames, ok, match_expectations(frames, ok), [], None) is None


def test_speech_substitution_and_chunks() -> None:
    msg = {"type": "audio", "data": SPEECH_PLACEHOLDER, "nested": [{"x": SPEECH_PLACEHOLDER}], "rate": 16000}
    assert contains_speech(msg) and not contains_speech({"type": "status"})
    assert substitute(msg, "QUJD") == {"type": "audio", "data": "QUJD", "nested": [{"x": "QUJD"}], "rate": 16000}
    assert msg["data"] == SPEECH_PLACEHOLDER, "the fixture itself is left alone"
    with pytest.raises(ValueError):
        substitute(msg, None)
    chunks = chunk_bytes(bytes(range(200)) * 50, 2)  # 2 ms at 16 kHz = 32 samples = 64 bytes
    assert [len(c) for c in chunks] == [64] * 156 + [16] and b"".join(chunks) == bytes(range(200)) * 50
