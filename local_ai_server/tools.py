"""Pure logic for LLM tool calling as AVA uses it: tool declarations, call parsing, decisions, farewells."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeGuard

MAX_TOOLS = 32
MAX_TOOL_SCHEMA_BYTES = 8192
MAX_TOOLS_BYTES = 32768
MAX_DESCRIPTION_CHARS = 1024
POLICIES = ("auto", "strict", "compatible", "off")

DEFAULT_FAREWELL = "Thank you for calling. Goodbye."
MAX_FAREWELL_CHARS = 500
MAX_ANSWER_CHARS = 400  # the decision's spoken alternative; a decision is short, its tokens are capped too
MAX_RESULT_CHARS = 4000  # a tool result as the model sees it: a small model's context is ~1k tokens
MAX_SCAN_CHARS = 20000  # parse_tool_calls / parse_decision look at no more of a text than this
MAX_SIMPLE_PROPERTIES = 12

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_NAME_RULE = "a string of 1-64 letters, digits, '_', '.' or '-' starting with a letter or '_'"
_SCALAR_TYPES = ("string", "number", "integer", "boolean")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

# Each '{' of a text may start a decode; garbage made of braces must not make that quadratic without end.
_MAX_DECODE_ATTEMPTS = 1000
# A tool name written just before a JSON object: `<NAME>{`, `<function=NAME>{`, `*NAME* {`, `NAME: {`, `NAME({`.
# Searched only in the 100 characters before the '{' and anchored at their end, so its work is bounded.
_PREFIX_RE = re.compile(r"(?:<(?:function=)?|\*{1,2}|`)?(?<![A-Za-z0-9_.-])([A-Za-z_][A-Za-z0-9_.-]{0,63})"
                        r"(?:>|\*{1,2}|`)?[ \t]*[:(]?[ \t\r\n]*$")
_PREFIX_WINDOW = 100


class ToolError(ValueError):
    """A tool declaration the client sent is invalid; the message is safe to send back (no paths)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        # Protocol maps this to payload_too_large rather than invalid_field.
        self.too_large = too_large


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
        raise ToolError(f"{field} must be a list")
    if len(raw) > MAX_TOOLS:
        raise ToolError(f"{field} has {len(raw)} tools; at most {MAX_TOOLS} are allowed", too_large=True)
    tools: list[Tool] = []
    seen: set[str] = set()
    total = 0
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            item = {"name": item}  # a bare name: a tool without a description or arguments
        if not isinstance(item, dict):
            raise ToolError(f"{where} must be an object or a tool name")
        spec = item
        if isinstance(item.get("function"), dict) and "name" not in item:
            # OpenAI's form: {"type": "function", "function": {name, description, parameters}}.
            spec = item["function"]
            where = f"{where}.function"
        tool = _parse_tool(spec, where)
        total += _json_size({"name": tool.name, "description": tool.description, "parameters": tool.parameters})
        if total > MAX_TOOLS_BYTES:
            raise ToolError(f"{field} is over {MAX_TOOLS_BYTES} bytes as JSON", too_large=True)
        # Names match case-insensitively everywhere (allowed_tools, parsed calls): a second spelling is a duplicate.
        if tool.name.lower() not in seen:
            seen.add(tool.name.lower())
            tools.append(tool)
    return tuple(tools)


