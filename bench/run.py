"""End-to-end benchmark of local-ai-server: the real server, the real socket, real speech.

Usage::

    .venv/bin/python bench/run.py [--quick] [--json] [--turns N] [--out FILE] [--keep-logs]

It starts its own server subprocesses (``python -m local_ai_server``) on free 127.0.0.1 ports with
JSON logs, drives them as a telephony client would (speech synthesized by Piper from known sentences,
streamed in real time as 20 ms PCM16 frames), reads the servers' ``turn.done`` / ``stt.final`` log
events and ``/metrics`` for the server-side breakdown, and stops every process it started.

Phases (each bounded by timeouts):

1. Speech for every sentence is synthesized once, before any server runs.
2. Server A (default settings): start-up times, idle ``status`` round-trip, idle RSS and RSS per idle
   connection (100 connections), voice-to-first-audio over ``full``-mode turns, and (full run only)
   the number of concurrent real-time ``stt`` sessions.
3. Server B (long generations: ``LOCAL_LLM_MAX_TOKENS=1500 LOCAL_LLM_CONTEXT=4096
   LOCAL_LLM_TEMPERATURE=0 LOCAL_LLM_REPEAT_PENALTY=1.0``, plus ``LOCAL_LLM_INFER_TIMEOUT_SEC=600`` so a
   slow machine does not cut them): bare llama-cpp-python decode rate in a separate process vs the rate
   through the server (alternating pairs), event-loop lag and ``status`` round-trip while generations run
   back to back, STT and TTS latency alone and beside a long generation, loop lag during ``reload_llm``.

Every phase also records how many cores processes outside the benchmark used meanwhile
(``details.external_load_cores``), because the figures are only as quiet as the machine.

The human-readable table goes to stdout; progress goes to stderr. With ``--json`` the last line of
stdout is one JSON object with every figure, its goal and whether it was met, and a ``machine`` block.
It measures and reports; it never fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local_ai_server.threads import thread_env  # noqa: E402

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------- constants

FRAME_MS = 20
RATE = 16000
FRAME_SAMPLES = RATE * FRAME_MS // 1000

QUESTIONS = [
    "What time do you open tomorrow?",
    "Can I book a table for two?",
    "Do you have any vegetarian dishes?",
    "Where is the nearest parking?",
    "How much does a large pizza cost?",
    "Are you open on Sunday evening?",
    "Can I pay with a credit card?",
    "Is there a table by the window?",
]
STT_SENTENCES = [
    "Please check the status of my order.",
    "I would like to change my delivery address.",
    "My account number is four five six seven.",
    "Can you send me the invoice by email?",
    "I need to cancel my appointment on Friday.",
    "The package arrived damaged yesterday.",
    "Please call me back after five o'clock.",
    "I want to speak with a manager please.",
]
TTS_SENTENCES = [
    "Your table for two is booked for seven tonight.",
    "One moment please, I am checking that for you.",
    "We open at nine in the morning.",
    "Thank you for calling, have a nice day.",
    "Your order will arrive in about twenty minutes.",
]

# A long generation on demand (as in tests/e2e/test_concurrency.py): SmolLM2 counts for as long as allowed.
LONG_PROMPT = "Repeat the word hello 500 times."
LONG_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LONG_CONTEXT = [{"role": "system", "content": LONG_SYSTEM}]
LONG_ENV = {"LOCAL_LLM_MAX_TOKENS": "1500", "LOCAL_LLM_CONTEXT": "4096", "LOCAL_LLM_TEMPERATURE": "0",
            "LOCAL_LLM_REPEAT_PENALTY": "1.0",
            # A 1500-token answer on a busy 2-core machine can exceed the default 60 s limit; the benchmark
            # wants whole generations, so the limit is raised (it changes nothing while under 60 s).
            "LOCAL_LLM_INFER_TIMEOUT_SEC": "600"}
BARE_N_CTX = 4096
# A pause before each decode-rate run, so both sides of a pair start from an equally rested machine.
PAIR_REST_S = 1.0
DROPPED = "las_audio_frames_dropped_total"

GOALS: dict[str, tuple[str, float]] = {
    "v2fa_p50_ms": ("<=", 1000),
    "v2fa_p95_ms": ("<=", 1500),
    "server_p50_ms": ("<=", 600),
    "loop_lag_p99_ms": ("<", 10),
    "loop_lag_p99_ms_reload": ("<", 10),
    "status_p99_ms_under_llm": ("<", 50),
    "llm_tok_s_ratio_vs_bare": (">=", 0.95),
    "stt_sessions_realtime_max": (">=", 20),
    "port_open_s": ("<", 2),
    "ready_s": ("<", 10),
    "rss_mb_per_idle_connection": ("<", 1),
}


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure (quick vs full)."""

    quick: bool
    v2fa_turns: int
    turns_per_connection: int
    status_idle_samples: int
    status_llm_samples: int
    idle_connections: int
    stt_samples: int
    tts_samples: int
    reloads: int
    rate_runs: int
    rate_token_cap: int
    stt_sessions: bool
    stt_session_utterances: int


def make_plan(quick: bool, turns: int | None) -> Plan:
    """Sample sizes for a quick (~3 min on 2 cores) or full (< ~15 min) run."""
    if quick:
        return Plan(quick=True, v2fa_turns=max(10, turns or 10), turns_per_connection=4,
                    status_idle_samples=60, status_llm_samples=200, idle_connections=100, stt_samples=3,
                    tts_samples=5, reloads=4,
                    rate_runs=4, rate_token_cap=400, stt_sessions=False, stt_session_utterances=2)
    return Plan(quick=False, v2fa_turns=max(20, turns or 24), turns_per_connection=4, status_idle_samples=100,
                status_llm_samples=400, idle_connections=100, stt_samples=8, tts_samples=12, reloads=8,
                rate_runs=10, rate_token_cap=800, stt_sessions=True, stt_session_utterances=2)


# ---------------------------------------------------------------------------------------------- helpers

_T0 = time.monotonic()


