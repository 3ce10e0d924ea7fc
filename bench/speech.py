"""The caller's side: a timing WebSocket client, a real-time line streamer, speech made by the installed voice."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workload import FRAME_MS, RATE  # noqa: E402


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
    """Sends a continuous real-time 20 ms PCM16 stream: queued speech, otherwise line noise.

    Frames go out as binary WebSocket frames (AVA), or through `send` (another wire, such as Realtime's
    base64 JSON events) at `rate` (the audio given to `say` is at that rate).
    """

    def __init__(self, client: Client, seed: int = 0, *, rate: int = RATE,
                 send: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        from local_ai_server.audio import float32_to_pcm16

        self._pcm16 = float32_to_pcm16
        self.client = client
        self.rate = rate
        self._frame_samples = rate * FRAME_MS // 1000
        self._send = send if send is not None else client.ws.send
        self._queue: collections.deque[tuple[bytes, asyncio.Future[float] | None]] = collections.deque()
        self._silence = float32_to_pcm16(noise(self._frame_samples, seed))
        self._task: asyncio.Task[None] | None = None
        self._stop = False
        self.frames_sent = 0
        self.max_late_s = 0.0
        self.late_frames = 0  # sent more than 40 ms after their slot

    def say(self, audio: np.ndarray, lead_s: float = 0.3) -> asyncio.Future[float]:
        """Queue `lead_s` of line noise, then `audio`; resolves to the send time of its last frame."""
        x = np.concatenate([noise(int(lead_s * self.rate), len(self._queue) + 1), audio.astype(np.float32)])
        pad = (-len(x)) % self._frame_samples
        if pad:
            x = np.concatenate([x, noise(pad, 7)])
        data = self._pcm16(x)
        step = self._frame_samples * 2
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
                await self._send(frame)
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
