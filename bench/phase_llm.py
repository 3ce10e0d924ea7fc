"""LLM phases: decode rate bare vs through the server, the event loop and status under generation, reloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from procs import _CHILDREN, with_cpu_share  # noqa: E402
from speech import Client  # noqa: E402
from stats import histogram_buckets, histogram_quantile, rnd, summary  # noqa: E402
from workload import BARE_N_CTX, LONG_CONTEXT, LONG_PROMPT, LONG_SYSTEM, PAIR_REST_S, TTS_SENTENCES, T  # noqa: E402

from local_ai_server.harness import ServerProc as Server  # noqa: E402
from local_ai_server.harness import parse_metrics  # noqa: E402
from local_ai_server.threads import thread_env  # noqa: E402


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


def long_request(rid: str, call_id: str, text: str = LONG_PROMPT) -> dict[str, Any]:
    return {"type": "llm_request", "text": text, "context": LONG_CONTEXT, "stream": True,
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


async def server_decode_rate(url: str, cap: int, tag: str, prompt: str = LONG_PROMPT) -> dict[str, Any]:
    """Decode tok/s through the server: llm_token messages, first to last, on an idle server."""
    c = await Client.connect(url)
    try:
        rid = f"rate-{tag}"
        await c.send(long_request(rid, f"rate-{tag}", prompt))
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


async def loop_lag_window(srv: Server, body: Callable[[], Awaitable[T]]) -> tuple[T, dict[str, Any]]:
    """Run `body` between two /metrics scrapes; the loop-lag histogram's p99 over that window.

    Also how many samples went over 5 and over 10 ms: with a few hundred samples, that tells 5 from 10 ms
    where the p99 bucket alone would move with a single slow wake-up.
    """
    before = parse_metrics(await asyncio.to_thread(srv.metrics))
    result = await body()
    after = parse_metrics(await asyncio.to_thread(srv.metrics))
    lag = histogram_quantile(before, after, "las_event_loop_lag_seconds", 0.99)
    was = dict(histogram_buckets(before, "las_event_loop_lag_seconds"))
    now = dict(histogram_buckets(after, "las_event_loop_lag_seconds"))
    total = now.get(float("inf"), 0.0) - was.get(float("inf"), 0.0)
    for bound in (0.005, 0.01):
        lag[f"over_{bound * 1000:g}ms"] = int(total - (now.get(bound, 0.0) - was.get(bound, 0.0)))
    return result, lag


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