def progress(msg: str) -> None:
    """A progress line on stderr (stdout carries only the table and the JSON)."""
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def pct(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None without samples."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return None
    return float(np.percentile(arr, q))


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def summary(values: list[float], digits: int = 1) -> dict[str, Any]:
    """p50/p95/p99/max and the sample count."""
    return {"p50": rnd(pct(values, 50), digits), "p95": rnd(pct(values, 95), digits),
            "p99": rnd(pct(values, 99), digits), "max": rnd(max(values), digits) if values else None,
            "n": len(values)}


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    """VmRSS of one process in MB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------- server


@dataclass
class Server:
    """A server subprocess this benchmark started."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    popen_at: float
    port_open_s: float | None = None
    ready_s: float | None = None
    known_children: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def http(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        """GET a path on the server's HTTP side: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()

    def metrics(self) -> str:
        """The /metrics text."""
        _, body = self.http("/metrics")
        return body.decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def remember_children(self) -> None:
        """Record the server's descendants (LLM workers) so none can outlive it."""
        if self.proc.poll() is None:
            self.known_children.update(descendants(self.proc.pid))

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; then make sure no worker it spawned outlives it."""
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                progress(f"server {self.name} did not stop in {timeout}s: SIGKILL")
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        deadline = time.monotonic() + 5
        leftover = [p for p in self.known_children if alive(p)]
        while leftover and time.monotonic() < deadline:
            time.sleep(0.1)
            leftover = [p for p in leftover if alive(p)]
        for pid in leftover:
            progress(f"killing leftover worker pid {pid} of server {self.name}")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


_SERVERS: list[Server] = []
_CHILDREN: list[subprocess.Popen[str]] = []  # other subprocesses in flight (bare llama-cpp-python runs)


def interrupt_children() -> None:
    """On a signal: kill helper processes and ask servers to stop, so no blocking thread waits on them."""
    for proc in tuple(_CHILDREN):  # a copy: a worker thread may remove its entry meanwhile
        with contextlib.suppress(OSError):
            proc.kill()
    for srv in _SERVERS:
        if srv.proc.poll() is None:
            srv.remember_children()
            with contextlib.suppress(OSError):
                srv.proc.send_signal(signal.SIGTERM)


def start_server(name: str, tmp: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    """Start `python -m local_ai_server` on a free port; time port-open and /ready from Popen."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_")}
    full_env.update({"LOCAL_WS_PORT": str(port), "LOCAL_WS_HOST": "127.0.0.1", "LOCAL_LOG_JSON": "1",
                     "LOCAL_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                     "LOCAL_MODELS_DIR": str(ROOT / "models")})
    full_env.update(env or {})
    log_path = tmp / f"server-{name}-{port}.log"
    fh = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its whole life
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "local_ai_server"], cwd=str(ROOT), env=full_env,
                            stdout=fh, stderr=subprocess.STDOUT)
    fh.close()
    srv = Server(name=name, proc=proc, port=port, log_path=log_path, popen_at=t0)
    _SERVERS.append(srv)
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited early ({proc.returncode}):\n{srv.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                srv.port_open_s = time.perf_counter() - t0
                break
        except OSError:
            time.sleep(0.005)
    if srv.port_open_s is None:
        raise RuntimeError(f"server {name}: port never opened in {timeout}s:\n{srv.tail()}")
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited early ({proc.returncode}):\n{srv.tail()}")
        try:
            status, _ = srv.http("/ready", timeout=2)
            if status == 200:
                srv.ready_s = time.perf_counter() - t0
                break
        except OSError:
            pass
        time.sleep(0.02)
    if srv.ready_s is None:
        raise RuntimeError(f"server {name} not ready in {timeout}s:\n{srv.tail()}")
    srv.remember_children()
    return srv


def stop_all_servers() -> None:
    for srv in _SERVERS:
        try:
            code = srv.stop()
            progress(f"server {srv.name} stopped (exit code {code})")
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            progress(f"stopping server {srv.name} failed: {exc!r}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


def histogram_buckets(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    """[(le, cumulative count)] of one unlabelled histogram, sorted by le."""
    out = []
    prefix = f'{name}_bucket{{le="'
    for key, value in metrics.items():
        if key.startswith(prefix):
            le = key[len(prefix):].split('"', 1)[0]
            out.append((math.inf if le == "+Inf" else float(le), value))
    return sorted(out)


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str,
                       q: float) -> dict[str, Any]:
    """The q-quantile of the observations between two scrapes: bucket upper bound and interpolation."""
    b = dict(histogram_buckets(before, name))
    a = histogram_buckets(after, name)
    deltas = [(le, cum - b.get(le, 0.0)) for le, cum in a]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return {"upper_ms": None, "lower_ms": None, "interp_ms": None, "samples": 0, "max_bucket_ms": None}
    rank = q * total
    prev_le, prev_cum = 0.0, 0.0
    upper = lower = interp = None
    for le, cum in deltas:
        if cum >= rank:
            upper, lower = le, prev_le
            if math.isinf(le):
                interp = prev_le
            else:
                frac = (rank - prev_cum) / (cum - prev_cum) if cum > prev_cum else 1.0
                interp = prev_le + (le - prev_le) * frac
            break
        prev_le, prev_cum = le, cum
    max_bucket = None
    prev_cum = 0.0
    for le, cum in deltas:
        if cum > prev_cum:
            max_bucket = le
        prev_cum = cum
    return {
        "upper_ms": None if upper is None or math.isinf(upper) else upper * 1000,
        "upper_inf": bool(upper is not None and math.isinf(upper)),
        "lower_ms": None if lower is None else lower * 1000,
        "interp_ms": None if interp is None else round(interp * 1000, 2),
        "samples": int(total),
        "max_bucket_ms": None if max_bucket is None else (math.inf if math.isinf(max_bucket)
                                                            else max_bucket * 1000),
    }


# ---------------------------------------------------------------------------------------------- client


class Client:
    """A websockets client recording every frame it receives with its arrival time."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        # (perf_counter at arrival, "json" | "bin", dict | byte length)
        self.items: list[tuple[float, str, Any]] = []
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str) -> Client:
        import websockets

        ws = await asyncio.wait_for(websockets.connect(url, max_size=None, ping_interval=None,
                                                       open_timeout=20, close_timeout=5), 30)
        return cls(ws)

    async def _read(self) -> None:
        import websockets

        try:
            async for frame in self.ws:
                t = time.perf_counter()
                if isinstance(frame, bytes):
                    self.items.append((t, "bin", len(frame)))
                else:
                    self.items.append((t, "json", json.loads(frame)))
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self._new.set()

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def send(self, msg: dict[str, Any] | bytes) -> None:
        await self.ws.send(msg if isinstance(msg, bytes) else json.dumps(msg))

    async def wait_item(self, pred: Callable[[str, Any], bool], start: int = 0,
                        timeout: float = 60) -> tuple[int, float, Any]:
        """The first item at index >= start matching pred(kind, value): (index, arrival time, value)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = start
        while True:
            items = self.items
            for i in range(seen, len(items)):
                t, kind, value = items[i]
                if pred(kind, value):
                    return i, t, value
            seen = len(items)
            if self._reader.done():
                raise ConnectionError(f"connection closed while waiting (close code {self.ws.close_code})")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for a message")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), remaining)

    async def wait_json(self, pred: Callable[[dict[str, Any]], bool], start: int = 0,
                        timeout: float = 60) -> tuple[int, float, dict[str, Any]]:
        return await self.wait_item(lambda k, v: k == "json" and pred(v), start, timeout)

    async def request(self, msg: dict[str, Any], reply_type: str,
                      timeout: float = 60) -> tuple[dict[str, Any], float]:
        """Send; wait for the `reply_type` reply (same request_id if given): (reply, round-trip seconds)."""
        start = len(self.items)
        rid = msg.get("request_id")
        t0 = time.perf_counter()
        await self.send(msg)
        _, t, reply = await self.wait_json(
            lambda m: m.get("type") == reply_type and (rid is None or m.get("request_id") == rid),
            start, timeout)
        return reply, t - t0

    def trim(self) -> None:
        """Forget what was received (long runs)."""
        self.items = []

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 10)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def noise(samples: int, seed: int = 0) -> np.ndarray:
    """A line's background: not digital zeros, far below the server's energy gate."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(samples) * 1e-4).astype(np.float32)


class Streamer:
    """Sends a continuous real-time 20 ms PCM16 stream: queued speech, otherwise line noise."""

    def __init__(self, client: Client, seed: int = 0) -> None:
        from local_ai_server.audio import float32_to_pcm16

        self._pcm16 = float32_to_pcm16
        self.client = client
        self._queue: collections.deque[tuple[bytes, asyncio.Future[float] | None]] = collections.deque()
        self._silence = float32_to_pcm16(noise(FRAME_SAMPLES, seed))
        self._task: asyncio.Task[None] | None = None
        self._stop = False
        self.frames_sent = 0
        self.max_late_s = 0.0
        self.late_frames = 0  # sent more than 40 ms after their slot

    def say(self, audio: np.ndarray, lead_s: float = 0.3) -> asyncio.Future[float]:
        """Queue `lead_s` of line noise, then `audio`; resolves to the send time of its last frame."""
        x = np.concatenate([noise(int(lead_s * RATE), len(self._queue) + 1), audio.astype(np.float32)])
        pad = (-len(x)) % FRAME_SAMPLES
        if pad:
            x = np.concatenate([x, noise(pad, 7)])
        data = self._pcm16(x)
        step = FRAME_SAMPLES * 2
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        n = len(data) // step
        for i in range(n):
            self._queue.append((data[i * step:(i + 1) * step], fut if i == n - 1 else None))
        return fut

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        period = FRAME_MS / 1000
        t0 = time.perf_counter()
        i = 0
        while not self._stop:
            frame, fut = self._queue.popleft() if self._queue else (self._silence, None)
            late = time.perf_counter() - (t0 + i * period)
            self.max_late_s = max(self.max_late_s, late)
            if late > 0.04:
                self.late_frames += 1
            if late > 0.2:
                t0 = time.perf_counter() - i * period  # never burst more than 200 ms to catch up
            try:
                await self.client.ws.send(frame)
            except Exception:  # noqa: BLE001 - connection gone: the waiting side reports it
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError("stream ended"))
                return
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())
            self.frames_sent += 1
            i += 1
            delay = t0 + i * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
            if not self._task.done():
                self._task.cancel()
        for _, fut in self._queue:
            if fut is not None and not fut.done():
                fut.cancel()
        self._queue.clear()


# ---------------------------------------------------------------------------------------------- speech


def trim_silence(x: np.ndarray, rel: float = 0.02) -> np.ndarray:
    """Cut leading/trailing near-silence so 'end of speech' is the end of the last word."""
    win = RATE // 100
    n = len(x) // win
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * win].reshape(n, win) ** 2, axis=1))
    active = np.nonzero(rms > rel * float(rms.max()))[0]
    if active.size == 0:
        return x
    return x[active[0] * win:(active[-1] + 1) * win].copy()


def synthesize(sentences: list[str]) -> dict[str, np.ndarray]:
    """Every sentence spoken by the embedded Piper voice, 16 kHz float32, silence trimmed."""
    from local_ai_server.audio import resample
    from local_ai_server.engines.tts import PiperTts
    from local_ai_server.setup.selection import read_selection

    sel = read_selection(ROOT / "models")
    if sel is None:
        raise RuntimeError(f"no models installed in {ROOT / 'models'}: run ./install.sh")
    tts = PiperTts(sel.path("tts"), threads=max(1, min(2, os.cpu_count() or 1)), variation=False)
    out = {}
    for s in sentences:
        out[s] = trim_silence(resample(tts.synthesize_all(s), tts.sample_rate, RATE))
    del tts
    return out


# ---------------------------------------------------------------------------------------------- measurements


async def status_probe(url: str, samples: int, hz: float = 20.0, tag: str = "s") -> list[float]:
    """`status` round-trips (ms) from a fresh connection at `hz`, one at a time."""
    c = await Client.connect(url)
    out: list[float] = []
    try:
        period = 1.0 / hz
        t0 = time.perf_counter()
        for i in range(samples):
            _, rtt = await c.request({"type": "status", "request_id": f"{tag}{i}"}, "status_response",
                                     timeout=15)
            out.append(rtt * 1000)
            if i % 50 == 49:
                c.trim()
            delay = t0 + (i + 1) * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await c.close()
    return out


async def wait_pool_idle(url: str, timeout: float = 30) -> dict[str, Any]:
    """Poll `status` until no LLM worker is busy and nothing is queued."""
    c = await Client.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            st, _ = await c.request({"type": "status", "request_id": "idle?"}, "status_response", timeout=15)
            pool = st.get("pool", {})
            if (pool.get("busy", 0) == 0 and pool.get("queued", 0) == 0) or time.monotonic() > deadline:
                return st
            c.trim()
            await asyncio.sleep(0.2)
    finally:
        await c.close()


def _reply_to(rid: str) -> Callable[[dict[str, Any]], bool]:
    """Predicate: the llm_response or error answering request `rid`."""
    return lambda m: m.get("request_id") == rid and m.get("type") in ("llm_response", "error")


def long_request(rid: str, call_id: str) -> dict[str, Any]:
    return {"type": "llm_request", "text": LONG_PROMPT, "context": LONG_CONTEXT, "stream": True,
            "request_id": rid, "call_id": call_id}


class LlmHog:
    """Back-to-back long streamed LLM generations on one connection, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.generations = 0
        self.errors: list[str] = []

    async def start(self) -> None:
        self.client = await Client.connect(self.url)
        self._task = asyncio.ensure_future(self._loop())
        # The window starts only once tokens flow.
        await self.client.wait_json(lambda m: m.get("type") == "llm_token", 0, timeout=90)

    async def _loop(self) -> None:
        assert self.client is not None
        c = self.client
        k = 0
        while True:
            k += 1
            rid = f"hog-{k}"
            start = len(c.items)
            await c.send(long_request(rid, "hog"))
            _, _, m = await c.wait_json(_reply_to(rid), start, timeout=300)
            if m.get("type") == "error":
                self.errors.append(f"{m.get('code')}: {m.get('message')}")
                await asyncio.sleep(0.5)
            else:
                self.generations += 1
            # Keep the last generation's messages only (memory bounded); the waiter scans from `start`.
            c.items = c.items[len(c.items):]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.request({"type": "barge_in", "call_id": "hog", "request_id": "hog-stop"},
                                          "barge_in_ack", timeout=10)
            await self.client.close()
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                self.errors.append(repr(exc))


async def measure_idle_connections(srv: Server, n: int) -> dict[str, Any]:
    """Server RSS before and with `n` idle WebSocket connections open."""
    await asyncio.sleep(1.0)
    before = rss_mb(srv.proc.pid)
    clients: list[Client] = []
    try:
        for i in range(0, n, 20):
            clients += await asyncio.gather(*[Client.connect(srv.url) for _ in range(min(20, n - i))])
        # Every connection is a live session once it answers.
        await asyncio.gather(*[c.request({"type": "status", "request_id": "x"}, "status_response", timeout=30)
                               for c in clients])
        await asyncio.sleep(1.0)
        during = rss_mb(srv.proc.pid)
        st, _ = await clients[0].request({"type": "status", "request_id": "n"}, "status_response")
        sessions = st.get("sessions")
    finally:
        await asyncio.gather(*[c.close() for c in clients], return_exceptions=True)
    per = None if before is None or during is None else (during - before) / n
    return {"rss_mb_before": rnd(before, 2), "rss_mb_with_connections": rnd(during, 2), "connections": n,
            "sessions_reported": sessions, "rss_mb_per_idle_connection": rnd(per, 4)}


async def measure_v2fa(srv: Server, plan: Plan, speech: dict[str, np.ndarray]) -> dict[str, Any]:
    """Voice-to-first-audio over full-mode turns: end of the caller's speech -> first binary audio frame."""
    turns: list[dict[str, Any]] = []
    n_conn = math.ceil(plan.v2fa_turns / plan.turns_per_connection)
    q = 0
    late_frames = 0
    max_late = 0.0
    for conn in range(n_conn):
        call_id = f"v2fa-{conn}"
        c = await Client.connect(srv.url)
        streamer = Streamer(c, seed=conn)
        try:
            await c.request({"type": "set_mode", "mode": "full", "call_id": call_id, "request_id": "m"},
                            "mode_ready", timeout=15)
            streamer.start()
            for _ in range(plan.turns_per_connection):
                if len(turns) >= plan.v2fa_turns:
                    break
                question = QUESTIONS[q % len(QUESTIONS)]
                q += 1
                rec: dict[str, Any] = {"call_id": call_id, "question": question, "ok": False}
                turns.append(rec)
                mark = len(c.items)
                try:
                    t_end = await asyncio.wait_for(streamer.say(speech[question]), 30)
                    _, t_audio, first = await c.wait_item(lambda k, v: k == "bin" or (
                        k == "json" and v.get("type") == "error"), mark, timeout=30)
                    if isinstance(first, dict):  # an error came before any audio
                        raise RuntimeError(f"server error {first.get('code')}: {first.get('message')}")
                    rec["v2fa_ms"] = (t_audio - t_end) * 1000
                    _, _, resp = await c.wait_json(lambda m: m.get("type") == "llm_response", mark,
                                                   timeout=90)
                    rec["answer"] = resp.get("text", "")
                    finals = [v for _, k, v in c.items[mark:] if k == "json" and v.get("type") == "stt_result"
                              and v.get("is_final")]
                    rec["heard"] = finals[0].get("text") if finals else None
                    rec["finals"] = len(finals)
                    rec["audio_frames"] = sum(1 for _, k, _ in c.items[mark:] if k == "bin")
                    rec["ok"] = "v2fa_ms" in rec
                    progress(f"  turn {len(turns):2d}: v2fa {rec['v2fa_ms']:7.1f} ms  heard {rec['heard']!r}")
                except (TimeoutError, ConnectionError, RuntimeError, asyncio.TimeoutError) as exc:
                    rec["error"] = repr(exc)
                    progress(f"  turn {len(turns):2d}: FAILED {exc!r}")
                    if c.closed:
                        break
                await asyncio.sleep(0.2)
        finally:
            await streamer.stop()
            late_frames += streamer.late_frames
            max_late = max(max_late, streamer.max_late_s)
            await c.close()
    await asyncio.sleep(0.3)
    events = srv.events()
    # Pair each connection's turns with its turn.done events, in order.
    done_by_call: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    stt_by_call: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        cid = str(e.get("call_id", ""))
        if not cid.startswith("v2fa-"):
            continue
        if e.get("event") == "turn.done" and e.get("kind") == "voice":
            done_by_call[cid].append(e)
        elif e.get("event") == "stt.final":
            stt_by_call[cid].append(e)
    endpoint: list[float] = []
    unpaired = 0
    for cid in {t["call_id"] for t in turns}:
        mine = [t for t in turns if t["call_id"] == cid]
        done = done_by_call.get(cid, [])
        if len(done) == len(mine) and all(t["ok"] for t in mine):
            for t, e in zip(mine, done):
                if e.get("first_audio_ms") is not None:
                    t["server_first_audio_ms"] = e["first_audio_ms"]
                    endpoint.append(t["v2fa_ms"] - e["first_audio_ms"])
        else:
            unpaired += len(mine)
    all_done = [e for v in done_by_call.values() for e in v]
    all_stt = [e for v in stt_by_call.values() for e in v]
    v2fa = [t["v2fa_ms"] for t in turns if t.get("ok")]
    first_audio = [float(e["first_audio_ms"]) for e in all_done if e.get("first_audio_ms") is not None]
    first_token = [float(e["llm_first_token_ms"]) for e in all_done
                   if e.get("llm_first_token_ms") is not None]
    stt = [float(e["stt_ms"]) for e in all_stt if e.get("stt_ms") is not None]
    # Stage deltas per turn: STT done -> first token, first token -> first audio queued.
    ttft = [float(e["llm_first_token_ms"]) - float(e["stt_ms"]) for e in all_done
            if e.get("llm_first_token_ms") is not None and e.get("stt_ms") is not None]
    tts_first = [float(e["first_audio_ms"]) - float(e["llm_first_token_ms"]) for e in all_done
                 if e.get("first_audio_ms") is not None and e.get("llm_first_token_ms") is not None]
    return {
        "turns": len(turns), "ok": len(v2fa), "v2fa": summary(v2fa), "stt_ms": summary(stt),
        "llm_first_token_ms": summary(first_token), "first_audio_ms": summary(first_audio),
        "llm_ttft_after_stt_ms": summary(ttft), "first_token_to_first_audio_ms": summary(tts_first),
        "endpoint_delay_ms": summary(endpoint), "endpoint_delay_pairs": len(endpoint),
        "endpoint_unpaired_turns": unpaired,
        "endpoint_delay_ms_from_p50s": rnd((pct(v2fa, 50) or math.nan) - (pct(first_audio, 50) or math.nan)),
        "client_late_frames": late_frames, "client_max_send_late_ms": rnd(max_late * 1000),
        "samples": [{k: (rnd(v) if isinstance(v, float) else v) for k, v in t.items() if k != "question"}
                    for t in turns],
    }


async def stt_utterances(srv: Server, speech: dict[str, np.ndarray], sentences: list[str],
                         call_id: str) -> dict[str, Any]:
    """Stream utterances in `stt` mode; server stt_ms (stt.final) and client end-of-speech -> final."""
    c = await Client.connect(srv.url)
    streamer = Streamer(c, seed=11)
    client_ms: list[float] = []
    errors: list[str] = []
    try:
        await c.request({"type": "set_mode", "mode": "stt", "call_id": call_id, "request_id": "m"},
                        "mode_ready", timeout=15)
        streamer.start()
        for s in sentences:
            mark = len(c.items)
            try:
                t_end = await asyncio.wait_for(streamer.say(speech[s]), 30)
                _, t_final, _ = await c.wait_json(
                    lambda m: m.get("type") == "stt_result" and bool(m.get("is_final")), mark, timeout=30)
                client_ms.append((t_final - t_end) * 1000)
            except (TimeoutError, ConnectionError, asyncio.TimeoutError) as exc:
                errors.append(repr(exc))
                if c.closed:
                    break
    finally:
        await streamer.stop()
        await c.close()
    await asyncio.sleep(0.3)
    stt = [float(e["stt_ms"]) for e in srv.events()
           if e.get("event") == "stt.final" and e.get("call_id") == call_id and e.get("stt_ms") is not None]
    return {"stt_ms": summary(stt), "speech_end_to_final_ms": summary(client_ms), "errors": errors,
            "client_late_frames": streamer.late_frames}


async def tts_round_trips(url: str, n: int, tag: str) -> dict[str, Any]:
    """`tts_request` -> `tts_response` round-trips (ms)."""
    c = await Client.connect(url)
    out: list[float] = []
    errors: list[str] = []
    try:
        for i in range(n):
            text = TTS_SENTENCES[i % len(TTS_SENTENCES)]
            try:
                reply, rtt = await c.request({"type": "tts_request", "text": text, "request_id": f"{tag}{i}"},
                                             "tts_response", timeout=60)
                if reply.get("byte_length", 0) > 0:
                    out.append(rtt * 1000)
                else:
                    errors.append("empty audio")
            except (TimeoutError, ConnectionError) as exc:
                errors.append(repr(exc))
            c.trim()
            await asyncio.sleep(0.1)
    finally:
        await c.close()
    return {"tts_ms": summary(out), "errors": errors}


async def server_decode_rate(url: str, cap: int, tag: str) -> dict[str, Any]:
    """Decode tok/s through the server: llm_token messages, first to last, on an idle server."""
    c = await Client.connect(url)
    try:
        rid = f"rate-{tag}"
        await c.send(long_request(rid, f"rate-{tag}"))
        count = 0
        first_n = 1
        first = last = None
        start = 0
        ended = False
        error: str | None = None
        deadline = time.monotonic() + 180
        while count < cap and time.monotonic() < deadline:
            idx, t, m = await c.wait_json(lambda m: m.get("request_id") == rid, start, timeout=60)
            start = idx + 1
            if m.get("type") == "llm_token":
                # One message may carry several tokens (the server coalesces them): count model tokens.
                n = int(m.get("tokens") or 1)
                count += n
                if first is None:
                    first, first_n = t, n
                last = t
            elif m.get("type") in ("llm_response", "error"):
                ended = True
                if m.get("type") == "error":
                    error = f"{m.get('code')}: {m.get('message')}"
                break
        if not ended:
            await c.request({"type": "barge_in", "call_id": f"rate-{tag}", "request_id": "stop"},
                            "barge_in_ack", timeout=10)
    finally:
        await c.close()
    rate = ((count - first_n) / (last - first) if first is not None and last is not None and last > first
            else None)
    out: dict[str, Any] = {"tokens": count, "tok_s": rnd(rate, 2),
                           "seconds": rnd(None if first is None or last is None else last - first, 2)}
    if error is not None:
        out["error"] = error  # the rate over the tokens that did arrive still counts
    return out


async def server_decode_run(url: str, threads: int, cap: int, tag: str) -> dict[str, Any]:
    """One decode-rate run through the server once its pool is idle, with the worker's CPU share."""
    st = await wait_pool_idle(url)
    worker = next(iter(st.get("pool", {}).get("pids") or []), None)
    await asyncio.sleep(PAIR_REST_S)
    return await with_cpu_share(worker, threads, server_decode_rate(url, cap, tag))


async def bare_decode_run(bare: BareLlm, threads: int) -> dict[str, Any]:
    """One decode-rate run of bare llama-cpp-python, with its CPU share."""
    assert bare.proc is not None
    await asyncio.sleep(PAIR_REST_S)
    return await with_cpu_share(bare.proc.pid, threads, bare.run())


BARE_SCRIPT = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
from llama_cpp import Llama
llm = Llama(model_path=spec["model"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
            n_threads_batch=spec["threads"], n_batch=spec["batch"], verbose=False)
msgs = [{"role": "system", "content": spec["system"]}, {"role": "user", "content": spec["prompt"]}]
# Warm up as the server's worker does (a couple of tokens), so both start from a warm process.
for _ in llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], stream=True, max_tokens=2,
                                    temperature=0.0):
    pass
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if line.strip() != "run":
        break
    times = []
    for chunk in llm.create_chat_completion(messages=msgs, stream=True, max_tokens=spec["max_tokens"],
                                            temperature=spec["temperature"], top_p=spec["top_p"],
                                            repeat_penalty=spec["repeat_penalty"]):
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    n = len(times)
    rate = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None
    print(json.dumps({"tokens": n, "tok_s": rate, "seconds": times[-1] - times[0] if n > 1 else None}),
          flush=True)
