"""A remote LLM behind the same port as the pool: an OpenAI-compatible server (llama-server, vLLM, Ollama...).

Each generation is one streamed chat completion on the `openai` package's AsyncOpenAI, run by a task of
this backend's TaskOwner; cancelling it closes the HTTP stream, so the engine sees the disconnect and stops
generating. A background probe (`watch`) polls `GET {url}/models`: it decides /ready, notices a wrong API
key or model name, and brings the backend back by itself when the engine returns.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import structlog

from .engines.llm import SamplingParams
from .errors import Busy, Cancelled, EngineError, NotReady, ServerError, Timeout, describe
from .llm_sched import EventStream
from .tasks import TaskOwner

log = structlog.get_logger(__name__)

BACKEND = "openai"
# Re-probe after a failure at this pace first, doubling up to the regular interval.
PROBE_BACKOFF_S = 0.25
RETRY_BACKOFF_S = 0.1  # a new request's first retry of a refused connection; doubles, at most 1 s
# A probe that times out finds the engine busy, not gone (llama-cpp-python's server answers GET /models only
# between generations, so another instance's answers hold it): it stays ready while answers still come from
# it, or for this many slow probes in a row.
SLOW_PROBES_DOWN = 3
RETRY_STATUS = (502, 503, 504)  # a proxy or an engine still loading: worth another try before the first token


@dataclass(eq=False)
class RemoteJob(EventStream):
    """One streamed chat completion: queued for a slot, then streaming, then finished."""

    id: int
    messages: list[tuple[str, str]]
    sampling: SamplingParams
    backend: RemoteLlm
    events: asyncio.Queue[tuple[str, Any]]
    state: str = "queued"  # queued | running | finished
    cancel_requested: bool = False
    tokens: int = 0
    last_tokens: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


    def cancel(self) -> None:
        """Stop this job: its task ends, and with it the HTTP stream (the engine stops generating)."""
        self.backend._cancel(self)


def _note_usage(stats: dict[str, Any], usage: Any) -> None:
    """The engine's own counts (stream_options.include_usage), where it sends them: they beat our chunk count."""
    if usage.completion_tokens:
        stats["usage_tokens"] = usage.completion_tokens
    if isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0:
        stats["prompt_tokens"] = usage.prompt_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        if isinstance(cached, int):
            stats["cached_tokens"] = cached


