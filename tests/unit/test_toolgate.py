"""Tool decisions with a fake LLM pool: which path finds a call, and that a hangup is never guessed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from local_ai_server import toolgate
from local_ai_server.engines.llm import SamplingParams
from local_ai_server.tools import Tool, ToolCall

SAMPLING = SamplingParams(max_tokens=64, temperature=0.4, top_p=0.9, repeat_penalty=1.1)
HANGUP = Tool("hangup_call", "End the call.",
              {"type": "object", "properties": {"farewell_message": {"type": "string"}}})
TRANSFER = Tool("transfer_call", "Transfer the call.",
                {"type": "object", "properties": {"destination": {"type": "string"}}})


class FakeJob:
    def __init__(self, text: str) -> None:
        self.text = text
        self.cancelled = False

    async def stream(self) -> AsyncIterator[str]:
        for word in self.text.split(" "):
            yield word + " "

    def cancel(self) -> None:
        self.cancelled = True


class FakePool:
    """Answers every request with the next canned text; records what it was asked."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[list[tuple[str, str]], SamplingParams]] = []

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> FakeJob:
        self.asked.append((messages, sampling))
        return FakeJob(self.answers.pop(0))


async def _find(pool: FakePool, **kw: Any) -> toolgate.ToolDecision:
    args: dict[str, Any] = {"text": "", "latest_user_text": "", "tools": (HANGUP, TRANSFER), "policy": "auto",
                            "choice": "auto", "messages": [("system", "be brief"), ("user", "hi")]}
    args.update(kw)
    return await toolgate.find_tool_calls(pool, SAMPLING, **args)


async def test_a_call_written_in_the_answer_is_parsed_without_the_model() -> None:
    pool = FakePool()
    found = await _find(pool, text='OK. <tool_call>{"name": "transfer_call", "arguments": {"destination": "x"}}'
                                   '</tool_call>', latest_user_text="sales please")
    assert found.path == "parser" and found.calls == (ToolCall("transfer_call", {"destination": "x"}),)
    assert found.answer == "OK." and not pool.asked


async def test_the_hangup_heuristic_needs_the_callers_words() -> None:
    found = await _find(FakePool(), text="You're welcome. Bye now.", latest_user_text="thanks, goodbye")
    assert found.path == "heuristic" and found.calls[0].parameters == {"farewell_message": "You're welcome."}
    # A written hangup without the caller ending the call is dropped, and the model never decides one.
    pool = FakePool('{"answer": "Sure."}')
    found = await _find(pool, text='{"name": "hangup_call", "arguments": {}}', latest_user_text="what time is it")
    assert found.calls == () and found.path == "none"
    schema = json.loads(pool.asked[0][1].json_schema or "{}")
    assert "hangup_call" not in json.dumps(schema) and "transfer_call" in json.dumps(schema)


async def test_a_structured_decision_is_held_by_the_schema_and_parsed() -> None:
    pool = FakePool('{"tool_call": {"name": "transfer_call", "arguments": {"destination": "sales"}}}')
    found = await _find(pool, latest_user_text="put me through to sales")
    assert found.path == "structured" and found.structured_attempts == 1
    assert found.calls == (ToolCall("transfer_call", {"destination": "sales"}),)
    messages, sampling = pool.asked[0]
    assert sampling.json_schema is not None and sampling.temperature <= 0.2
    assert messages[0][0] == "system" and "transfer_call" in messages[0][1] and messages[0][1].startswith("be brief")


async def test_policy_off_and_choice_none_never_ask_the_model() -> None:
    pool = FakePool()
    assert (await _find(pool, latest_user_text="sales please", policy="off")).path == "none"
    assert (await _find(pool, latest_user_text="sales please", choice="none")).path == "none"
    assert not pool.asked


async def test_choice_required_leaves_no_answer_alternative() -> None:
    pool = FakePool('{"tool_call": {"name": "transfer_call", "arguments": {"destination": "a"}}}')
    await _find(pool, latest_user_text="hm", choice="required")
    schema = json.loads(pool.asked[0][1].json_schema or "{}")
    assert len(schema["anyOf"]) == 1 and "tool_call" in schema["anyOf"][0]["properties"]


async def test_gate_before_speaking() -> None:
    pool = FakePool("Thanks for calling. Goodbye!")
    gated = await toolgate.gate(pool, SAMPLING, user_text="thank you, bye", tools=(HANGUP,), policy="off",
                                messages=[("user", "thank you, bye")])
    assert gated is not None and gated.path == "heuristic" and gated.answer == "Thanks for calling. Goodbye!"
    assert gated.calls[0].parameters == {"farewell_message": "Thanks for calling."}
    assert await toolgate.gate(FakePool(), SAMPLING, user_text="what is the time", tools=(HANGUP,), policy="auto",
                               messages=[]) is None
    pool2 = FakePool('{"answer": "It is noon."}')
    assert await toolgate.gate(pool2, SAMPLING, user_text="time?", tools=(HANGUP, TRANSFER), policy="auto",
                               messages=[("user", "time?")]) is None
    assert len(pool2.asked) == 1


def test_usable_tools_and_markup() -> None:
    tools = toolgate.usable_tools((TRANSFER,), ("transfer_call", "hangup_call"))
    assert [t.name for t in tools] == ["transfer_call", "hangup_call"]
    assert toolgate.usable_tools((HANGUP, TRANSFER), ()) == (HANGUP, TRANSFER)
    assert toolgate.without_markup('<tool_call>{"name": "x"}</tool_call>') == ""
    assert toolgate.without_markup('{"name": "x", "arguments": {}}') == ""
    assert toolgate.without_markup("Sure, one moment. <tool_call>{}</tool_call>") == "Sure, one moment."
