"""The llama.cpp adapter in-process on the real embedded GGUF: long histories are trimmed, answers leave no memory."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local_ai_server import heap
from local_ai_server.engines.llm import LlamaEngine, LlmParams, SamplingParams
from local_ai_server.setup.selection import default_models_dir, read_selection

SAMPLING = SamplingParams(max_tokens=16, temperature=0.0, top_p=0.9, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    selection = read_selection(default_models_dir())
    if selection is None:
        pytest.fail("no models installed: run ./install.sh (scripts/test.sh does)")
    path: Path = selection.path("llm")
    return LlamaEngine(path, LlmParams(context=512, threads=2, batch=128, gpu_layers=0))


def long_call(exchanges: int) -> list[tuple[str, str]]:
    """A system prompt, `exchanges` long question/answer pairs, and the new question."""
    chat = [("system", "You are a helpful assistant.")]
    for i in range(exchanges):
        chat += [("user", f"Question {i}: " + "tell me about apples and bananas " * 12),
                 ("assistant", f"Answer {i}: " + "apples and bananas are fruit " * 10)]
    return [*chat, ("user", "What is two plus two?")]


def test_a_history_longer_than_the_context_still_gets_an_answer(engine: LlamaEngine) -> None:
    chat = long_call(8)
    assert engine.prompt_tokens(chat) > 512 * 2  # without trimming llama.cpp refuses this prompt
    text = "".join(engine.stream(chat, SAMPLING, lambda: False))
    assert text.strip()


def test_trimming_drops_the_oldest_exchanges_whole(engine: LlamaEngine) -> None:
    chat = long_call(8)
    fitted = engine.fit(chat, SAMPLING)
    kept_from = len(chat) - len(fitted) + 1
    assert fitted[0] == chat[0] and fitted[-1] == chat[-1]  # the system prompt and the new question stay
    assert fitted[1][0] == "user" and fitted[1:] == chat[kept_from:]  # the latest exchanges, whole
    assert engine.prompt_tokens(fitted) <= 512 - SAMPLING.max_tokens
    # No more was dropped than needed: with the exchange before, it would not have fitted.
    assert engine.prompt_tokens(chat[:1] + chat[kept_from - 2:]) > 512 - SAMPLING.max_tokens


def test_a_short_chat_is_left_alone(engine: LlamaEngine) -> None:
    chat = long_call(1)
    assert engine.fit(chat, SAMPLING) == chat


def test_a_single_message_too_long_is_refused_clearly(engine: LlamaEngine) -> None:
    chat = [("user", "apples and bananas " * 400)]
    with pytest.raises(ValueError, match="exceed context window"):
        list(engine.stream(chat, SAMPLING, lambda: False))


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only the collections the code under test runs itself, so garbage it leaves is seen."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_automatic_gc")
def test_answers_leave_no_native_memory_behind(engine: LlamaEngine) -> None:
    # llama-cpp-python's per-answer sampler is a reference cycle holding ~0.6 MB of llama.cpp memory;
    # without the adapter's collection 12 answers keep ~7 MB.
    chat = [("system", "You are a helpful assistant."), ("user", "Can I book a table for two?")]
    "".join(engine.stream(chat, SAMPLING, lambda: False))
    before = heap.in_use_bytes()
    assert before is not None, "needs glibc's mallinfo2"
    for i in range(12):
        "".join(engine.stream([*chat[:1], ("user", f"Question {i}: can I book a table?")], SAMPLING, lambda: False))
    after = heap.in_use_bytes()
    assert after is not None
    assert after - before < 2 * 2**20, f"{(after - before) / 2**20:.1f} MB kept by 12 answers"


def test_a_streamed_answer_tells_its_prompt_tokens_and_what_the_cache_held(engine: LlamaEngine) -> None:
    chat = [("system", "You are a helpful assistant."), ("user", "Name a fruit.")]
    "".join(engine.stream([("user", "Something else entirely, to clear the cache.")], SAMPLING, lambda: False))
    "".join(engine.stream(chat, SAMPLING, lambda: False))
    first = engine.last_usage()
    # llama-cpp-python's own count for the same chat (a non-streamed completion reports usage).
    chat_dicts: Any = [{"role": r, "content": c} for r, c in chat]
    reference = engine._llm.create_chat_completion(messages=chat_dicts, max_tokens=1)["usage"]["prompt_tokens"]
    assert first["prompt_tokens"] == reference > 10
    assert first["cached_tokens"] < first["prompt_tokens"]
    # The same chat with one more exchange: the prefix already in the KV cache is reused, and counted so.
    longer = [*chat, ("assistant", "An apple."), ("user", "And a vegetable?")]
    "".join(engine.stream(longer, SAMPLING, lambda: False))
    second = engine.last_usage()
    assert second["prompt_tokens"] > first["prompt_tokens"]
    assert first["prompt_tokens"] // 2 < second["cached_tokens"] < second["prompt_tokens"]
