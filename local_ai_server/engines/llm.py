"""llama-cpp-python adapter; imported only inside LLM pool worker processes."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Chat templates wrap every message in a few tokens (ChatML: "<|im_start|>user\n" ... "<|im_end|>\n");
# counted high so a trimmed prompt always fits.
TEMPLATE_TOKENS_PER_MESSAGE = 12


@dataclass(frozen=True)
class LlmParams:
    """Per-model load parameters (picklable: sent to worker processes)."""

    context: int
    threads: int
    batch: int
    gpu_layers: int
    # Prefilled at start-up: llama.cpp reuses a matching prompt prefix, so the first caller skips it.
    warmup_system_prompt: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters."""

    max_tokens: int
    temperature: float
    top_p: float
    repeat_penalty: float
    # A JSON schema (as text) the answer must follow, enforced by a llama.cpp grammar: a tool decision is
    # then always valid JSON naming a declared tool, whatever the model.
    json_schema: str | None = None


@dataclass
class ParkedAnswer:
    """An answer's state set aside between two of its tokens (see LlamaEngine.park)."""

    data: Any  # numpy uint8 array: the KV cells of the answer's sequence
    size: int
    n_tokens: int
    input_ids: Any  # numpy array of the tokens in those cells
    sampler: Any  # llama-cpp-python's sampler chain, with its repeat-penalty history and grammar state
    usage: tuple[int, int]


