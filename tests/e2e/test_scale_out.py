"""Many instances behind a real load balancer: HAProxy (Debian's package) with the repository's own
deploy/haproxy/haproxy.cfg in front of two servers that share one real LLM engine (llama-cpp-python's server
on SmolLM2, LOCAL_LLM_BACKEND=openai).

AVA-protocol callers do full-mode voice turns and llm_request turns through HAProxy; the calls spread over
both instances (their logs say so). Then one instance gets SIGTERM while the calls go on: HAProxy takes it
out of rotation by its /ready (503 "draining"), its calls finish their turn and get 1001, the callers call
again through HAProxy and land on the other instance, and no turn fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import io
import json
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from local_ai_server.setup.selection import read_selection

from .conftest import ROOT, Client, ServerProc, free_port, silence, start_server
from .llm_engine import Engine, remote_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "local_ai_server"  # the backend's name in haproxy.cfg
CALLERS = 4
PAUSE_S = 0.3  # a caller listens to the answer before it speaks again
BOUND_S = 240.0  # hang guards, never timing assertions
QUESTIONS = ["What is the capital of France?", "Name a color.", "Say hello.", "What is two plus two?"]
SPOKEN = "What is the capital of France?"


class HAProxy:
    """haproxy in the foreground on the repository's config; its ports come from the environment."""

    def __init__(self, binary: str, servers: list[ServerProc], log_dir: Path, check_inter: str = "200ms") -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LAS_LB_BIND": f"127.0.0.1:{self.port}",
                    "LAS_LB_STATS": f"127.0.0.1:{self.stats_port}", "LAS_CHECK_INTER": check_inter,
                    **{f"LAS_SERVER{i + 1}": f"127.0.0.1:{s.port}" for i, s in enumerate(servers)}}
        self.names = {s.port: f"las{i + 1}" for i, s in enumerate(servers)}
        self.log_path = log_dir / f"haproxy-{self.port}.log"
        check = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], env=self.env, capture_output=True, text=True)
        assert check.returncode == 0, f"deploy/haproxy/haproxy.cfg is not valid:\n{check.stdout}{check.stderr}"
        with open(self.log_path, "wb") as fh:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers as the stats page's CSV has them (status, check_status, check_code, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5) as resp:
            text = resp.read().decode().lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, name: str, status: str) -> None:
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(OSError):
                if self.servers()[name]["status"] == status:
                    return
            time.sleep(0.1)
        raise AssertionError(f"HAProxy never marked {name} {status}:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Caller:
    """What one caller did: its connections (call ids), requests sent and answered, what went wrong."""

    n: int
    calls: list[str] = field(default_factory=list)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)  # call_id -> llm_responses got
    sent: int = 0
    answered: int = 0
    # Requests cut by a close (1001) that came after they were sent and before their answer (the close and the
    # request crossed on the wire): the server drops what comes after its close frame, so they are sent again.
    resent: int = 0
    closes: list[int | None] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # HTTP statuses of refused connections
    errors: list[dict[str, Any]] = field(default_factory=list)


async def answer_or_close(c: Client, pred: Callable[[dict[str, Any]], bool], start: int) -> dict[str, Any] | None:
    """The first message since `start` that `pred` accepts, or None when the connection closed first."""
    deadline = time.monotonic() + BOUND_S
    seen = start
    while time.monotonic() < deadline:
        items = c.got.items
        for kind, value in items[seen:]:
            if kind == "json" and pred(value):
                return dict(value)
        seen = len(items)
        if c._reader.done():
            return None
        await asyncio.sleep(0.01)
    raise AssertionError(f"no answer in {BOUND_S} s; got {[m.get('type') for m in c.got.json()][-20:]}")


