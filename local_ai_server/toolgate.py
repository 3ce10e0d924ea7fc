"""Tool decisions with the LLM: the gate before a spoken answer, and the search of `llm_tool_request`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .engines.llm import SamplingParams
from .tools import (
    Tool,
    ToolCall,
    allowed,
    decision_prompt,
    decision_schema,
    end_of_call_intent,
    first_sentence,
    parse_decision,
    parse_tool_calls,
)

HANGUP = "hangup_call"
_MARKUP_RE = re.compile(r"<tool_call>.{0,20000}?</tool_call>", re.DOTALL)
# Enough for a call with a few short arguments; a decision is JSON, not prose.
DECISION_TOKENS = 96


class Job(Protocol):
    """One generation of the LLM pool."""

    def stream(self) -> Any: ...

    def cancel(self) -> None: ...


class Pool(Protocol):
    """What a tool decision needs of the LLM pool."""

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> Job: ...


@dataclass(frozen=True)
class ToolDecision:
    """The tool calls found for a turn, how (`tool_path`, as AVA names it), and the answer text if any."""

    calls: tuple[ToolCall, ...]
    path: str
    structured_attempts: int = 0
    answer: str = ""


def usable_tools(tools: Sequence[Tool], names: Sequence[str]) -> tuple[Tool, ...]:
    """The tools a call may use: the declared ones narrowed to `names`, and names declared without a schema.

    AVA may allow a tool it sent no schema for; it is still callable, without arguments.
    """
    known = {t.name.lower() for t in tools}
    bare = tuple(Tool(name=n, description="", parameters={"type": "object", "properties": {}})
                 for n in names if n.lower() not in known)
    return (*allowed(tools, names), *bare)


def without_markup(text: str) -> str:
    """An answer's words without the tool calls written into it (what may still be spoken)."""
    words = _MARKUP_RE.sub(" ", text).strip()
    if words.startswith("{") and words.endswith("}"):
        return ""  # nothing but a bare JSON call
    return " ".join(words.split())


def effective_policy(policy: str) -> str:
    """`auto` as this server's capability makes it: grammar-constrained decisions are "compatible"."""
    return "compatible" if policy == "auto" else policy


async def generate(pool: Pool, messages: list[tuple[str, str]], sampling: SamplingParams) -> str:
    """The whole answer to `messages`, not streamed anywhere; cancelling stops the worker's generation."""
    job = pool.submit(messages, sampling)
    parts: list[str] = []
    try:
        async with contextlib.aclosing(job.stream()) as stream:
            async for delta in stream:
                parts.append(delta)
    except asyncio.CancelledError:
        job.cancel()
        raise
    return "".join(parts).strip()


async def decide(pool: Pool, messages: list[tuple[str, str]], tools: Sequence[Tool], sampling: SamplingParams,
                 *, required: bool = False) -> ToolCall | str:
    """Ask the model for one decision, held by a grammar to a declared tool or an answer."""
    schema = decision_schema(tools)
    if required:
        schema = {"anyOf": schema["anyOf"][:1]}  # tool_choice "required": no answer alternative
    chat = list(messages)
    if chat and chat[0][0] == "system":
        chat[0] = ("system", f"{chat[0][1]}\n\n{decision_prompt(tools)}")
    else:
        chat.insert(0, ("system", decision_prompt(tools)))
    held = dataclasses.replace(sampling, json_schema=json.dumps(schema), max_tokens=DECISION_TOKENS,
                               temperature=min(sampling.temperature, 0.2))
    return parse_decision(await generate(pool, chat, held), tools)


def hangup_call(farewell_source: str) -> ToolCall:
    """`hangup_call` with the first sentence of an answer as its farewell (AVA's heuristic)."""
    return ToolCall(HANGUP, {"farewell_message": first_sentence(farewell_source)})


async def find_tool_calls(pool: Pool, sampling: SamplingParams, *, text: str, latest_user_text: str,
                          tools: Sequence[Tool], policy: str, choice: str,
                          messages: list[tuple[str, str]]) -> ToolDecision:
    """`llm_tool_request`: calls written in `text`, else the hangup heuristic, else a structured decision."""
    if choice == "none" or not tools:
        return ToolDecision((), "none")
    names = [t.name for t in tools]
    ending = end_of_call_intent(latest_user_text)
    calls = [c for c in parse_tool_calls(text, names) if c.name != HANGUP or ending]
    if calls:
        return ToolDecision(tuple(calls), "parser", answer=without_markup(text))
    if HANGUP in names and ending:
        return ToolDecision((hangup_call(text),), "heuristic")
    if effective_policy(policy) == "off" or not (latest_user_text.strip() or text.strip()):
        return ToolDecision((), "none")
    # A hangup is decided by the caller's words above, never by the small model's guess.
    candidates = [t for t in tools if t.name != HANGUP]
    if not candidates:
        return ToolDecision((), "none")
    decision = await decide(pool, messages, candidates, sampling, required=choice == "required")
    if isinstance(decision, ToolCall):
        return ToolDecision((decision,), "structured", 1)
    return ToolDecision((), "none", 1)


async def gate(pool: Pool, sampling: SamplingParams, *, user_text: str, tools: Sequence[Tool], policy: str,
               messages: list[tuple[str, str]]) -> ToolDecision | None:
    """Before a spoken answer, as AVA's server does: the tool call to make instead of speaking, or None.

    An end of call with `hangup_call` allowed: the answer is written (not spoken) and its first sentence
    becomes the farewell. Other tools, unless the policy is off: one structured decision first.
    """
    names = {t.name for t in tools}
    if HANGUP in names and end_of_call_intent(user_text):
        answer = await generate(pool, messages, sampling)
        return ToolDecision((hangup_call(answer),), "heuristic", answer=answer)
    candidates = [t for t in tools if t.name != HANGUP]
    if effective_policy(policy) == "off" or not candidates:
        return None
    decision = await decide(pool, messages, candidates, sampling)
    if isinstance(decision, ToolCall):
        return ToolDecision((decision,), "structured", 1)
    return None
