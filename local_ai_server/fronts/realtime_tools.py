"""Realtime function calling: `tools` and `tool_choice` checked into the core's Tool declarations, function call
items and their events, and the calls that still await their output (pure, no I/O).

The tools go through the same validation and caps as AVA's tool_context (tool_decl.parse_tools); the decision
itself is the core's (toolgate, grammar-constrained), so what a call's arguments may hold is what AVA's may.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

from ..tool_decl import Tool, ToolError, parse_tools
from ..tool_prompts import tool_result_prompt
from .realtime_fields import Invalid, get_str, short

CHOICES = ("auto", "none", "required")
MAX_CALL_ID_CHARS = 256
MAX_OUTPUT_CHARS = 65536  # as AVA's tool_result.result; the model is shown at most MAX_RESULT_CHARS of it
REMEMBER_CHARS = 300  # a tool's output as the history keeps it: the small model's context is ~1k tokens
KEEP_CALLS = 64  # calls remembered while their output is awaited


@dataclass(frozen=True)
class ToolChoice:
    """`auto`, `none` or `required`; `name` when one function is forced (a `required` call of that tool)."""

    mode: str = "auto"
    name: str | None = None

    def wire(self) -> str | dict[str, Any]:
        """As the session object reports it."""
        return {"type": "function", "name": self.name} if self.name is not None else self.mode


@dataclass(frozen=True)
class FunctionOutput:
    """A `function_call_output` item: the output of a call this session's responses made."""

    event_id: str | None
    call_id: str
    output: str


def parse_realtime_tools(raw: Any, param: str) -> tuple[Tool, ...]:
    """Realtime's tool list (`{"type": "function", name, description, parameters}`) as the core's Tools."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise Invalid("tools must be a list", code="invalid_type", param=param)
    for i, tool in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise Invalid("a tool must be an object", code="invalid_type", param=where)
        kind = tool.get("type", "function")
        if kind != "function":
            raise Invalid(f"tools of type {short(kind)} are not supported; declare functions",
                          code="unsupported_parameter", param=f"{where}.type")
        schema = tool.get("parameters")
        if isinstance(schema, dict) and schema.get("type", "object") != "object":
            raise Invalid("parameters must be a JSON schema of type \"object\"", param=f"{where}.parameters")
    try:
        return parse_tools(raw, field=param)
    except ToolError as err:
        raise Invalid(str(err), param=err.field or param) from None


def parse_tool_choice(raw: Any, param: str) -> ToolChoice:
    """`auto`, `none`, `required` or `{"type": "function", "name": ...}`."""
    if isinstance(raw, str) and raw in CHOICES:
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise Invalid("a function tool_choice needs the function's name", param=f"{param}.name")
        return ToolChoice("required", name)
    if isinstance(raw, dict) and raw.get("type") == "mcp":
        raise Invalid("MCP tools are not supported", code="unsupported_parameter", param=f"{param}.type")
    raise Invalid("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                  param=param)


def check_choice(tools: tuple[Tool, ...], choice: ToolChoice, param: str) -> None:
    """A forced function must be one of the tools declared."""
    if choice.name is not None and choice.name.lower() not in {t.name.lower() for t in tools}:
        raise Invalid(f"tool_choice names the function {short(choice.name)}, which is not among the tools",
                      param=f"{param}.name")


def tools_wire(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The tools as the session object reports them."""
    return [{"type": "function", "name": t.name, "description": t.description, "parameters": dict(t.parameters)}
            for t in tools]


def parse_function_output(eid: str | None, item: dict[str, Any]) -> FunctionOutput:
    """A conversation.item.create of a `function_call_output` item."""
    call_id = get_str(item, "call_id", required=True, param="item.call_id") or ""
    if not call_id or len(call_id) > MAX_CALL_ID_CHARS:
        raise Invalid(f"call_id must be 1 to {MAX_CALL_ID_CHARS} characters", param="item.call_id")
    output = get_str(item, "output", required=True, param="item.output")
    if output is None or len(output) > MAX_OUTPUT_CHARS:
        raise Invalid(f"output longer than {MAX_OUTPUT_CHARS} characters", param="item.output")
    return FunctionOutput(eid, call_id, output)


def forced(tools: tuple[Tool, ...], choice: ToolChoice) -> tuple[tuple[Tool, ...], str]:
    """The tools a decision may pick from, and the core's tool_choice (`auto` or `required`)."""
    if choice.name is None:
        return tools, choice.mode
    return tuple(t for t in tools if t.name.lower() == choice.name.lower()), "required"


# ---------------------------------------------------------------------------------------------- items


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """A function_call item as the response's output carries it."""
    return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def function_output_item(item_id: str, out: FunctionOutput) -> dict[str, Any]:
    """The client's function_call_output item, as added to the conversation."""
    return {"id": item_id, "object": "realtime.item", "type": "function_call_output", "status": "completed",
            "call_id": out.call_id, "output": out.output}


def _result(output: str) -> Any:
    """A function's output as the model is shown it: a JSON object as such, anything else as text."""
    try:
        value = json.loads(output)
    except (ValueError, RecursionError):
        return output
    return value if isinstance(value, dict) else output


class FunctionCalls:
    """The calls made whose output is awaited, and the outputs the next response answers."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[str, str] = collections.OrderedDict()  # call_id -> function name
        self._outputs: list[tuple[str, str, str]] = []  # (item id, function name, output), to answer next

    def made(self, call_id: str, name: str) -> None:
        """A response called `name`; its output may come."""
        self._open[call_id] = name
        while len(self._open) > KEEP_CALLS:
            self._open.popitem(last=False)

    def output(self, out: FunctionOutput, item_id: str = "") -> str:
        """The client's output of a call (its item `item_id`), and the function's name; an unknown (or already
        answered) call_id is refused."""
        name = self._open.pop(out.call_id, None)
        if name is None:
            raise Invalid(f"no function call {short(out.call_id)} awaits an output", param="item.call_id",
                          event_id=out.event_id)
        self._outputs.append((item_id, name, out.output))
        return name

    def forget(self, call_id: str) -> None:
        """The call's item was deleted: an output for it is refused from now on."""
        self._open.pop(call_id, None)

    def drop(self, item_id: str) -> None:
        """An output not answered yet was deleted: the next response does not see it."""
        self._outputs = [o for o in self._outputs if o[0] != item_id]

    @property
    def waiting(self) -> bool:
        """Whether outputs wait for a response."""
        return bool(self._outputs)

    @property
    def awaiting_output(self) -> bool:
        """Whether a call made waits for the client's output."""
        return bool(self._open)

    def take(self, user_text: str) -> tuple[str, str]:
        """The next response's input with the outputs in it: (what the model is told, what the history keeps)."""
        outputs, self._outputs = self._outputs, []
        told = [tool_result_prompt(name, _result(output), False) for _, name, output in outputs]
        kept = [remembered_output(name, output) for _, name, output in outputs]
        if user_text:
            told.append(user_text)
            kept.append(user_text)
        return "\n".join(told), "\n".join(kept)


def remembered_output(name: str, output: str) -> str:
    """A function's output as the history keeps it (part of the next user turn)."""
    return f"(The tool {name} returned: {' '.join(output.split())[:REMEMBER_CHARS]})"


def remembered_call(name: str, parameters: dict[str, Any]) -> str:
    """A function call as the history keeps the assistant's turn."""
    return f"(I called the tool {name} with {json.dumps(parameters, ensure_ascii=False)[:REMEMBER_CHARS]}.)"
