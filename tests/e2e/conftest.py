"""End-to-end fixtures: the real server (local_ai_server.harness) with the real models, a real client."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from local_ai_server.audio import float32_to_pcm16, resample
from local_ai_server.harness import ServerProc, free_port, pid_exists, start_server
from local_ai_server.setup.selection import default_models_dir, read_selection
from tests.paths import REPO

ROOT = REPO
__all__ = ["ROOT", "ServerProc", "free_port", "pid_exists", "start_server"]  # re-exported for the e2e tests


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The installed models; the suite needs them (./install.sh or scripts/test.sh fetches them)."""
    d = default_models_dir()
    if read_selection(d) is None:
        pytest.fail(f"no models installed in {d}: run ./install.sh (scripts/test.sh does) before the tests")
    return d


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