"""


class BareLlm:
    """bare llama-cpp-python in its own process: loaded once, one generation per `run()`, idle otherwise.

    It uses the same model, threads, batch and prompt as the server. Kept alive between runs so that
    bare and server runs can alternate closely and share the machine's (changing) load.
    """

    def __init__(self, model: str, threads: int, batch: int, cap: int, sampling: dict[str, Any]) -> None:
        self.spec = {"model": model, "threads": threads, "batch": batch, "n_ctx": BARE_N_CTX,
                     "system": LONG_SYSTEM, "prompt": LONG_PROMPT, "max_tokens": cap,
                     "temperature": float(sampling.get("temperature", 0.0)),
                     "top_p": float(sampling.get("top_p", 0.9)),
                     "repeat_penalty": float(sampling.get("repeat_penalty", 1.0))}
        self.proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except asyncio.TimeoutError:
            self.kill()
            raise TimeoutError(f"bare llama-cpp-python gave no answer in {timeout}s (killed)") from None
        if not line:
            err = ""
            if self._stderr is not None:
                self._stderr.seek(0)
                err = self._stderr.read()[-500:]
            raise RuntimeError(f"bare llama-cpp-python exited ({self.proc.poll()}): {err}")
        return dict(json.loads(line))

    def _spawn(self) -> None:
        env = dict(thread_env(dict(os.environ)))
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", BARE_SCRIPT, json.dumps(self.spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=env, cwd=str(ROOT))
        _CHILDREN.append(self.proc)

    async def start(self) -> None:
        await asyncio.to_thread(self._spawn)
        await self._line(120)

    async def run(self) -> dict[str, Any]:
        """One generation: tokens, tok/s (first to last token), seconds."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        out = await self._line(300)
        out["tok_s"] = rnd(out.get("tok_s"), 2)
        out["seconds"] = rnd(out.get("seconds"), 2)
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    async def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.kill()
            await asyncio.to_thread(self.proc.wait, 5)
        with contextlib.suppress(ValueError):
            _CHILDREN.remove(self.proc)
        if self._stderr is not None:
            self._stderr.close()


