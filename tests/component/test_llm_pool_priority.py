"""Critical path first on the real pool: the embedded GGUF in one real worker process.

A new answer overtakes another call's tail that is already running on the single worker; the tail,
paused between two tokens (its KV cache and sampler parked), then finishes with exactly the text it
produces alone at temperature 0.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from local_ai_server.engines.llm import SamplingParams
from local_ai_server.llm_pool import LlmPool
from local_ai_server.priority import BACKGROUND, HELD

from .test_llm_pool import (
    BOUND_S,
    PoolFactory,
    collect,
    drain,
    first_deltas,
    make_pool,  # noqa: F401 - the fixture
    model_path,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.timeout(300)

SYSTEM = ("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
TAIL = [SYSTEM, ("user", "Tell me a long story about a dragon who learns to bake bread.")]
# repeat_penalty > 1: the sampler keeps a history of the answer's tokens, which must travel with it.
TAIL_SAMPLING = SamplingParams(max_tokens=96, temperature=0.0, top_p=0.9, repeat_penalty=1.1)
URGENT = [SYSTEM, ("user", "What is the capital of France?")]
URGENT_SAMPLING = SamplingParams(max_tokens=24, temperature=0.0, top_p=0.9, repeat_penalty=1.1)
# No time limit (infer_timeout_s=0): on a shared machine a paused tail may take long; limits are tested elsewhere.


async def answer_alone(pool: LlmPool) -> str:
    """The tail's answer with the worker to itself, its prompt already cached as it is for the tail below
    (a prompt decoded afresh in one batch may differ from a cached one in the last bits of its logits)."""
    await collect(pool.submit(TAIL, TAIL_SAMPLING))
    return "".join(await collect(pool.submit(TAIL, TAIL_SAMPLING)))


async def test_a_new_answer_overtakes_a_running_tail_which_then_ends_as_it_would_alone(
        make_pool: PoolFactory) -> None:  # noqa: F811
    events: list[tuple[str, dict[str, Any]]] = []
    pool = await make_pool(on_event=lambda name, data: events.append((name, data)), infer_timeout_s=0)
    alone = await answer_alone(pool)
    assert len(alone) > 200  # a long tail: the overtaking happens well inside it

    tail = pool.submit(TAIL, TAIL_SAMPLING)
    stream = tail.stream()
    got = await first_deltas(stream, 3)
    tail.set_priority(BACKGROUND)  # its first sentence is out
    urgent = pool.submit(URGENT, URGENT_SAMPLING)
    assert urgent.state == "running" and urgent.worker is tail.worker  # it did not queue behind the tail
    answer = "".join(await collect(urgent))
    assert answer.strip() and urgent.stats["outcome"] == "completed"
    assert tail.state == "running" and tail.tokens < TAIL_SAMPLING.max_tokens  # paused, not finished
    rest = "".join(await drain(stream))
    assert "".join(got) + rest == alone  # resumed on its own KV cache and sampler
    assert tail.stats["outcome"] == "completed" and tail.stats["switches"] >= 1
    ends = [data["tokens"] for name, data in events if name == "generation"]
    assert ends[2:] == [urgent.tokens, tail.tokens]  # the newcomer ended first
    print(f"\nswitch cost: {tail.stats['switch_ms']} ms over {tail.stats['switches']} pause(s) "
          f"of a {tail.stats.get('prompt_tokens')}-token prompt")


async def test_a_held_tail_resumes_and_still_ends_as_it_would_alone(make_pool: PoolFactory) -> None:  # noqa: F811
    pool = await make_pool(infer_timeout_s=0)
    alone = await answer_alone(pool)
    tail = pool.submit(TAIL, TAIL_SAMPLING)
    stream = tail.stream()
    got = await first_deltas(stream, 2)
    tail.set_priority(HELD)  # paced: far enough ahead of its playback
    # Other calls' answers run meanwhile and overwrite the context the tail left.
    for _ in range(2):
        assert "".join(await collect(pool.submit(URGENT, URGENT_SAMPLING))).strip()
    assert tail.state == "running"
    tail.set_priority(BACKGROUND)
    rest = "".join(await asyncio.wait_for(drain(stream), BOUND_S))
    assert "".join(got) + rest == alone