class RemoteLlm:
    """The `Llm` port on an OpenAI-compatible server: bounded concurrency and queue, timeouts, health."""

    backend = BACKEND

    def __init__(
        self,
        url: str,
        api_key: str | None,
        model: str | None,
        *,
        concurrency: int = 4,
        max_queue: int = 16,
        first_token_timeout_s: float = 10.0,
        infer_timeout_s: float = 60.0,
        probe_interval_s: float = 5.0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.served_model: str | None = model
        self.model_path: Path | None = None  # no local file: runtime and status read this of any backend
        self.state: str = "loading"
        self.error: str | None = None
        self.concurrency = max(1, concurrency)
        self.max_queue = max_queue
        self.first_token_timeout_s = first_token_timeout_s
        self.infer_timeout_s = infer_timeout_s
        self.probe_interval_s = probe_interval_s
        self.info: dict[str, Any] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._on_event = on_event or (lambda _name, _data: None)
        # Retries are ours (before the first token only); the key is held by the client, never logged.
        self._client = openai.AsyncOpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0,
                                          timeout=openai.Timeout(infer_timeout_s or None,
                                                                 connect=min(first_token_timeout_s, 5.0)))
        self._slots = asyncio.Semaphore(self.concurrency)
        self._ids = itertools.count(1)
        self._jobs: set[RemoteJob] = set()
        self._kick = asyncio.Event()  # a request failed: probe now, even while others stream
        self._kicked = False
        self._slow_probes = 0  # probes in a row that timed out with no answer from the engine between them
        self._answers_seen = 0  # first tokens received: the engine works, whatever a slow probe says
        self._answers_at_probe = 0
        self.tasks = TaskOwner("llm-remote")

    # ------------------------------------------------------------------ health

    async def start(self) -> None:
        """The first probe (a wrong key or model name is in the log and /ready at once), then the watch."""
        await self.check()
        self.tasks.spawn(self.watch(), name="llm-remote-probe")

    async def watch(self) -> None:
        """Probe the backend for as long as the server runs: at `probe_interval_s`, sooner after a failure."""
        backoff = PROBE_BACKOFF_S
        while True:
            if self.state == "ready":
                wait, backoff = self.probe_interval_s, PROBE_BACKOFF_S
            else:
                wait, backoff = backoff, min(backoff * 2, self.probe_interval_s)
            try:
                await asyncio.wait_for(self._kick.wait(), wait)
                self._kicked = True
            except TimeoutError:
                pass
            self._kick.clear()
            if self.state == "ready" and any(j.state == "running" for j in self._jobs) and not self._kicked:
                # A stream delivering tokens is proof enough; and llama-cpp-python's server (with its default
                # interrupt_requests) ends a running answer when any other request, GET /models included, comes.
                continue
            self._kicked = False
            await self.check()

    async def check(self) -> None:
        """One probe of `GET {url}/models`: ready, down (unreachable, HTTP errors) or failed (key, model)."""
        where = f"remote backend {self.url}"
        answers, self._answers_at_probe = self._answers_seen - self._answers_at_probe, self._answers_seen
        try:
            page = await self._client.models.list(timeout=min(self.first_token_timeout_s, 5.0))
            ids = [m.id for m in page.data]
        except openai.APITimeoutError:
            # Answers since the last probe prove the engine works: only silence in a row counts.
            self._slow_probes = 0 if answers > 0 else self._slow_probes + 1
            busy = self.state == "ready" and self._slow_probes < SLOW_PROBES_DOWN
            log.warning("llm.remote_probe_slow", url=self.url, in_a_row=self._slow_probes, answers_since=answers,
                        still_ready=busy)
            if not busy:
                self._set("down", f"{where} did not answer GET /models in time ({self._slow_probes} times)")
            return
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            self._set("failed", f"{where} rejected the API key (HTTP {exc.status_code})")
        except openai.APIStatusError as exc:
            self._set("down", f"{where} answered HTTP {exc.status_code} to GET /models")
        except openai.APIConnectionError as exc:
            self._set("down", f"{where} unreachable: {type(exc.__cause__ or exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - garbage from the backend is its state, not our crash
            self._set("down", f"{where} sent an invalid /models answer ({describe(exc)})")
        else:
            if self.model and self.model not in ids:
                served = ", ".join(ids[:5]) or "none"
                self._set("failed", f"{where} does not serve model {self.model!r} (it serves: {served})")
            elif not ids and not self.model:
                self._set("failed", f"{where} lists no model; set LOCAL_LLM_REMOTE_MODEL")
            else:
                self._slow_probes = 0
                self.served_model = self.model or ids[0]
                self.info = {"name": self.served_model, "backend": BACKEND, "url": self.url}
                self._set("ready", None)

    def _set(self, state: str, error: str | None) -> None:
        if (state, error) != (self.state, self.error):
            level = log.info if state == "ready" else log.warning
            level("llm.remote_state", state=state, previous=self.state, error=error, url=self.url)
        self.state, self.error = state, error
        self._emit()

    # ------------------------------------------------------------------ generations

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> RemoteJob:
        """Queue one generation; raises NotReady while the backend is down or misconfigured, Busy when full."""
        if self.state != "ready":
            raise NotReady(f"LLM {self.error or self.state}" if self.error else f"LLM is {self.state}")
        if len(self._jobs) >= self.concurrency + self.max_queue:
            self.counters["busy"] += 1
            raise Busy("the LLM queue is full; try again shortly")
        # Bounded: a stream yields about one chunk a token; a consumer that stops reading cancels the job.
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=sampling.max_tokens + 8)
        job = RemoteJob(id=next(self._ids), messages=messages, sampling=sampling, backend=self, events=events)
        self._jobs.add(job)
        job.task = self.tasks.spawn(self._run(job), name=f"llm-remote-{job.id}")
        self._emit()
        return job

    def _cancel(self, job: RemoteJob) -> None:
        if job.state == "finished" or job.cancel_requested:
            return
        job.cancel_requested = True
        if job.task is not None:
            job.task.cancel()

    async def _run(self, job: RemoteJob) -> None:
        """Wait for a slot, stream the completion into the job's queue, and record how it ended."""
        t0 = time.monotonic()
        outcome, error = "completed", None
        try:
            async with self._slots:
                job.state = "running"
                self._on_event("queue_wait", {"seconds": time.monotonic() - t0})
                self._emit()
                await self._generate(job, t0)
        except asyncio.CancelledError:
            # The job's own cancel (barge-in, disconnect) or the server closing: the stream is closed.
            self._finish(job, "cancelled", Cancelled("cancelled"), t0)
            raise
        except ServerError as exc:
            outcome, error = ("timeout" if isinstance(exc, Timeout) else "error"), exc
        self._finish(job, outcome, error, t0)

    async def _generate(self, job: RemoteJob, t0: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.infer_timeout_s if self.infer_timeout_s > 0 else None
        first_deadline = loop.time() + self.first_token_timeout_s
        phase = "first token"
        try:
            async with asyncio.timeout(min(first_deadline, end) if end else first_deadline) as deadline:
                stream = await self._open(job)
                async with stream:  # leaving it closes the HTTP response: the engine sees the disconnect
                    async for chunk in stream:
                        if chunk.usage is not None:
                            _note_usage(job.stats, chunk.usage)
                        delta = chunk.choices[0].delta.content if chunk.choices else None
                        if not delta:
                            continue
                        if job.tokens == 0:
                            self._answers_seen += 1
                            job.stats["first_token_ms"] = round((time.monotonic() - t0) * 1000, 1)
                            deadline.reschedule(end)
                            phase = "answer"
                        job.tokens += 1  # one chunk a token on the servers we know; usage corrects it
                        await job.events.put(("tok", (delta, 1)))
        except TimeoutError:
            limit = self.first_token_timeout_s if phase == "first token" else self.infer_timeout_s
            raise Timeout(f"the LLM backend gave no {phase} within {limit:g} s") from None
        except ServerError:
            raise
        except openai.APIStatusError as exc:
            self._kick.set()
            raise EngineError(f"LLM backend error (HTTP {exc.status_code})") from None
        except openai.APIConnectionError:
            self._kick.set()  # re-probe now: /ready should say so before the next caller tries
            raise EngineError("LLM backend unreachable") from None
        except Exception as exc:  # noqa: BLE001 - a broken stream, or garbage where JSON chunks belong
            self._kick.set()
            raise EngineError(f"LLM backend stream failed ({describe(exc)})") from None

    async def _open(self, job: RemoteJob) -> Any:
        """Start the streamed completion; a refused connection or a 502-504 is retried with backoff.

        Only before any token (nothing was said yet), and within the first-token deadline around it.
        """
        s = job.sampling
        # llama.cpp's own multiplicative penalty (llama-server, llama-cpp-python accept it; vLLM and Ollama
        # ignore it), sent even at 1.0: llama-cpp-python's server would otherwise apply its own 1.1. OpenAI's
        # additive frequency_penalty is a different curve, so it is not faked with it.
        extra: dict[str, Any] = {"repeat_penalty": s.repeat_penalty}
        kwargs: dict[str, Any] = {}
        if s.json_schema is not None:
            # A tool decision held to the schema: llama-server and llama-cpp-python's json_object + schema.
            kwargs["response_format"] = {"type": "json_object", "schema": json.loads(s.json_schema)}
        chat: Any = [{"role": role, "content": content} for role, content in job.messages]
        backoff = RETRY_BACKOFF_S
        while True:
            try:
                return await self._client.chat.completions.create(
                    model=self.served_model or "default", messages=chat, stream=True, max_tokens=s.max_tokens,
                    temperature=s.temperature, top_p=s.top_p, stream_options={"include_usage": True},
                    extra_body=extra or None, **kwargs)
            except openai.APITimeoutError:
                raise
            except (openai.APIConnectionError, openai.APIStatusError) as exc:
                if isinstance(exc, openai.APIStatusError) and exc.status_code not in RETRY_STATUS:
                    raise
                self.counters["retries"] += 1
                log.info("llm.remote_retry", job=job.id, error=type(exc).__name__, backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _finish(self, job: RemoteJob, outcome: str, error: ServerError | None, t0: float) -> None:
        if job.state == "finished":
            return
        job.state = "finished"
        self._jobs.discard(job)
        tokens = int(job.stats.get("usage_tokens") or job.tokens)
        total = time.monotonic() - t0
        first = job.stats.get("first_token_ms")
        decode_s = total - (first or 0) / 1000
        job.stats.update(outcome=outcome, tokens=tokens, total_ms=round(total * 1000, 1),
                         decode_tok_s=round((tokens - 1) / decode_s, 2) if tokens > 1 and decode_s > 0 else None)
        self.counters[f"generations_{outcome}"] += 1
        # The queue holds max_tokens + 8: full only if the consumer stopped reading, and then it is gone.
        item: tuple[str, Any] = ("done", job.stats) if error is None else ("err", error)
        try:
            job.events.put_nowait(item)
        except asyncio.QueueFull:
            job.events.get_nowait()
            job.events.put_nowait(item)
        if error is not None and outcome != "cancelled":
            log.warning("llm.remote_failed", job=job.id, outcome=outcome, error=error.message)
        self._on_event("generation", {"backend": BACKEND, "tokens": tokens, **job.stats})
        self._emit()

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, Any]:
        """Backend state for status, metrics and guesses (a slot is a "worker")."""
        running = sum(1 for j in self._jobs if j.state == "running")
        return {"workers": self.concurrency if self.state == "ready" else 0, "busy": running,
                "queued": len(self._jobs) - running, "pids": [], "state": self.state, "backend": BACKEND,
                "url": self.url, "model": self.served_model}

    def _emit(self) -> None:
        self._on_event("pool", self.snapshot())

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every generation (closing its stream) and the client."""
        await self.tasks.aclose(timeout)
        await self._client.close()
        self.state = "stopped"
