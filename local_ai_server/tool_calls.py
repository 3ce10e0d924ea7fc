"""The model's tool calls: calls written in free assistant text, and the one decision JSON of the tool gate."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .tool_decl import _DECODER, MAX_SCAN_CHARS, MAX_TOOLS, Tool, ToolCall, _loads

# Each '{' of a text may start a decode; garbage made of braces must not make that quadratic without end.
_MAX_DECODE_ATTEMPTS = 1000
# A tool name written just before a JSON object: `<NAME>{`, `<function=NAME>{`, `*NAME* {`, `NAME: {`, `NAME({`.
# Searched only in the 100 characters before the '{' and anchored at their end, so its work is bounded.
_PREFIX_RE = re.compile(r"(?:<(?:function=)?|\*{1,2}|`)?(?<![A-Za-z0-9_.-])([A-Za-z_][A-Za-z0-9_.-]{0,63})"
                        r"(?:>|\*{1,2}|`)?[ \t]*[:(]?[ \t\r\n]*$")
_PREFIX_WINDOW = 100


def _arguments(value: Any) -> dict[str, Any]:
    """Call arguments: an object, or a JSON string of one (OpenAI's form); anything else is no arguments."""
    if isinstance(value, str):
        try:
            value = _loads(value)
        except (ValueError, RecursionError):
            return {}
    return dict(value) if isinstance(value, dict) else {}


def _call_from_obj(obj: Mapping[str, Any], names: Mapping[str, str], depth: int = 0) -> ToolCall | None:
    """The call an object describes, if it names an allowed tool; `names` maps lower-case to declared names."""
    inner = obj.get("tool_call")
    if isinstance(inner, dict) and depth < 2:
        return _call_from_obj(inner, names, depth + 1)  # our own decision JSON
    function = obj.get("function")
    name: Any = None
    args: Any = None
    if isinstance(function, dict):
        # OpenAI: {"type": "function", "function": {"name", "arguments": "<json>"}}.
        name, args = function.get("name"), function.get("arguments", function.get("parameters"))
    elif any(isinstance(obj.get(k), str) for k in ("name", "function", "tool", "tool_name")):
        name = next(obj[k] for k in ("name", "function", "tool", "tool_name") if isinstance(obj.get(k), str))
        if "description" in obj and "arguments" not in obj:
            return None  # the model echoing a declaration, not calling it
        args = obj.get("arguments", obj.get("parameters", obj.get("args")))
    elif len(obj) == 1:
        # {"NAME": {arguments}}
        name, args = next(iter(obj.items()))
        if not (args is None or isinstance(args, (dict, str))):
            return None
    declared = names.get(name.lower()) if isinstance(name, str) else None
    if declared is None:
        return None
    return ToolCall(declared, _arguments(args))


def _prefix_name(text: str, start: int, names: Mapping[str, str]) -> str | None:
    """The allowed tool named just before the JSON object at `start` (`<NAME>{`, `*NAME* {`, `NAME {`)."""
    m = _PREFIX_RE.search(text, max(0, start - _PREFIX_WINDOW), start)
    return names.get(m.group(1).lower()) if m else None


def parse_tool_calls(text: str, allowed_names: Collection[str]) -> list[ToolCall]:
    """The calls of allowed tools written in assistant text, in order, each once; never raises."""
    if not isinstance(text, str) or not allowed_names:
        return []
    names: dict[str, str] = {}
    for n in allowed_names:
        if isinstance(n, str):
            names.setdefault(n.lower(), n)
    text = text[:MAX_SCAN_CHARS]
    calls: list[ToolCall] = []
    seen: set[tuple[str, str]] = set()
    pos = 0
    for _ in range(_MAX_DECODE_ATTEMPTS):
        start = text.find("{", pos)
        if start < 0 or len(calls) >= MAX_TOOLS:
            break
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            pos = start + 1
            continue
        call = None
        if isinstance(obj, dict):
            prefixed = _prefix_name(text, start, names)
            call = _call_from_obj(obj, names)
            if prefixed is not None and (call is None or call.name != prefixed):
                call = ToolCall(prefixed, dict(obj))  # the object is the arguments of the named tool
        if call is None:
            # Not a call as a whole: a call may still be inside it (OpenAI's {"tool_calls": [...]}).
            pos = start + 1
            continue
        key = (call.name, json.dumps(call.parameters, sort_keys=True, default=str))
        if key not in seen:  # a call written twice (tagged, then repeated) is made once
            seen.add(key)
            calls.append(call)
        pos = end
    return calls



def parse_decision(text: str, tools: Sequence[Tool]) -> ToolCall | str:
    """The model's decision JSON as a call of a declared tool or the answer; "" for anything else."""
    if not isinstance(text, str):
        return ""
    text = text[:MAX_SCAN_CHARS].strip()
    start = text.find("{")
    if start < 0:
        return ""
    try:
        # raw_decode: a model may add text after the object (not under a grammar, or past its end).
        obj, _ = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(obj, dict):
        return ""
    call = obj.get("tool_call")
    if isinstance(call, dict):
        name = call.get("name")
        declared = {t.name.lower(): t.name for t in reversed(tools)}
        found = declared.get(name.lower()) if isinstance(name, str) else None
        return ToolCall(found, _arguments(call.get("arguments"))) if found else ""
    answer = obj.get("answer")
    return answer.strip() if isinstance(answer, str) else ""

