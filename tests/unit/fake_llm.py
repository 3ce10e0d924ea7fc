"""A scripted stand-in for the llama.cpp engine: the pool's real processes, pipes and scheduling, no model.

Each request carries its own script as JSON in its last message (see `script`): the tokens to yield, how
slowly, and whether the engine then raises, exits the worker process or hangs. This module is imported
inside the spawned workers, so it imports nothing heavy (no llama_cpp).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_ai_server.engines.llm import LlmParams, SamplingParams


def script(tokens: list[str], *, delay_s: float = 0.0, fail: str | None = None,
           fail_after: int = 0) -> list[tuple[str, str]]:
    """Messages that make a FakeEngine yield `tokens` (`delay_s` before each), then optionally fail.

    `fail`: "raise" (the engine raises), "exit" (the worker process dies), "hang" (the engine stops
    yielding and never reads its cancel), after `fail_after` tokens.
    """
    return [("user", json.dumps({"tokens": tokens, "delay_s": delay_s, "fail": fail, "fail_after": fail_after}))]


class FakeEngine:
    """Plays the script of each request; describes itself like a loaded model.

    Like a real engine it holds the state of one answer at a time (`loaded`): an answer resumed without
    its own state restored (`unpark`) fails, as a real one would go on from another answer's KV cache.
    """

    def __init__(self, path: Path, parks: bool = True) -> None:
        self.path = path
        self.prompt_chars = 0
        self.load_nice = os.getpriority(os.PRIO_PROCESS, 0)  # the loading thread's own (Linux)
        self.parks = parks
        self.loaded: object | None = None

    def can_park(self) -> bool:
        return self.parks

    def park(self) -> object | None:
        return self.loaded

    def unpark(self, state: object | None) -> None:
        self.loaded = state

    def last_usage(self) -> dict[str, int]:
        """The last prompt's size, as a real engine tells its token count: here, its characters."""
        return {"prompt_tokens": self.prompt_chars, "cached_tokens": 0}

    def warm_up(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": "fake", "n_ctx": 64, "pid": os.getpid(), "load_nice": self.load_nice}

    def stream(self, messages: list[tuple[str, str]], sampling: SamplingParams,
               should_stop: Callable[[], bool]) -> Iterator[str]:
        spec = json.loads(messages[-1][1])
        self.prompt_chars = sum(len(content) for _, content in messages)
        mine = self.loaded = object()
        for i, token in enumerate([*spec["tokens"], None]):
            if spec["fail"] is not None and i == spec["fail_after"]:
                if spec["fail"] == "raise":
                    raise RuntimeError("scripted engine failure")
                if spec["fail"] == "exit":
                    os._exit(3)
                time.sleep(3600)  # "hang": killed by the pool
            if token is None:
                return
            if spec["delay_s"]:
                time.sleep(spec["delay_s"])
            if self.loaded is not mine:
                raise RuntimeError("resumed on another answer's state")
            # "@nice": the serving thread's nice value, said as a token.
            yield str(os.getpriority(os.PRIO_PROCESS, 0)) if token == "@nice" else token
            if should_stop():
                return


@dataclass(frozen=True)
class FakeEngineFactory:
    """An engine factory for LlmPool: picklable, so it travels to each spawned worker."""

    load_error: str | None = None  # raised while "loading the model"
    parks: bool = True  # whether its engines can pause an answer for another

    def __call__(self, model_path: Path, params: LlmParams) -> FakeEngine:
        if self.load_error is not None:
            raise RuntimeError(self.load_error)
        return FakeEngine(model_path, self.parks)