def answer_to(rid: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "llm_response" and m.get("request_id") == rid


async def run_caller(me: Caller, lb: HAProxy, speech: np.ndarray, stop: asyncio.Event) -> None:
    """Call through HAProxy, turn after turn; when a call is closed, call again and redo the turn it cut."""
    conn = 0
    turn = 0
    while not stop.is_set():
        conn += 1
        call_id = f"caller{me.n}-call{conn}"
        try:
            ws = await websockets.connect(lb.url, max_size=None, ping_interval=None, open_timeout=BOUND_S)
        except InvalidStatus as refused:
            me.refused.append(refused.response.status_code)
            await asyncio.sleep(PAUSE_S)
            continue
        c = Client(ws)
        me.calls.append(call_id)
        try:
            start = len(c.got.items)
            me.sent += 1
            await c.send({"type": "set_mode", "mode": "full", "call_id": call_id, "request_id": f"{call_id}-mode"})
            if await answer_or_close(c, lambda m: m.get("type") == "mode_ready", start) is None:
                me.resent += 1
                continue
            me.answered += 1
            voice = True  # each call starts with a spoken question, then asks in text
            while not stop.is_set() and not c._reader.done():  # closed in the pause: nothing was cut
                start = len(c.got.items)
                me.sent += 1
                if voice:
                    await c.stream(np.concatenate([silence(0.3), speech, silence(1.0)]))
                    reply = await answer_or_close(c, lambda m: m.get("type") == "llm_response", start)
                else:
                    rid = f"{call_id}-{turn}"
                    await c.send({"type": "llm_request", "text": QUESTIONS[turn % len(QUESTIONS)], "request_id": rid,
                                  "call_id": call_id})
                    reply = await answer_or_close(c, answer_to(rid), start)
                if reply is None:
                    me.resent += 1  # the close came before the answer: this turn is done again on the next call
                    break
                assert reply["text"].strip(), reply
                me.answered += 1
                turn += 1
                voice = False
                await asyncio.sleep(PAUSE_S)
        except websockets.ConnectionClosed:
            me.resent += 1
        finally:
            await c.close()
            me.errors += c.got.json("error")
            me.answers[call_id] = len(c.got.json("llm_response"))
            me.closes.append(c.closed_code)


def served(srv: ServerProc) -> collections.Counter[str]:
    """call_id -> answers the instance gave on it (its turn.done log lines)."""
    return collections.Counter(e["call_id"] for e in srv.log_events() if e.get("event") == "turn.done")


def wait_until(what: str, pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND_S
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("HAProxy is not installed: `apt-get install haproxy` (scripts/test.sh installs it when it runs "
                    "as root or with passwordless sudo)")
    return found


@pytest.fixture(scope="module")
def engine(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    sel = read_selection(models_dir)
    assert sel is not None
    eng = Engine(sel.path("llm"), tmp_path_factory.mktemp("engine"))
    eng.start()
    yield eng
    eng.stop()


async def test_calls_spread_over_two_instances_and_survive_one_draining(
        haproxy_bin: str, engine: Engine, models_dir: Path, tmp_path: Path, speak: Any) -> None:
    # The notice (1 s) is longer than HAProxy needs to see /ready say draining (one check, every 200 ms), so
    # no call is closed before new calls go elsewhere; short answers keep turns quick on two cores.
    env = remote_env(engine.url, LOCAL_LLM_MAX_TOKENS="24", LOCAL_DRAIN_NOTICE_S="1", LOCAL_DRAIN_TIMEOUT_S="60",
                     LOCAL_STT_PARTIAL_MS="0")
    a = start_server(tmp_path, models_dir, env=env, name="a")
    b = start_server(tmp_path, models_dir, env=env, name="b")
    lb = HAProxy(haproxy_bin, [a, b], tmp_path)
    stop = asyncio.Event()
    callers = [Caller(n) for n in range(CALLERS)]
    tasks: list[asyncio.Task[None]] = []
    try:
        for s in (a, b):
            await asyncio.to_thread(lb.wait_status, lb.names[s.port], "UP")
        speech = speak(SPOKEN)
        tasks = [asyncio.create_task(run_caller(me, lb, speech, stop)) for me in callers]

        # 1. The calls spread over both instances.
        await asyncio.to_thread(wait_until, "both instances answered calls and every caller had an answer",
                                lambda: len(served(a)) >= 1 and len(served(b)) >= 1
                                and all(me.answered >= 3 for me in callers) and not any(t.done() for t in tasks))
        on_a = set(served(a))
        before = {me.n: me.answered for me in callers}

        # 2. SIGTERM one instance while the calls go on.
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, "the drained instance exited and every caller went on",
                                lambda: a.proc.poll() is not None and all(me.answered >= before[me.n] + 3
                                                                          for me in callers))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), BOUND_S)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lb.stop()
        a.stop(10, reap=True)
        b_code = b.stop(30, reap=True)
    report = {me.n: {"answered": me.answered, "resent": me.resent, "calls": len(me.calls), "closes": me.closes}
              for me in callers}
    print(f"\ncallers: {json.dumps(report)}")

    # The instance drained: exit 0, each of its calls closed between turns, none left to the timeout.
    assert a.proc.returncode == 0 and b_code == 0, a.tail()
    (drained,) = [e for e in a.log_events() if e.get("event") == "server.drained"]
    cut = drained["open_at_start"].get("ava", 0)
    assert drained["closed"] == {"between_turns": cut} and drained["left"] == 0
    assert cut >= 1, "the drained instance had no call open: the test proved nothing"

    # HAProxy took it out of rotation by its /ready, before it went away.
    down = [line for line in lb.log().splitlines() if "las1 is DOWN" in line]
    assert down and "Layer7 wrong status" in down[0] and "503" in down[0], lb.log()[-3000:]

    # No turn failed: no error reply, no refused call, every request answered (those cut by a close were
    # sent again and answered on the next call), and every answer an instance gave reached its caller.
    assert not [e for me in callers for e in me.errors]
    assert not [r for me in callers for r in me.refused]
    for me in callers:
        assert me.answered == me.sent - me.resent
        assert me.answered >= before[me.n] + 3
    assert sum(me.resent for me in callers) <= cut  # a close cuts at most the one request its caller awaited
    got = collections.Counter({cid: n for me in callers for cid, n in me.answers.items()})
    given = served(a) + served(b)
    assert {cid: n for cid, n in given.items() if n} == {cid: n for cid, n in got.items() if n}

    # The callers that were on the drained instance got 1001 and called again, through HAProxy, on the other.
    moved = [me for me in callers if any(cid in on_a for cid in me.calls)]
    assert moved
    for me in moved:
        first_on_a = next(i for i, cid in enumerate(me.calls) if cid in on_a)
        assert me.closes[first_on_a] == 1001
        later = me.calls[first_on_a + 1:]
        assert later and all(cid in served(b) for cid in later if me.answers[cid])


