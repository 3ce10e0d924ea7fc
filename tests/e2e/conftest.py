"""End-to-end fixtures: the real server as a subprocess on a free port, real models, a real client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from local_ai_server.audio import float32_to_pcm16, resample
from local_ai_server.setup.selection import default_models_dir, read_selection

ROOT = Path(__file__).resolve().parents[2]


def pid_exists(pid: int) -> bool:
    """True while `pid` exists, zombies included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The installed models; the suite needs them (./install.sh or scripts/test.sh fetches them)."""
    d = default_models_dir()
    if read_selection(d) is None:
        pytest.fail(f"no models installed in {d}: run ./install.sh (scripts/test.sh does) before the tests")
    return d


@dataclass
class ServerProc:
    """A running server subprocess and how to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    token: str | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def http(self, path: str) -> tuple[int, bytes]:
        """GET a path on the server's HTTP side: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def metric(self, name: str, labels: str = "") -> float:
        """Read one sample from /metrics (0 if absent)."""
        _, body = self.http("/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """The server's JSON log lines."""
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early ({self.proc.returncode}):\n{self.logs()[-3000:]}")
            try:
                status, _ = self.http("/ready")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.logs()[-3000:]}")

    def wait_settled(self, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        """Wait until model loading is over (whatever its outcome): the /ready (status, body) then."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.http("/ready")
            ready = json.loads(body)
            if ready["status"] != "warming_up" or time.monotonic() > deadline:
                return status, ready
            time.sleep(0.1)

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early ({self.proc.returncode}):\n{self.logs()[-3000:]}")
            try:
                self.http("/health")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server port never opened")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_server(tmp: Path, models_dir: Path | None, *, env: dict[str, str] | None = None,
                 wait: str = "ready") -> ServerProc:
    """Start `python -m local_ai_server` on a free port with JSON logs to a file."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_")}
    full_env.update({
        "LOCAL_WS_PORT": str(port),
        "LOCAL_LOG_JSON": "1",
        "LOCAL_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    })
    if models_dir is not None:
        full_env["LOCAL_MODELS_DIR"] = str(models_dir)
    full_env.update(env or {})
    log_path = tmp / f"server-{port}.log"
    fh = open(log_path, "wb")  # noqa: SIM115 - owned by the child process for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "local_ai_server"], cwd=str(ROOT), env=full_env,
                            stdout=fh, stderr=subprocess.STDOUT)
    server = ServerProc(proc=proc, port=port, log_path=log_path, token=full_env.get("LOCAL_WS_AUTH_TOKEN"))
    if wait == "ready":
        server.wait_ready()
    elif wait == "listening":
        server.wait_listening()
    return server


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One real server with the embedded models, shared by a test module."""
    srv = start_server(tmp_path_factory.mktemp("srv"), models_dir)
    yield srv
    code = srv.stop()
    assert code == 0, f"server exit code {code}\n{srv.logs()[-2000:]}"


# ---------------------------------------------------------------------- speech


@pytest.fixture(scope="session")
def speak(models_dir: Path) -> Callable[[str], np.ndarray]:
    """Synthesize a sentence with Piper (the embedded voice) as 16 kHz float32: the test's caller."""
    from local_ai_server.engines.tts import PiperTts

    sel = read_selection(models_dir)
    assert sel is not None
    tts = PiperTts(sel.path("tts"), threads=1, variation=False)  # the same audio every run
    cache: dict[str, np.ndarray] = {}

    def _speak(text: str) -> np.ndarray:
        if text not in cache:
            cache[text] = resample(tts.synthesize_all(text), tts.sample_rate, 16000)
        return cache[text]

    return _speak


def pcm16(x: np.ndarray) -> bytes:
    """float32 -> PCM16LE bytes."""
    return float32_to_pcm16(x)


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    """Digital silence with a whisper of noise (real lines are never all zeros)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(int(seconds * rate)) * 1e-4).astype(np.float32)


# ---------------------------------------------------------------------- client


@dataclass
class Received:
    """Everything a client got, in order: ('json', dict) or ('binary', bytes)."""

    items: list[tuple[str, Any]] = field(default_factory=list)

    def json(self, mtype: str | None = None) -> list[dict[str, Any]]:
        return [v for k, v in self.items if k == "json" and (mtype is None or v.get("type") == mtype)]

    def binaries(self) -> list[bytes]:
        return [v for k, v in self.items if k == "binary"]


class Client:
    """A websockets client that records every frame it receives in a background task."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.got = Received()
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())
        self.closed_code: int | None = None

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    self.got.items.append(("binary", frame))
                else:
                    self.got.items.append(("json", json.loads(frame)))
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_code = self.ws.close_code
            self._new.set()

    async def send(self, msg: dict[str, Any] | bytes | str) -> None:
        await self.ws.send(msg if isinstance(msg, (bytes, str)) else json.dumps(msg))

    async def wait_for(self, pred: Callable[[dict[str, Any]], Any], timeout: float = 60) -> dict[str, Any]:
        """The first received JSON message (old or new) matching `pred`."""
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while True:
            items = self.got.items
            for kind, value in items[seen:]:
                if kind == "json" and pred(value):
                    return value
            seen = len(items)
            if self._reader.done():
                raise AssertionError(f"connection closed ({self.closed_code}) before the expected message;"
                                     f" got {[v.get('type') for v in self.got.json()]}")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; got {[v.get('type') for v in self.got.json()]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_type(self, mtype: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        return await self.wait_for(lambda m: m.get("type") == mtype and all(m.get(k) == v for k, v in
                                                                             fields.items()), timeout)

    async def request(self, msg: dict[str, Any], reply_type: str, timeout: float = 60) -> dict[str, Any]:
        start = len(self.got.items)
        await self.send(msg)
        return await self.wait_for(lambda m: m.get("type") == reply_type and m in
                                   [v for k, v in self.got.items[start:] if k == "json"], timeout)

    async def stream(self, audio: np.ndarray, *, frame_ms: int = 20, rate: int = 16000, as_json: bool = False,
                     realtime: bool = True, extra: dict[str, Any] | None = None) -> None:
        """Send audio in frames at real-time pace (binary PCM16 or JSON base64)."""
        step = int(rate * frame_ms / 1000)
        data = pcm16(audio)
        t0 = asyncio.get_running_loop().time()
        for i, start in enumerate(range(0, len(audio), step)):
            chunk = data[start * 2:(start + step) * 2]
            if as_json:
                await self.send({"type": "audio", "data": base64.b64encode(chunk).decode(), "rate": rate,
                                 "format": "pcm16le", **(extra or {})})
            else:
                await self.send(chunk)
            if realtime:
                target = t0 + (i + 1) * frame_ms / 1000
                delay = target - asyncio.get_running_loop().time()
                if delay > 0:
                    await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.closed_code is None:
            try:
                await self.ws.close()
            except Exception:  # noqa: BLE001 - the server may already have dropped the transport
                pass
        await asyncio.gather(self._reader, return_exceptions=True)


async def connect(server: ServerProc, *, auth: bool = True) -> Client:
    """Open a client; authenticate when the server has a token and `auth` is set."""
    ws = await websockets.connect(server.url, max_size=None, ping_interval=None)
    client = Client(ws)
    if server.token and auth:
        reply = await client.request({"type": "auth", "auth_token": server.token}, "auth_response")
        assert reply["status"] == "ok"
    return client


@pytest.fixture
async def client_factory(server: ServerProc) -> AsyncIterator[Callable[..., Any]]:
    """Open clients against the module's server; all closed at the end."""
    clients: list[Client] = []

    async def make(**kw: Any) -> Client:
        c = await connect(server, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()