def _parse_tool(spec: Mapping[str, Any], where: str) -> Tool:
    """One tool declaration's name, description and parameters, validated."""
    name = spec.get("name")
    if not _valid_name(name):
        raise ToolError(f"{where}.name must be {_NAME_RULE}")
    description = spec.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ToolError(f"{where}.description must be a string")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ToolError(f"{where}.description is over {MAX_DESCRIPTION_CHARS} characters", too_large=True)
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = _EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise ToolError(f"{where}.parameters must be an object (a JSON schema)")
    try:
        text = json.dumps(parameters, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        raise ToolError(f"{where}.parameters must be JSON") from None
    if len(text.encode("utf-8")) > MAX_TOOL_SCHEMA_BYTES:
        raise ToolError(f"{where}.parameters is over {MAX_TOOL_SCHEMA_BYTES} bytes as JSON", too_large=True)
    # A copy of our own: the client's objects may be mutated later, a Tool is frozen.
    return Tool(name=name, description=description, parameters=json.loads(text))


def parse_names(raw: Any, field: str = "allowed_tools") -> tuple[str, ...]:
    """Validate a list of tool names; duplicates (case-insensitive) keep their first spelling."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ToolError(f"{field} must be a list")
    if len(raw) > MAX_TOOLS:
        raise ToolError(f"{field} has {len(raw)} names; at most {MAX_TOOLS} are allowed", too_large=True)
    names: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(raw):
        if not _valid_name(name):
            raise ToolError(f"{field}[{i}] must be {_NAME_RULE}")
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


# ---------------------------------------------------------------------------------------------- calls in text


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


# ---------------------------------------------------------------------------------------------- end of call

_END_PHRASES = re.compile(
    r"\b(?:(?P<strong>hang\s*up|end\s+(?:the\s+)?call)"
    r"|no\s+thanks|thank\s+you|thanks|that'?s\s+all|that\s+is\s+all|nothing\s+else|good\s*bye|bye"
    r"|have\s+a\s+(?:good|great|nice)\s+day|take\s+care|talk\s+to\s+you\s+later|no\s+transcript)\b"
)
_CLAUSE_END = re.compile(r"[.,;:!?\n]")
_WORD = re.compile(r"[a-z']+")
_NEGATIONS = frozenset({"not", "never", "cannot", "dont", "cant", "wont", "didnt", "doesnt", "shouldnt", "without"})
# A word that makes the phrase after it a mention, not a farewell: "how do I say bye", "the word goodbye".
_MENTIONS = frozenset({"say", "says", "said", "saying", "word", "words", "phrase", "spell", "spelled", "translate",
                       "called"})
_NEGATION_WINDOW = 3  # words before the phrase, within its clause: "I do not want to hang up"
_WINDOW_CHARS = 64


def _negated(words: Sequence[str]) -> bool:
    """Whether any of these words negates what follows it."""
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def end_of_call_intent(user_text: str) -> bool:
    """Whether the caller's words end the call ("thanks, bye"); negated or quoted uses do not."""
    if not isinstance(user_text, str):
        return False
    # Curly quotes as STT and keyboards write them; the apostrophe of "don’t" is the same character as ’.
    text = user_text[:MAX_SCAN_CHARS].lower().replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    for m in _END_PHRASES.finditer(text):
        # The few words before the phrase, within its clause ("I can't hear you, goodbye" is a farewell).
        # A bounded window: "say bye say bye ..." must not cost a scan of the whole text per phrase.
        window = _CLAUSE_END.split(text[max(0, m.start() - _WINDOW_CHARS):m.start()])[-1]
        before = _WORD.findall(window)[-_NEGATION_WINDOW:]
        if _negated(before):
            continue
        if m.group("strong"):
            return True  # asking to hang up is terminal even as a question ("can you hang up?")
        if before and before[-1] in _MENTIONS:
            continue
        quote_before = m.start() > 0 and text[m.start() - 1] in "\"'"
        quote_after = m.end() < len(text) and text[m.end()] in "\"'"
        if quote_before and quote_after:
            continue
        after = _WORD.findall(text, m.end(), min(len(text), m.end() + 16))
        if after and after[0] in ("mean", "means", "meaning"):
            continue
        return True
    return False


def first_sentence(text: str, default: str = DEFAULT_FAREWELL) -> str:
    """The first speakable sentence of a text (capped), or `default` when it has none."""
    if not isinstance(text, str):
        return default
    clean = " ".join(text[:MAX_SCAN_CHARS].split())
    for part in re.split(r"(?<=[.!?]) ", clean):
        if re.search(r"[^\W_]", part):
            return part[:MAX_FAREWELL_CHARS].rstrip()
    return default


def farewell_from_result(result: Any) -> str:
    """The farewell a hangup tool's result asks for (`farewell_message` or `message`), else the default."""
    if isinstance(result, dict):
        for key in ("farewell_message", "message"):
            value = result.get(key)
            if isinstance(value, str):
                clean = " ".join(value.split())
                if clean:
                    return clean[:MAX_FAREWELL_CHARS].rstrip()
    return DEFAULT_FAREWELL


# ---------------------------------------------------------------------------------------------- decisions


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