# A pair counts as clean when processes outside this benchmark used under this many cores meanwhile.
CLEAN_EXTERNAL_CORES = 0.15


def system_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_tree_seconds() -> dict[int, float]:
    """CPU seconds of this process and every process it started (servers, workers, bare llama)."""
    out = {}
    for pid in [os.getpid(), *descendants(os.getpid())]:
        cpu = cpu_seconds(pid)
        if cpu is not None:
            out[pid] = cpu
    return out


async def with_cpu_share(pid: int | None, threads: int, aw: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await a decode run; add the CPU it got and what else ran meanwhile.

    cpu_share: the decoding process's cpu seconds / (wall seconds x threads).
    other_own_cores: cores used by the rest of this benchmark's process tree (client, server main process).
    external_cores: cores used by processes outside this benchmark (other work on the machine).
    """
    sys0, own0 = system_busy_seconds(), own_tree_seconds()
    t0 = time.perf_counter()
    out = await aw
    wall = time.perf_counter() - t0
    sys1, own1 = system_busy_seconds(), own_tree_seconds()
    own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
    mine = (own1.get(pid, 0.0) - own0.get(pid, 0.0)) if pid else 0.0
    out["cpu_share"] = rnd(mine / (wall * threads), 2) if pid in own1 and wall > 0 else None
    out["other_own_cores"] = rnd((own - mine) / wall, 2) if wall > 0 else None
    out["external_cores"] = (rnd(max(0.0, (sys1 - sys0 - own) / wall), 2)
                             if sys0 is not None and sys1 is not None and wall > 0 else None)
    return out


async def loop_lag_window(srv: Server, body: Callable[[], Awaitable[T]]) -> tuple[T, dict[str, Any]]:
    """Run `body` between two /metrics scrapes; the loop-lag histogram's p99 over that window."""
    before = parse_metrics(await asyncio.to_thread(srv.metrics))
    result = await body()
    after = parse_metrics(await asyncio.to_thread(srv.metrics))
    return result, histogram_quantile(before, after, "las_event_loop_lag_seconds", 0.99)


async def measure_reload_lag(srv: Server, reloads: int) -> dict[str, Any]:
    """Loop lag p99 over `reloads` back-to-back reload_llm requests (idle otherwise)."""
    c = await Client.connect(srv.url)
    durations: list[float] = []
    errors: list[str] = []

    async def body() -> None:
        for i in range(reloads):
            reply, rtt = await c.request({"type": "reload_llm", "request_id": f"reload-{i}"},
                                         "reload_response", timeout=180)
            if reply.get("status") != "success":
                errors.append(str(reply.get("message")))
            durations.append(rtt * 1000)

    try:
        _, lag = await loop_lag_window(srv, body)
    finally:
        await c.close()
    srv.remember_children()
    return {"lag": lag, "reload_ms": summary(durations), "errors": errors}


async def stt_session_level(srv: Server, n: int, speech: dict[str, np.ndarray], utterances: int,
                            level_tag: str) -> dict[str, Any]:
    """n concurrent real-time `stt` sessions, staggered; each utterance's end-of-speech -> final latency."""
    dropped_before = parse_metrics(await asyncio.to_thread(srv.metrics)).get(DROPPED, 0.0)
    clients: list[Client] = []
    streamers: list[Streamer] = []
    latencies: list[float] = []
    misses: list[str] = []
    errors: list[str] = []
    stagger_s = 2.0

    async def session(i: int) -> None:
        c, st = clients[i], streamers[i]
        await asyncio.sleep(stagger_s * i / n)
        for u in range(utterances):
            s = STT_SENTENCES[(i + u) % len(STT_SENTENCES)]
            mark = len(c.items)
            t_end = await asyncio.wait_for(st.say(speech[s], lead_s=0.4), 60)
            try:
                _, t_final, m = await c.wait_json(lambda m: m.get("type") in ("stt_result", "error") and (
                    m.get("type") == "error" or bool(m.get("is_final"))), mark, timeout=15)
            except (TimeoutError, ConnectionError) as exc:
                misses.append(f"session {i} utterance {u}: {exc!r}")
                continue
            if m.get("type") == "error":
                errors.append(f"{m.get('code')}: {m.get('message')}")
                continue
            latencies.append((t_final - t_end) * 1000)
            if not str(m.get("text", "")).strip():
                misses.append(f"session {i} utterance {u}: empty final")

    try:
        clients = list(await asyncio.gather(*[Client.connect(srv.url) for _ in range(n)]))
        await asyncio.gather(*[c.request({"type": "set_mode", "mode": "stt", "call_id": f"{level_tag}-{i}",
                                          "request_id": "m"}, "mode_ready", timeout=30)
                               for i, c in enumerate(clients)])
        streamers = [Streamer(c, seed=100 + i) for i, c in enumerate(clients)]
        for s in streamers:
            s.start()
        budget = stagger_s + utterances * 25 + 30
        await asyncio.wait_for(asyncio.gather(*[session(i) for i in range(n)]), budget)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError) as exc:
        misses.append(f"level aborted: {exc!r}")
    finally:
        await asyncio.gather(*[s.stop() for s in streamers], return_exceptions=True)
        for c in clients:
            for _, k, v in c.items:
                if k == "json" and v.get("type") == "error":
                    errors.append(f"{v.get('code')}: {v.get('message')}")
        await asyncio.gather(*[c.close() for c in clients], return_exceptions=True)
    dropped_after = parse_metrics(await asyncio.to_thread(srv.metrics)).get(DROPPED, 0.0)
    dropped = dropped_after - dropped_before
    expected = n * utterances
    slow = [x for x in latencies if x > 1500]
    ok = len(latencies) == expected and not slow and dropped == 0 and not errors and not misses
    return {"sessions": n, "ok": ok, "finals": len(latencies), "expected_finals": expected,
            "latency_ms": summary(latencies), "over_1500ms": len(slow), "dropped_frames": dropped,
            "errors": sorted(set(errors))[:5], "misses": misses[:5],
            "client_max_send_late_ms": rnd(max((s.max_late_s for s in streamers), default=0.0) * 1000),
            "client_late_frames": sum(s.late_frames for s in streamers),
            "client_limited": max((s.max_late_s for s in streamers), default=0.0) > 0.1}


