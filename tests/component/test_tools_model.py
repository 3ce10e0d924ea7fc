"""Tool decisions by the real embedded model: constrained by the decision grammar, always within the schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest

from local_ai_server.setup.selection import default_models_dir
from local_ai_server.tools import Tool, ToolCall, decision_prompt, decision_schema, parse_decision
from tests.unit.test_tools import HANGUP, TRANSFER, arguments_schema, tools_of

MODEL = default_models_dir() / "llm" / "SmolLM2-135M-Instruct.Q4_1.gguf"




@pytest.fixture(scope="module")
def llm() -> Iterator[llama_cpp.Llama]:
    if not MODEL.is_file():
        pytest.fail(f"{MODEL.name} is not installed: run ./install.sh")
    model = llama_cpp.Llama(model_path=str(MODEL), n_ctx=1024, n_threads=4, verbose=False)
    yield model
    model.close()


def check_decision_json(obj: Any, tools: tuple[Tool, ...]) -> None:
    """The decision follows decision_schema: one declared call with declared arguments, or a short answer."""
    assert isinstance(obj, dict)
    if "answer" in obj:
        assert set(obj) == {"answer"} and isinstance(obj["answer"], str) and len(obj["answer"]) <= 400
        return
    assert set(obj) == {"tool_call"} and set(obj["tool_call"]) == {"name", "arguments"}
    call = obj["tool_call"]
    args = arguments_schema(decision_schema(tools), call["name"])
    assert set(call["arguments"]) <= set(args["properties"])
    assert set(args.get("required", ())) <= set(call["arguments"])
    for key, value in call["arguments"].items():
        spec = args["properties"][key]
        if "enum" in spec:
            assert value in spec["enum"]


@pytest.mark.parametrize("user", ["Please hang up now, goodbye.", "Transfer me to sales please.",
                                  "What time do you open tomorrow?"])
def test_the_real_model_decides_within_the_schema(llm: llama_cpp.Llama, user: str) -> None:
    tools = tools_of(HANGUP, TRANSFER)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(decision_schema(tools)), verbose=False)
    out: Any = llm.create_chat_completion(
        messages=[{"role": "system", "content": "You are a phone assistant.\n" + decision_prompt(tools)},
                  {"role": "user", "content": user}],
        grammar=grammar, max_tokens=96, temperature=0)
    text = out["choices"][0]["message"]["content"]
    check_decision_json(json.loads(text), tools)
    decision = parse_decision(text, tools)
    if isinstance(decision, ToolCall):
        assert decision.name in {t.name for t in tools}
    else:
        assert isinstance(decision, str)