class LlamaEngine:
    """One loaded GGUF model that streams chat completions with the model's own chat template."""

    def __init__(self, model_path: Path, params: LlmParams) -> None:
        if not model_path.is_file():
            raise FileNotFoundError("model file not found")
        self.path = model_path
        self.params = params
        self._grammars: dict[str, Any] = {}
        self._llm = _counting_llama()(
            model_path=str(model_path),
            n_ctx=params.context,
            n_threads=params.threads,
            n_threads_batch=params.threads,
            n_batch=params.batch,
            n_gpu_layers=params.gpu_layers,
            verbose=False,
        )

    def warm_up(self) -> None:
        """Decode a couple of tokens: a broken build (AMX) crashes on decode, not on load."""
        messages = [("user", "Hi")]
        if self.params.warmup_system_prompt:
            messages.insert(0, ("system", self.params.warmup_system_prompt))
        for _ in self.stream(messages, SamplingParams(2, 0.0, 1.0, 1.0), lambda: False):
            pass

    def stream(
        self,
        messages: list[tuple[str, str]],
        sampling: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[str]:
        """Yield text deltas until the answer ends or `should_stop()` turns true."""
        chat: Any = [{"role": role, "content": content} for role, content in self.fit(messages, sampling)]
        chunks = self._llm.create_chat_completion(
            messages=chat,
            stream=True,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repeat_penalty=sampling.repeat_penalty,
            grammar=self._grammar(sampling.json_schema),
        )
        try:
            for chunk in chunks:
                raw: Any = chunk
                delta = raw["choices"][0]["delta"].get("content")
                if delta:
                    yield str(delta)
                if should_stop():
                    break
        finally:
            # Closing the generator stops llama.cpp from decoding further tokens.
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            # llama-cpp-python builds a sampler per answer whose cleanup callback refers back to it: a
            # reference cycle, freed only by a full collection, holding ~0.6 MB of llama.cpp memory. Left
            # to the collector's own pace they piled up by the dozen and fragmented the worker's heap (a
            # soak's worker grew 24 MB in 30 minutes). Cheap once the worker has frozen its start-up
            # objects (gc.freeze): ~0.2 ms.
            gc.collect()

    def can_park(self) -> bool:
        """Whether an answer's state can be set aside mid-answer (not for recurrent or hybrid models)."""
        return not (getattr(self._llm, "_is_recurrent", False) or getattr(self._llm, "_is_hybrid", False))

    def park(self) -> ParkedAnswer:
        """Copy out the state of the answer being generated: its sequence's KV cache, tokens and sampler.

        Only the KV cells of sequence 0 are copied (llama_state_seq_get_data), not the whole context
        state with its logits as Llama.save_state does; the paused generator itself stays as it is. It
        stopped right after yielding a token, and it decodes that token first when resumed, so no logits
        need saving.
        """
        import llama_cpp
        import numpy as np

        llm = self._llm
        ctx = llm._ctx.ctx
        size = int(llama_cpp.llama_state_seq_get_size(ctx, 0))
        buf = np.empty(size, dtype=np.uint8)  # not zero-filled first, as a ctypes array would be: one pass less
        n = int(llama_cpp.llama_state_seq_get_data(ctx, _pointer(buf), size, 0))
        if n == 0 and llm.n_tokens > 0:
            raise RuntimeError("could not copy the sequence state")
        return ParkedAnswer(buf, n, llm.n_tokens, llm.input_ids[: llm.n_tokens].copy(), llm._sampler,
                            (llm.prompt_tokens, llm.cached_tokens))

    def unpark(self, state: ParkedAnswer) -> None:
        """Restore an answer parked by `park`, replacing whatever the context holds now."""
        import llama_cpp

        llm = self._llm
        llm._ctx.kv_cache_seq_rm(0, -1, -1)
        if state.size and not llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, _pointer(state.data), state.size, 0):
            llm.n_tokens = 0
            raise RuntimeError("could not restore the sequence state")
        llm.n_tokens = state.n_tokens
        llm.input_ids[: state.n_tokens] = state.input_ids
        llm._sampler = state.sampler
        llm.prompt_tokens, llm.cached_tokens = state.usage
        # A new prompt that matches all of this must still decode before sampling (see Llama.generate).
        llm._requires_eval = True

    def last_usage(self) -> dict[str, int]:
        """The prompt tokens of the last answer streamed, and how many of them llama.cpp reused from its cache."""
        return {"prompt_tokens": self._llm.prompt_tokens, "cached_tokens": self._llm.cached_tokens}

    def _grammar(self, json_schema: str | None) -> Any:
        """The compiled grammar for a schema; a call's tool set repeats every turn, so they are kept (a few)."""
        if json_schema is None:
            return None
        grammar = self._grammars.get(json_schema)
        if grammar is None:
            from llama_cpp import LlamaGrammar

            if len(self._grammars) >= 8:
                self._grammars.pop(next(iter(self._grammars)))
            grammar = self._grammars[json_schema] = LlamaGrammar.from_json_schema(json_schema, verbose=False)
        return grammar

    def prompt_tokens(self, messages: list[tuple[str, str]]) -> int:
        """Tokens the chat will take, counted on its contents plus a generous per-message template cost."""
        return sum(len(self._llm.tokenize(content.encode("utf-8"), add_bos=False, special=False))
                   + TEMPLATE_TOKENS_PER_MESSAGE for _, content in messages)

    def fit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> list[tuple[str, str]]:
        """The chat without its oldest exchanges, as far as needed to leave the answer room in the context.

        llama.cpp refuses a prompt that does not fit; a long call would then fail every turn from there
        on, as its history only grows. The system prompt and the new message are always kept (if those
        alone do not fit, llama.cpp's own error says so).
        """
        n_ctx = self._llm.n_ctx()
        budget = n_ctx - min(sampling.max_tokens, n_ctx // 4)
        chat = list(messages)
        # A token spans at least one byte of text (plus, at most, a tokenizer's leading-space marker), so
        # a chat whose bytes fit needs no tokenizing: most calls, ~1 ms saved before the first token.
        if sum(len(c.encode("utf-8")) + 1 + TEMPLATE_TOKENS_PER_MESSAGE for _, c in chat) <= budget:
            return chat
        costs = [self.prompt_tokens([m]) for m in chat]  # each message tokenized once
        total = sum(costs)
        first = 1 if chat and chat[0][0] == "system" else 0

        def drop() -> None:
            nonlocal total
            total -= costs.pop(first)
            del chat[first]

        while len(chat) - first > 1 and total > budget:
            drop()
            # Never open the history with an answer whose question is gone.
            while len(chat) - first > 1 and chat[first][0] == "assistant":
                drop()
        return chat

    def describe(self) -> dict[str, Any]:
        """What the model is, for status replies."""
        meta = getattr(self._llm, "metadata", {}) or {}
        return {"name": meta.get("general.name") or self.path.stem, "n_ctx": self._llm.n_ctx()}


def _counting_llama() -> Any:
    """llama_cpp.Llama, noting each generation's prompt size and the part of it reused from the KV cache.

    A streamed chat completion reports no usage. Every completion runs `generate(prompt_tokens)`, whose first
    `eval` starts where the reused prefix ends (`n_tokens`: 0 after a reset, the whole prompt when all of it
    was cached), so both counts are exact, read off the calls llama-cpp-python makes anyway.
    """
    from llama_cpp import Llama  # heavy import: only in the worker process

    class CountingLlama(Llama):
        prompt_tokens = 0
        cached_tokens = 0
        _fresh = False  # generate() was called and has not evaluated anything yet

        def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
            self.prompt_tokens, self.cached_tokens, self._fresh = len(tokens), 0, True
            return super().generate(tokens, *args, **kwargs)

        def eval(self, tokens: Any) -> None:
            if self._fresh:
                self._fresh = False
                self.cached_tokens = self.n_tokens
            super().eval(tokens)

    return CountingLlama


def _pointer(buf: Any) -> Any:
    """A numpy uint8 array as the `uint8_t *` llama.cpp's state functions take."""
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
