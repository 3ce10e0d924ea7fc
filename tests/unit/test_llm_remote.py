"""The remote LLM backend's logic against a fake HTTP server: states, limits, garbage, and its settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from local_ai_server.config import ConfigError, from_env, validate
from local_ai_server.engines.llm import SamplingParams
from local_ai_server.errors import Busy, Cancelled, EngineError, NotReady
from local_ai_server.llm_remote import RemoteLlm

SAMPLING = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, repeat_penalty=1.0)
MODELS = b'{"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}'
Handler = Callable[[str], tuple[int, bytes, str]]


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Handler], asyncio.Future[str]]]:
    """An HTTP/1.1 server answering each request with handler(path) -> (status, body, content type)."""
    servers: list[asyncio.Server] = []

    def start(handler: Handler) -> asyncio.Future[str]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            status, body, ctype = handler(head.split(" ")[1])
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()

        async def run() -> str:
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            servers.append(server)
            return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

        return asyncio.ensure_future(run())

    yield start
    for server in servers:
        server.close()


async def test_garbage_stream_is_engine_error_and_a_401_fails_the_backend(
        fake: Callable[[Handler], asyncio.Future[str]]) -> None:
    url = await fake(lambda path: (200, MODELS, "application/json") if path.endswith("/models")
                     else (200, b"data: {not json\n\n", "text/event-stream"))
    llm = RemoteLlm(url, "sk-secret", "m", probe_interval_s=60)
    await llm.start()
    assert llm.state == "ready"
    job = llm.submit([("user", "hi")], SAMPLING)
    with pytest.raises(EngineError) as err:
        async for _ in job.stream():
            pass
    assert "sk-secret" not in err.value.message and "/" not in err.value.message
    await llm.close()

    url = await fake(lambda path: (401, b'{"error": "bad key"}', "application/json"))
    llm = RemoteLlm(url, "sk-secret", "m", probe_interval_s=60)
    await llm.start()
    assert llm.state == "failed" and llm.error is not None
    assert "rejected the API key (HTTP 401)" in llm.error and url in llm.error and "sk-secret" not in llm.error
    with pytest.raises(NotReady):
        llm.submit([("user", "hi")], SAMPLING)
    await llm.close()


def sse(*chunks: str) -> bytes:
    return "".join(f"data: {c}\n\n" for c in (*chunks, "[DONE]")).encode()


CHUNK = ('{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", '
         '"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": null}]}')


@pytest.mark.parametrize(("usage", "expected"), [
    ('{"prompt_tokens": 31, "completion_tokens": 3, "total_tokens": 34, '
     '"prompt_tokens_details": {"cached_tokens": 20}}', {"prompt_tokens": 31, "cached_tokens": 20, "tokens": 3}),
    ('{"prompt_tokens": 31, "completion_tokens": 3, "total_tokens": 34}', {"prompt_tokens": 31, "tokens": 3}),
    (None, {"tokens": 2}),  # an engine that sends no usage: our chunk count, and no prompt figure made up
])
async def test_the_engine_s_usage_gives_the_token_counts(fake: Callable[[Handler], asyncio.Future[str]],
                                                       usage: str | None, expected: dict[str, int]) -> None:
    chunks = [CHUNK % "Hel", CHUNK % "lo."]
    if usage is not None:
        chunks.append('{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [], '
                      f'"usage": {usage}}}')
    body = sse(*chunks)
    url = await fake(lambda path: (200, MODELS, "application/json") if path.endswith("/models")
                     else (200, body, "text/event-stream"))
    llm = RemoteLlm(url, None, "m", probe_interval_s=60)
    await llm.start()
    job = llm.submit([("user", "hi")], SAMPLING)
    assert "".join([d async for d in job.stream()]) == "Hello."
    assert {k: job.stats[k] for k in ("prompt_tokens", "cached_tokens", "tokens") if k in job.stats} == expected
    await llm.close()


async def test_unknown_model_and_an_unreachable_backend() -> None:
    llm = RemoteLlm("http://127.0.0.1:9/v1", None, "m", probe_interval_s=60)  # discard port: refused
    await llm.start()
    assert llm.state == "down" and llm.error is not None and "unreachable" in llm.error
    await llm.close()


async def test_queue_bound_and_cancel_of_a_queued_job() -> None:
    waits: list[float] = []
    llm = RemoteLlm("http://127.0.0.1:9/v1", None, "m", concurrency=1, max_queue=1, first_token_timeout_s=30,
                    on_event=lambda name, data: waits.append(data["seconds"]) if name == "queue_wait" else None)
    llm.state = "ready"  # as if probed: the requests themselves retry the refused connection
    running = llm.submit([("user", "a")], SAMPLING)
    queued = llm.submit([("user", "b")], SAMPLING)
    with pytest.raises(Busy):
        llm.submit([("user", "c")], SAMPLING)
    await asyncio.sleep(0.05)
    assert llm.snapshot()["busy"] == 1 and llm.snapshot()["queued"] == 1
    assert len(waits) == 1 and waits[0] >= 0  # the running job got its slot; the queued one waits on
    queued.cancel()
    with pytest.raises(Cancelled):
        async for _ in queued.stream():
            pass
    running.cancel()
    await llm.close()
    assert llm.counters["generations_cancelled"] == 2
    assert len(waits) == 1  # a job cancelled while queued never got a slot


def test_remote_settings_are_validated_and_the_key_is_never_shown(tmp_path: Path) -> None:
    base = {"LOCAL_LLM_BACKEND": "openai"}
    with pytest.raises(ConfigError, match="LOCAL_LLM_REMOTE_URL"):
        validate(from_env(base, models_dir=tmp_path))
    for bad in ("127.0.0.1:8080", "ftp://host/v1", "http://user:pw@host/v1"):
        with pytest.raises(ConfigError):
            validate(from_env({**base, "LOCAL_LLM_REMOTE_URL": bad}, models_dir=tmp_path))
    cfg = from_env({**base, "LOCAL_LLM_REMOTE_URL": "http://h:1/v1", "LOCAL_LLM_REMOTE_API_KEY": "sk-x"},
                   models_dir=tmp_path)
    validate(cfg)
    assert cfg.llm.remote_api_key == "sk-x" and "sk-x" not in repr(cfg)
    with pytest.raises(ConfigError, match="LOCAL_LLM_BACKEND"):
        from_env({"LOCAL_LLM_BACKEND": "vllm"}, models_dir=tmp_path)


async def test_the_repeat_penalty_is_sent_even_at_one() -> None:
    """llama-cpp-python's server applies its own 1.1 when none is sent: 1.0 (no penalty) must travel too."""
    bodies: list[dict[str, object]] = []
    body = sse(CHUNK % "Hi.")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        raw = await reader.readexactly(length)
        models = head.split(" ")[1].endswith("/models")
        if not models:
            bodies.append(json.loads(raw))
        reply, ctype = (MODELS, "application/json") if models else (body, "text/event-stream")
        writer.write(f"HTTP/1.1 200 X\r\ncontent-type: {ctype}\r\ncontent-length: {len(reply)}\r\n"
                     "connection: close\r\n\r\n".encode() + reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    llm = RemoteLlm(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", None, "m", probe_interval_s=60)
    try:
        await llm.start()
        for penalty in (1.0, 1.3):
            job = llm.submit([("user", "hi")], dataclasses.replace(SAMPLING, repeat_penalty=penalty))
            assert "".join([d async for d in job.stream()]) == "Hi."
    finally:
        await llm.close()
        server.close()
    assert [b.get("repeat_penalty") for b in bodies] == [1.0, 1.3]


async def test_a_slow_probe_finds_the_engine_busy_until_it_stays_silent() -> None:
    """GET /models timing out (the engine busy with another instance's answers) keeps the backend ready while
    answers still come from it; three slow probes in a row with no answer mark it down; a fast one recovers."""
    slow = asyncio.Event()
    body = sse(CHUNK % "Hi.")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        await reader.readexactly(length)
        models = head.split(" ")[1].endswith("/models")
        if models and slow.is_set():
            await asyncio.sleep(2)  # past the probe's timeout
        reply, ctype = (MODELS, "application/json") if models else (body, "text/event-stream")
        writer.write(f"HTTP/1.1 200 X\r\ncontent-type: {ctype}\r\ncontent-length: {len(reply)}\r\n"
                     "connection: close\r\n\r\n".encode() + reply)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    llm = RemoteLlm(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", None, "m",
                    first_token_timeout_s=0.3, probe_interval_s=600)
    try:
        await llm.start()
        assert llm.state == "ready"
        slow.set()
        for _ in range(4):  # answers keep coming: busy, not down
            job = llm.submit([("user", "hi")], SAMPLING)
            assert "".join([d async for d in job.stream()]) == "Hi."
            await llm.check()
            assert llm.state == "ready"
        states = []
        for _ in range(3):  # no answer in between
            await llm.check()
            states.append(llm.state)
        assert states == ["ready", "ready", "down"]
        assert llm.error is not None and "did not answer GET /models in time" in llm.error
        slow.clear()
        await llm.check()
        assert llm.state == "ready"
    finally:
        await llm.close()
        server.close()