async def test_a_call_that_reaches_a_draining_instance_first_is_retried_on_the_other(
        haproxy_bin: str, models_dir: Path, tmp_path: Path) -> None:
    # HAProxy checks so rarely here that it still counts the draining instance as up: the new calls it sends
    # there are refused (503 "draining") and HAProxy's retry-on takes each to the other instance.
    env = {"LOCAL_DRAIN_NOTICE_S": "60", "LOCAL_DRAIN_TIMEOUT_S": "60"}
    a = start_server(tmp_path, models_dir, env=env, name="a")
    b = start_server(tmp_path, models_dir, env=env, name="b")
    lb = HAProxy(haproxy_bin, [a, b], tmp_path, check_inter="60s")
    held: list[Client] = []
    try:
        for s in (a, b):
            await asyncio.to_thread(lb.wait_status, lb.names[s.port], "UP")
        for _ in range(2):  # one open call on each (leastconn), so that new calls are spread between the two
            held.append(Client(await websockets.connect(lb.url, ping_interval=None)))
            await held[-1].request({"type": "status"}, "status_response")
        a.proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if a.http("/ready")[0] == 503:
                break
            await asyncio.sleep(0.05)
        assert lb.servers()["las1"]["status"] == "UP"  # HAProxy has not seen the drain
        sessions_b = len([e for e in b.log_events() if e.get("event") == "session.open"])
        for _ in range(6):
            c = Client(await websockets.connect(lb.url, ping_interval=None, open_timeout=BOUND_S))
            assert (await c.request({"type": "status"}, "status_response"))["type"] == "status_response"
            await c.close()
        assert len([e for e in b.log_events() if e.get("event") == "session.open"]) == sessions_b + 6
        # HAProxy's log marks a request it redispatched after a failed try with "+1" (retries field).
        retried = [line for line in lb.log().splitlines() if '"GET / HTTP/1.1"' in line and "/+1 " in line]
        assert retried, lb.log()[-3000:]
    finally:
        for c in held:
            await c.close()
        lb.stop()
        assert a.stop(30, reap=True) == 0 and b.stop(30, reap=True) == 0