async def measure_stt_sessions(srv: Server, speech: dict[str, np.ndarray], utterances: int,
                               time_budget_s: float = 300) -> dict[str, Any]:
    """Ramp 1, 2, 4, 8, 12, 16, 20, 24, ... until a level fails; then bisect the gap (bounded)."""
    levels = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48]
    results: list[dict[str, Any]] = []
    best = 0
    failed_at: int | None = None
    t0 = time.monotonic()
    for n in levels:
        if time.monotonic() - t0 > time_budget_s:
            break
        progress(f"  stt sessions: {n} concurrent ...")
        r = await stt_session_level(srv, n, speech, utterances, f"sess{n}")
        results.append(r)
        progress(f"    -> ok={r['ok']} finals {r['finals']}/{r['expected_finals']}"
                 f" p95 {r['latency_ms']['p95']} ms"
                 f" max {r['latency_ms']['max']} ms dropped {r['dropped_frames']}")
        await asyncio.sleep(1.0)
        if r["ok"]:
            best = n
        else:
            failed_at = n
            break
    lo, hi = best, failed_at
    steps = 0
    while hi is not None and hi - lo > 1 and steps < 2 and time.monotonic() - t0 < time_budget_s:
        mid = (lo + hi) // 2
        progress(f"  stt sessions (bisect): {mid} concurrent ...")
        r = await stt_session_level(srv, mid, speech, utterances, f"sessb{mid}")
        results.append(r)
        progress(f"    -> ok={r['ok']} p95 {r['latency_ms']['p95']} ms max {r['latency_ms']['max']} ms")
        if r["ok"]:
            lo = best = mid
        else:
            hi = mid
        steps += 1
        await asyncio.sleep(1.0)
    return {"max": best, "first_failure": hi, "levels": results,
            "resolution": None if hi is None else f"max passing {lo}, first failing {hi}"}


