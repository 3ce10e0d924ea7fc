"""A worker loads its model at low priority and serves at the server's: a reload takes only spare CPU.

The pool's real processes and pipes with the scripted engine (tests/unit/fake_llm.py), which reports the
nice value of the thread that loaded it and of the one that serves (on Linux, where the suite runs, a
thread's nice value is its own).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from local_ai_server.engines.llm import LlmParams, SamplingParams
from local_ai_server.llm_pool import LlmPool
from local_ai_server.llm_worker import LOAD_NICE

from .fake_llm import FakeEngineFactory, script

pytestmark = pytest.mark.timeout(60)
PARAMS = LlmParams(context=64, threads=1, batch=8, gpu_layers=0)
SAMPLING = SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, repeat_penalty=1.0)


async def test_a_worker_loads_its_model_nicer_than_it_serves(tmp_path: Path) -> None:
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"")
    pool = LlmPool(model, PARAMS, engine_factory=FakeEngineFactory())
    try:
        await asyncio.wait_for(pool.start(), 20)
        base = os.getpriority(os.PRIO_PROCESS, 0)  # the workers inherit the server's
        assert pool.info["load_nice"] == min(19, base + LOAD_NICE)
        # A reload's new worker too; the answers come from a thread at the server's priority.
        await asyncio.wait_for(pool.load(model), 20)
        assert pool.info["load_nice"] == min(19, base + LOAD_NICE)
        job = pool.submit(script(["@nice"]), SAMPLING)
        answer = await asyncio.wait_for(_text(job.stream()), 20)
        assert answer == str(base)
    finally:
        await pool.close()


async def _text(stream: AsyncGenerator[str, None]) -> str:
    return "".join([d async for d in stream])
