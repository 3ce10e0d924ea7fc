"""What the model is shown of the tools: the decision's JSON schema, its prompt, and a tool's result."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .tool_decl import Tool

MAX_ANSWER_CHARS = 400  # the decision's spoken alternative; a decision is short, its tokens are capped too
MAX_RESULT_CHARS = 4000  # a tool result as the model sees it: a small model's context is ~1k tokens
MAX_SIMPLE_PROPERTIES = 12
_SCALAR_TYPES = ("string", "number", "integer", "boolean")


def _simple_property(spec: Any) -> dict[str, Any]:
    """A property schema a small model can fill in: a scalar type, a string enum, or else a string."""
    if isinstance(spec, dict):
        enum = spec.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            return {"type": "string", "enum": list(dict.fromkeys(enum))}
        kind = spec.get("type")
        if isinstance(kind, list):
            # ["string", "null"]: the first scalar type; null is never worth the model's tokens.
            kind = next((k for k in kind if k in _SCALAR_TYPES), None)
        if kind in _SCALAR_TYPES:
            return {"type": kind}
    # Objects, arrays and untyped values are asked for as text: nested grammars are slow and a 135M model
    # fills them badly; the tool's own side validates what it receives.
    return {"type": "string"}


def _simple_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's parameters as a flat object schema of at most MAX_SIMPLE_PROPERTIES scalar properties."""
    props = parameters.get("properties")
    kept: dict[str, Any] = {}
    if isinstance(props, dict):
        for name, spec in list(props.items())[:MAX_SIMPLE_PROPERTIES]:
            kept[name] = _simple_property(spec)
    schema: dict[str, Any] = {"type": "object", "properties": kept}
    raw_required = parameters.get("required")
    if isinstance(raw_required, list):
        required = [r for r in dict.fromkeys(r for r in raw_required if isinstance(r, str)) if r in kept]
        if required:
            schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def decision_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON schema of the model's one decision: a call of a declared tool, or an answer to speak."""
    answer = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": MAX_ANSWER_CHARS}},
              "required": ["answer"]}
    if not tools:
        return {"anyOf": [answer]}  # an empty anyOf becomes an empty rule: `{"tool_call": }`, not JSON
    calls = [{"type": "object",
              "properties": {"name": {"const": t.name}, "arguments": _simple_parameters(t.parameters)},
              "required": ["name", "arguments"]} for t in tools]
    call = {"type": "object", "properties": {"tool_call": {"anyOf": calls}}, "required": ["tool_call"]}
    return {"anyOf": [call, answer]}


def _describe_property(name: str, spec: Mapping[str, Any], required: bool) -> str:
    """One argument as the prompt lists it: `destination (one of "sales", "support", required)`."""
    enum = spec.get("enum")
    if isinstance(enum, list):
        kind = "one of " + ", ".join(json.dumps(v) for v in enum[:8]) + (", ..." if len(enum) > 8 else "")
    else:
        kind = str(spec["type"])
    return f"{name} ({kind}{', required' if required else ''})"


def decision_prompt(tools: Sequence[Tool]) -> str:
    """The system-prompt section that lists the tools and asks for a JSON-only decision."""
    lines = ["You can use these tools:"]
    for t in tools:
        params = _simple_parameters(t.parameters)
        required = set(params.get("required", ()))
        args = [_describe_property(n, s, n in required) for n, s in params["properties"].items()]
        # Descriptions are capped here: 32 of 1024 characters would not fit a small model's context.
        description = " ".join(t.description.split())[:160].rstrip(" .") or "no description"
        lines.append(f"- {t.name}: {description}. Arguments: {'; '.join(args) if args else 'none'}.")
    lines.append('Reply with JSON only. To use a tool: {"tool_call": {"name": "<tool name>", "arguments": {...}}}. '
                 'To speak to the caller instead: {"answer": "<what to say>"}.')
    return "\n".join(lines)


def tool_result_prompt(name: str, result: Any, is_error: bool) -> str:
    """The instruction that hands a tool's result to the model for the spoken answer."""
    name = " ".join(str(name).split())[:64] or "tool"
    value = result if isinstance(result, dict) else {"value": result}
    try:
        data = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        data = "{}"  # a circular structure: never sent by a client (JSON cannot express it)
    if len(data) > MAX_RESULT_CHARS:
        data = data[:MAX_RESULT_CHARS] + "\u2026"
    if is_error:
        return f"The tool {name} failed with this result: {data}. Briefly apologize and ask the caller to try again."
    return (f"The tool {name} returned this result: {data}. Now answer the caller using the actual tool values only. "
            "Do not mention JSON, tools, placeholders, or internal fields.")