# ---------------------------------------------------------------------------------------------- machine


def machine_info(status: dict[str, Any] | None, quick: bool) -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    try:
        llama_version: str | None = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama_version = None
    models: dict[str, Any] | None = None
    if status:
        m = status.get("models", {})
        found: dict[str, Any] = {
            k: {"display": v.get("display"), "path": v.get("path"), "state": v.get("state")}
            for k, v in m.items() if isinstance(v, dict)}
        if "llm" in m:
            found["llm"]["config"] = m["llm"].get("config")
        found["tier"] = status.get("tier")
        models = found
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram, "python": platform.python_version(),
        "platform": platform.platform(), "llama_cpp_python": llama_version, "models": models,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": quick,
        "loadavg_at_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------- main run


ALL_KEYS = ("v2fa_p50_ms", "v2fa_p95_ms", "v2fa_samples", "stt_ms", "llm_first_token_ms", "first_audio_ms",
            "endpoint_delay_ms", "server_p50_ms", "loop_lag_p99_ms", "loop_lag_p99_ms_reload",
            "status_p99_ms_under_llm", "status_p50_ms_idle", "llm_tok_s_server", "llm_tok_s_bare",
            "llm_tok_s_ratio_vs_bare", "stt_sessions_realtime_max", "stt_ms_alone", "stt_ms_with_llm",
            "tts_ms_alone", "tts_ms_with_llm", "port_open_s", "ready_s", "rss_mb_idle", "rss_mb_llm_workers",
            "rss_mb_per_idle_connection")


async def guarded(res: dict[str, Any], name: str, fn: Callable[[], Awaitable[None]]) -> bool:
    """Run one phase; a failure is recorded in res['errors'] and the run goes on.

    Also records how many cores processes outside this benchmark used during the phase (noise).
    """
    sys0, own0, t0 = system_busy_seconds(), own_tree_seconds(), time.perf_counter()
    try:
        await fn()
        return True
    except Exception as exc:  # noqa: BLE001 - a broken phase must not lose the others' figures
        msg = f"{name}: {type(exc).__name__}: {exc}"
        progress(f"PHASE FAILED {msg}")
        res["errors"].append(msg[:2000])
        return False
    finally:
        sys1, own1, wall = system_busy_seconds(), own_tree_seconds(), time.perf_counter() - t0
        if sys0 is not None and sys1 is not None and wall > 0:
            own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
            res["details"].setdefault("external_load_cores", {})[name] = rnd(
                max(0.0, (sys1 - sys0 - own) / wall), 2)


