"""Tool declarations as clients send them: validation and normalisation into Tool, and the shared JSON helpers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeGuard

MAX_TOOLS = 32
MAX_TOOL_SCHEMA_BYTES = 8192
MAX_TOOLS_BYTES = 32768
MAX_DESCRIPTION_CHARS = 1024
POLICIES = ("auto", "strict", "compatible", "off")
MAX_SCAN_CHARS = 20000  # parse_tool_calls / parse_decision look at no more of a text than this

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_NAME_RULE = "a string of 1-64 letters, digits, '_', '.' or '-' starting with a letter or '_'"
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A tool declaration the client sent is invalid; the message is safe to send back (no paths)."""

    def __init__(self, message: str, *, too_large: bool = False, field: str | None = None) -> None:
        super().__init__(message)
        # Protocol maps this to payload_too_large rather than invalid_field.
        self.too_large = too_large
        # The offending field's path (`tools[2].parameters`), for fronts that report it apart from the message.
        self.field = field


@dataclass(frozen=True)
class Tool:
    """A tool the client declared: its name, description and parameters (a JSON-schema object)."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """A call of a declared tool with its arguments."""

    name: str
    parameters: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """The call as `llm_tool_response.tool_calls` carries it."""
        return {"name": self.name, "parameters": dict(self.parameters)}


def _reject_constant(value: str) -> NoReturn:
    """NaN and Infinity are not JSON: a call carrying them could not be sent on to a strict client."""
    raise ValueError(f"not JSON: {value}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text: str) -> Any:
    """Strict JSON (no NaN/Infinity); raises ValueError or RecursionError on anything else."""
    return _DECODER.decode(text)


def _json_size(value: Any) -> int:
    """Bytes of a JSON value as UTF-8 (the caps are on bytes, as the client sent them)."""
    return len(json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8"))


def _valid_name(value: Any) -> TypeGuard[str]:
    """Whether a value is a tool name this server accepts."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------------- declarations


def parse_tools(raw: Any, field: str = "tools") -> tuple[Tool, ...]:
    """Validate a client's tool list (plain or OpenAI form); raises ToolError naming the offending field."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ToolError(f"{field} must be a list", field=field)
    if len(raw) > MAX_TOOLS:
        raise ToolError(f"{field} has {len(raw)} tools; at most {MAX_TOOLS} are allowed", too_large=True, field=field)
    tools: list[Tool] = []
    seen: set[str] = set()
    total = 0
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            item = {"name": item}  # a bare name: a tool without a description or arguments
        if not isinstance(item, dict):
            raise ToolError(f"{where} must be an object or a tool name", field=where)
        spec = item
        if isinstance(item.get("function"), dict) and "name" not in item:
            # OpenAI's form: {"type": "function", "function": {name, description, parameters}}.
            spec = item["function"]
            where = f"{where}.function"
        tool = _parse_tool(spec, where)
        total += _json_size({"name": tool.name, "description": tool.description, "parameters": tool.parameters})
        if total > MAX_TOOLS_BYTES:
            raise ToolError(f"{field} is over {MAX_TOOLS_BYTES} bytes as JSON", too_large=True, field=field)
        # Names match case-insensitively everywhere (allowed_tools, parsed calls): a second spelling is a duplicate.
        if tool.name.lower() not in seen:
            seen.add(tool.name.lower())
            tools.append(tool)
    return tuple(tools)


def _parse_tool(spec: Mapping[str, Any], where: str) -> Tool:
    """One tool declaration's name, description and parameters, validated."""
    name = spec.get("name")
    if not _valid_name(name):
        raise ToolError(f"{where}.name must be {_NAME_RULE}", field=f"{where}.name")
    description = spec.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ToolError(f"{where}.description must be a string", field=f"{where}.description")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ToolError(f"{where}.description is over {MAX_DESCRIPTION_CHARS} characters", too_large=True,
                        field=f"{where}.description")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = _EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise ToolError(f"{where}.parameters must be an object (a JSON schema)", field=f"{where}.parameters")
    try:
        text = json.dumps(parameters, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        raise ToolError(f"{where}.parameters must be JSON", field=f"{where}.parameters") from None
    if len(text.encode("utf-8")) > MAX_TOOL_SCHEMA_BYTES:
        raise ToolError(f"{where}.parameters is over {MAX_TOOL_SCHEMA_BYTES} bytes as JSON", too_large=True,
                        field=f"{where}.parameters")
    # A copy of our own: the client's objects may be mutated later, a Tool is frozen.
    return Tool(name=name, description=description, parameters=json.loads(text))


def parse_names(raw: Any, field: str = "allowed_tools") -> tuple[str, ...]:
    """Validate a list of tool names; duplicates (case-insensitive) keep their first spelling."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ToolError(f"{field} must be a list", field=field)
    if len(raw) > MAX_TOOLS:
        raise ToolError(f"{field} has {len(raw)} names; at most {MAX_TOOLS} are allowed", too_large=True, field=field)
    names: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(raw):
        if not _valid_name(name):
            raise ToolError(f"{field}[{i}] must be {_NAME_RULE}", field=f"{field}[{i}]")
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return tuple(names)


def normalize_policy(raw: Any) -> str:
    """A tool policy as one of POLICIES; an unknown or missing one is "auto"."""
    if isinstance(raw, str):
        policy = raw.strip().lower()
        if policy in POLICIES:
            return policy
    return "auto"


def allowed(tools: Sequence[Tool], names: Sequence[str]) -> tuple[Tool, ...]:
    """The tools whose names are in `names` (case-insensitive); all of them when `names` is empty."""
    if not names:
        return tuple(tools)
    wanted = {n.lower() for n in names}
    return tuple(t for t in tools if t.name.lower() in wanted)