async def run_benchmark(plan: Plan, tmp: Path) -> dict[str, Any]:
    """Every phase, in order; returns the result object (missing figures stay None)."""
    res: dict[str, Any] = {k: None for k in ALL_KEYS}
    res.update({"quick": plan.quick, "notes": [], "errors": []})
    details: dict[str, Any] = {}
    res["details"] = details
    loadavg = list(os.getloadavg())
    res["machine"] = machine_info(None, plan.quick)
    res["machine"]["loadavg_at_start"] = loadavg
    if not plan.stt_sessions:
        res["stt_sessions_realtime_max_skipped"] = "--quick skips the concurrent stt-session ramp"
        details["stt_sessions"] = {"skipped": "--quick skips the concurrent stt-session ramp"}

    progress("synthesizing caller speech with Piper ...")
    speech = await asyncio.to_thread(synthesize, QUESTIONS + STT_SENTENCES)
    details["speech_s"] = {s: round(len(a) / RATE, 2) for s, a in speech.items()}

    # ------------------------------------------------------------ server A: default settings
    progress("starting server A (default settings) ...")
    a = await asyncio.to_thread(start_server, "default", tmp)
    try:
        res["port_open_s"] = rnd(a.port_open_s, 3)
        res["ready_s"] = rnd(a.ready_s, 3)
        progress(f"  port open {a.port_open_s:.3f}s, ready {a.ready_s:.3f}s")
        c = await Client.connect(a.url)
        status_a, _ = await c.request({"type": "status", "request_id": "st"}, "status_response")
        await c.close()
        res["machine"] = machine_info(status_a, plan.quick)
        res["machine"]["loadavg_at_start"] = loadavg

        async def idle_status() -> None:
            progress("idle status round-trips ...")
            await asyncio.sleep(0.5)
            idle = await status_probe(a.url, plan.status_idle_samples, tag="idle")
            res["status_p50_ms_idle"] = rnd(pct(idle, 50), 2)
            details["status_idle_ms"] = summary(idle, 2)

        async def memory() -> None:
            progress(f"RSS idle and with {plan.idle_connections} idle connections ...")
            pids = [int(p) for p in status_a.get("pool", {}).get("pids", [])]
            res["rss_mb_idle"] = rnd(rss_mb(a.proc.pid), 1)
            res["rss_mb_llm_workers"] = [rnd(rss_mb(p), 1) for p in pids]
            conn = await measure_idle_connections(a, plan.idle_connections)
            res["rss_mb_per_idle_connection"] = conn["rss_mb_per_idle_connection"]
            details["idle_connections"] = conn

        async def v2fa() -> None:
            progress(f"voice-to-first-audio: {plan.v2fa_turns} full-mode turns ...")
            v = await measure_v2fa(a, plan, speech)
            details["v2fa"] = v
            res["v2fa_p50_ms"] = v["v2fa"]["p50"]
            res["v2fa_p95_ms"] = v["v2fa"]["p95"]
            res["v2fa_samples"] = v["ok"]
            res["stt_ms"] = v["stt_ms"]["p50"]
            res["llm_first_token_ms"] = v["llm_first_token_ms"]["p50"]
            res["first_audio_ms"] = v["first_audio_ms"]["p50"]
            res["server_p50_ms"] = v["first_audio_ms"]["p50"]
            res["endpoint_delay_ms"] = (v["endpoint_delay_ms"]["p50"] if v["endpoint_delay_pairs"]
                                        else v["endpoint_delay_ms_from_p50s"])

        async def sessions() -> None:
            progress("concurrent real-time stt sessions ...")
            sess = await measure_stt_sessions(a, speech, plan.stt_session_utterances)
            res["stt_sessions_realtime_max"] = sess["max"]
            details["stt_sessions"] = sess

        await guarded(res, "idle status", idle_status)
        await guarded(res, "memory", memory)
        await guarded(res, "v2fa", v2fa)
        if plan.stt_sessions:
            await guarded(res, "stt sessions", sessions)
        res["rss_mb_after_phase_a"] = rnd(rss_mb(a.proc.pid), 1)
    finally:
        progress("stopping server A ...")
        details["server_a_exit_code"] = await asyncio.to_thread(a.stop)

    # ------------------------------------------------------------ server B: long generations
    progress("starting server B (long generations) ...")
    b = await asyncio.to_thread(start_server, "long", tmp, LONG_ENV)
    try:
        details["server_b_start"] = {"port_open_s": rnd(b.port_open_s, 3), "ready_s": rnd(b.ready_s, 3)}
        c = await Client.connect(b.url)
        status_b, _ = await c.request({"type": "status", "request_id": "st"}, "status_response")
        await c.close()
        llm_cfg = status_b.get("models", {}).get("llm", {}).get("config", {})
        threads = int(llm_cfg.get("threads") or 1)
        model_path = status_b.get("models", {}).get("llm", {}).get("path")

        async def decode_rate() -> None:
            progress(f"decode rate: bare llama-cpp-python vs through the server (threads={threads}, "
                     f"{plan.rate_token_cap} tokens, {plan.rate_runs} alternating pairs) ...")
            bare_runs: list[dict[str, Any]] = []
            server_runs: list[dict[str, Any]] = []
            ratios: list[dict[str, Any]] = []
            details["decode_rate"] = {"bare_runs": bare_runs, "server_runs": server_runs,
                                      "pair_ratios": ratios, "threads": threads,
                                      "token_cap": plan.rate_token_cap, "pairs": plan.rate_runs}
            await wait_pool_idle(b.url)
            bare = BareLlm(str(model_path), threads, int(llm_cfg.get("batch") or 256), plan.rate_token_cap,
                           llm_cfg)
            try:
                await bare.start()
                assert bare.proc is not None
                async def bare_run() -> dict[str, Any]:
                    return await bare_decode_run(bare, threads)

                async def server_run(i: int) -> dict[str, Any]:
                    return await server_decode_run(b.url, threads, plan.rate_token_cap, str(i))

                for i in range(plan.rate_runs):
                    # Alternate which side goes first: on this kind of VM the second of two back-to-back
                    # generations is measurably slower, which would otherwise always count against one side.
                    if i % 2 == 0:
                        br = await bare_run()
                        sr = await server_run(i)
                    else:
                        sr = await server_run(i)
                        br = await bare_run()
                    bare_runs.append(br)
                    server_runs.append(sr)
                    progress(f"  pair {i + 1}: bare {br.get('tok_s')} tok/s (cpu share {br.get('cpu_share')},"
                             f" external {br.get('external_cores')} cores), server {sr.get('tok_s')} tok/s "
                             f"(worker cpu share {sr.get('cpu_share')}, server main + client "
                             f"{sr.get('other_own_cores')} cores, external {sr.get('external_cores')} cores)"
                             + (f" ({sr['error']})" if sr.get("error") else ""))
                    if br.get("tok_s") and sr.get("tok_s"):
                        ext = max(br.get("external_cores") or 0.0, sr.get("external_cores") or 0.0)
                        clean = ext < CLEAN_EXTERNAL_CORES
                        ratios.append({"ratio": round(sr["tok_s"] / br["tok_s"], 3), "clean": clean})
                    else:
                        ratios.append({"ratio": None, "clean": False})
            finally:
                await bare.close()
            # Each pair ran back to back: the figures are medians over the pairs in which no other work on
            # the machine competed for the cores (external_cores), or over all pairs if there is none.
            use = [i for i, r in enumerate(ratios) if r["clean"]] or list(range(len(ratios)))
            clean = [r["ratio"] for r in ratios if r["clean"]]
            res["llm_tok_s_bare"] = rnd(pct([bare_runs[i]["tok_s"] for i in use], 50), 2)
            res["llm_tok_s_server"] = rnd(pct([server_runs[i]["tok_s"] for i in use], 50), 2)
            res["llm_tok_s_ratio_vs_bare"] = rnd(pct([ratios[i]["ratio"] for i in use], 50), 3)
            details["decode_rate"]["ratio_from"] = (f"{len(clean)} clean pair(s)" if clean else
                                                    "all pairs (none clean: the machine was busy)")

        alone: dict[str, Any] = {}

        async def stt_tts_alone() -> None:
            progress("STT and TTS alone ...")
            await wait_pool_idle(b.url)
            alone["stt"] = await stt_utterances(b, speech, STT_SENTENCES[:plan.stt_samples], "stt-alone")
            res["stt_ms_alone"] = alone["stt"]["stt_ms"]["p50"]
            details["stt_alone"] = alone["stt"]
            alone["tts"] = await tts_round_trips(b.url, plan.tts_samples, "alone")
            res["tts_ms_alone"] = alone["tts"]["tts_ms"]["p50"]
            details["tts_alone"] = alone["tts"]

        async def under_llm() -> None:
            progress(f"loop lag and status round-trip ({plan.status_llm_samples} at 20 Hz) while the LLM "
                     "generates back to back ...")
            await wait_pool_idle(b.url)
            hog = LlmHog(b.url)
            try:
                await hog.start()
                under, lag = await loop_lag_window(b, lambda: status_probe(b.url, plan.status_llm_samples,
                                                                            tag="llm"))
                res["status_p99_ms_under_llm"] = rnd(pct(under, 99), 2)
                details["status_under_llm_ms"] = summary(under, 2)
                res["loop_lag_p99_ms"] = lag_value(lag)
                details["loop_lag_under_llm"] = lag
                progress("STT and TTS beside a long generation ...")
                stt_llm, lag_stt = await loop_lag_window(
                    b, lambda: stt_utterances(b, speech, STT_SENTENCES[:plan.stt_samples], "stt-llm"))
                res["stt_ms_with_llm"] = stt_llm["stt_ms"]["p50"]
                details["stt_with_llm"] = stt_llm
                details["loop_lag_stt_beside_llm"] = lag_stt
                tts_llm = await tts_round_trips(b.url, plan.tts_samples, "llm")
                res["tts_ms_with_llm"] = tts_llm["tts_ms"]["p50"]
                details["tts_with_llm"] = tts_llm
            finally:
                await hog.stop()
                details["llm_hog"] = {"generations_completed": hog.generations, "errors": hog.errors}

        async def reload_lag() -> None:
            progress(f"loop lag during {plan.reloads} reload_llm ...")
            await wait_pool_idle(b.url)
            rl = await measure_reload_lag(b, plan.reloads)
            res["loop_lag_p99_ms_reload"] = lag_value(rl["lag"])
            details["loop_lag_reload"] = rl

        await guarded(res, "decode rate", decode_rate)
        await guarded(res, "stt/tts alone", stt_tts_alone)
        await guarded(res, "under llm", under_llm)
        await guarded(res, "reload", reload_lag)
    finally:
        b.remember_children()
        progress("stopping server B ...")
        details["server_b_exit_code"] = await asyncio.to_thread(b.stop)
    return res


def lag_value(lag: dict[str, Any]) -> float | None:
    """The reported loop-lag p99: its bucket's upper bound (past the last bucket: its lower bound)."""
    if lag.get("upper_inf"):
        return lag.get("lower_ms")
    return lag.get("upper_ms")


# ---------------------------------------------------------------------------------------------- report


def judge(res: dict[str, Any]) -> dict[str, Any]:
    """Each goal, the measured value and whether it is met (None when not measured)."""
    out = {}
    for key, (op, goal) in GOALS.items():
        value = res.get(key)
        met: bool | None
        if value is None:
            met = None
        elif op == "<=":
            met = value <= goal
        elif op == "<":
            met = value < goal
            if key.startswith("loop_lag"):
                # Bucket upper bound: a p99 in the bucket (5, 10] ms is below 10 ms unless exactly 10.
                met = value <= goal
        else:
            met = value >= goal
        out[key] = {"goal": f"{op} {goal:g}", "value": value, "met": met}
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def render_table(res: dict[str, Any]) -> str:
    d = res["details"]
    goals = res["goals"]
    v = d.get("v2fa", {})
    rows: list[tuple[str, Any, Any, Any, Any, str]] = []

    def row(name: str, value: Any, s: dict[str, Any] | None = None, key: str | None = None,
            unit: str = "") -> None:
        g = goals.get(key or name)
        goal = g["goal"] if g else ""
        met = "" if not g else ("yes" if g["met"] else ("n/a" if g["met"] is None else "NO"))
        rows.append((name + (f" [{unit}]" if unit else ""), value, (s or {}).get("p50"), (s or {}).get("p95"),
                     (s or {}).get("n"), f"{goal} {met}".strip()))

    row("v2fa_p50_ms", res.get("v2fa_p50_ms"), v.get("v2fa"))
    row("v2fa_p95_ms", res.get("v2fa_p95_ms"), v.get("v2fa"))
    row("  stt_ms (stt.final)", res.get("stt_ms"), v.get("stt_ms"))
    row("  llm_first_token_ms", res.get("llm_first_token_ms"), v.get("llm_first_token_ms"))
    row("    = stt done -> 1st token", (v.get("llm_ttft_after_stt_ms") or {}).get("p50"),
        v.get("llm_ttft_after_stt_ms"))
    row("    + 1st token -> 1st audio", (v.get("first_token_to_first_audio_ms") or {}).get("p50"),
        v.get("first_token_to_first_audio_ms"))
    row("  first_audio_ms", res.get("first_audio_ms"), v.get("first_audio_ms"))
    row("  endpoint_delay_ms (est.)", res.get("endpoint_delay_ms"), v.get("endpoint_delay_ms"))
    row("server_p50_ms", res.get("server_p50_ms"), v.get("first_audio_ms"))
    lag = d.get("loop_lag_under_llm", {})
    row("loop_lag_p99_ms", res.get("loop_lag_p99_ms"), {"n": lag.get("samples")}, unit="bucket bound")
    rlag = d.get("loop_lag_reload", {}).get("lag", {})
    row("loop_lag_p99_ms_reload", res.get("loop_lag_p99_ms_reload"), {"n": rlag.get("samples")},
        unit="bucket bound")
    row("status_p99_ms_under_llm", res.get("status_p99_ms_under_llm"), d.get("status_under_llm_ms"))
    row("status_p50_ms_idle", res.get("status_p50_ms_idle"), d.get("status_idle_ms"))
    dr = d.get("decode_rate", {})
    row("llm_tok_s_server", res.get("llm_tok_s_server"), {"n": len(dr.get("server_runs", []))})
    row("llm_tok_s_bare", res.get("llm_tok_s_bare"), {"n": len(dr.get("bare_runs", []))})
    row("llm_tok_s_ratio_vs_bare", res.get("llm_tok_s_ratio_vs_bare"))
    ss = d.get("stt_sessions", {})
    row("stt_sessions_realtime_max",
        res.get("stt_sessions_realtime_max") if "skipped" not in ss else "skipped")
    row("stt_ms_alone", res.get("stt_ms_alone"), d.get("stt_alone", {}).get("stt_ms"))
    row("stt_ms_with_llm", res.get("stt_ms_with_llm"), d.get("stt_with_llm", {}).get("stt_ms"))
    row("tts_ms_alone", res.get("tts_ms_alone"), d.get("tts_alone", {}).get("tts_ms"))
    row("tts_ms_with_llm", res.get("tts_ms_with_llm"), d.get("tts_with_llm", {}).get("tts_ms"))
    row("port_open_s", res.get("port_open_s"))
    row("ready_s", res.get("ready_s"))
    row("rss_mb_idle", res.get("rss_mb_idle"))
    row("rss_mb_llm_workers", ", ".join(_fmt(x) for x in res.get("rss_mb_llm_workers") or []) or None)
    row("rss_mb_per_idle_connection", res.get("rss_mb_per_idle_connection"))

    head = ("figure", "value", "p50", "p95", "n", "goal / met")
    cells = [head] + [(r[0], _fmt(r[1], 3 if isinstance(r[1], float) and abs(r[1]) < 10 else 1), _fmt(r[2]),
                       _fmt(r[3]), _fmt(r[4]), r[5]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = []
    m = res.get("machine", {})
    lines.append(f"local-ai-server benchmark ({'quick' if res.get('quick') else 'full'}) - {m.get('date')}")
    lines.append(f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, Python "
                 f"{m.get('python')}, llama-cpp-python {m.get('llama_cpp_python')}, load avg at start "
                 f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start') or [])}")
    models = m.get("models") or {}
    lines.append("models: " + ", ".join(f"{k}={(val or {}).get('display')}" for k, val in models.items()
                                        if isinstance(val, dict)))
    lines.append("")
    for i, c in enumerate(cells):
        lines.append("  ".join(str(x).ljust(widths[j]) if j == 0 else str(x).rjust(widths[j]) if j < 5
                               else str(x) for j, x in enumerate(c)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    if res.get("errors"):
        lines.append("phases that failed (their figures are missing):")
        for e in res["errors"]:
            lines.append(f"  - {e}")
    lines.append("notes:")
    for n in res.get("notes", []):
        lines.append(f"  - {n}")
    return "\n".join(lines)


def add_notes(res: dict[str, Any]) -> None:
    d = res["details"]
    notes = res["notes"]
    lag = d.get("loop_lag_under_llm", {})
    rlag = d.get("loop_lag_reload", {}).get("lag", {})
    notes.append(
        "loop_lag_p99_ms* come from the server's las_event_loop_lag_seconds histogram (buckets 1, 2, 5, "
        "10, 20, 50 ms ...; one observation per 50 ms): the value is the upper bound of the bucket holding "
        f"the p99, so it is coarse. Under LLM: p99 in ({_fmt(lag.get('lower_ms'))}, "
        f"{_fmt(lag.get('upper_ms'))}] ms, "
        f"interpolated {_fmt(lag.get('interp_ms'), 2)} ms, worst bucket {_fmt(lag.get('max_bucket_ms'))} ms, "
        f"{lag.get('samples')} samples. During reload_llm: p99 in ({_fmt(rlag.get('lower_ms'))}, "
        f"{_fmt(rlag.get('upper_ms'))}] ms, {rlag.get('samples')} samples.")
    notes.append("loop_lag_p99_ms and status_p99_ms_under_llm share one window: the status probe ran while "
                 "long streamed llm_requests ran back to back on another connection.")
    v = d.get("v2fa", {})
    notes.append("v2fa: client clock, from the send of the last 20 ms frame holding speech (Piper audio with "
                 "leading/trailing silence trimmed) to the first binary frame; stt_ms/llm_first_token_ms/"
                 "first_audio_ms are server log figures from its end-of-utterance decision; "
                 "endpoint_delay_ms = client v2fa - server first_audio_ms per paired turn "
                 f"({v.get('endpoint_delay_pairs')} pairs; "
                 "it includes the 500 ms segment silence the server waits for).")
    dr = d.get("decode_rate", {})
    notes.append(f"decode rates: median of {dr.get('pairs')} bare/server pairs, alternating which goes "
                 "first (the ratio is "
                 f"the median of the per-pair ratios), first {dr.get('token_cap')} tokens of the "
                 f"same prompt (temperature 0), n_threads={dr.get('threads')}, GOMP_SPINCOUNT=1000 for both; "
                 "server rate from llm_token arrival times at the client, bare from chunk times in-process.")
    if "skipped" in d.get("stt_sessions", {}):
        notes.append("stt_sessions_realtime_max: skipped in --quick (null).")
    else:
        notes.append("stt_sessions_realtime_max: sessions start staggered over 2 s, each streams "
                     "real-time speech; a level passes when every final arrives <= 1.5 s after the end of "
                     "its speech, no error, and las_audio_frames_dropped_total does not move. The client "
                     "runs on the same cores as the server.")
    ext = d.get("external_load_cores") or {}
    notes.append("the benchmark client (and Piper used to make its speech) run on the same machine as the "
                 "server. Cores used by processes outside this benchmark, per phase (noise; 0 = quiet): "
                 + (", ".join(f"{k} {_fmt(v, 2)}" for k, v in ext.items()) or "n/a") + ".")
    dr_from = dr.get("ratio_from")
    if dr_from:
        notes.append(f"llm_tok_s_* and the ratio are medians over {dr_from}; a pair is clean when other "
                     f"work used < {CLEAN_EXTERNAL_CORES} cores during both of its runs.")


def goal_checks(res: dict[str, Any]) -> None:
    res["goals"] = judge(res)


def json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else (("inf" if x > 0 else "-inf") if math.isinf(x) else x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller samples, no stt-session ramp (~3 min)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--turns", type=int, default=None, help="voice turns for v2fa (min 20, quick min 10)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' log files (path printed)")
    args = p.parse_args(argv)
    plan = make_plan(args.quick, args.turns)
    tmp = Path(tempfile.mkdtemp(prefix="las-bench-"))

    def on_signal(signum: int, _frame: Any) -> None:
        interrupt_children()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    budget = 420 if plan.quick else 1800

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(run_benchmark(plan, tmp), budget)

    res: dict[str, Any] | None = None
    try:
        res = asyncio.run(bounded())
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except asyncio.TimeoutError:
        progress(f"the benchmark did not finish within {budget} s: aborted")
        return 3
    finally:
        stop_all_servers()
        if args.keep_logs:
            progress(f"server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["duration_s"] = round(time.monotonic() - started, 1)
    goal_checks(res)
    add_notes(res)
    print(render_table(res))
    print(f"\n(run took {res['duration_s']} s)")
    out = json_safe({k: res[k] for k in res})
    text = json.dumps(out, separators=(",", ":"))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
