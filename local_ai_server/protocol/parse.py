"""Sans-I/O wire protocol: parse client messages into dataclasses, build server messages as dicts."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidField, InvalidJson, PayloadTooLarge, RequestId, ServerError, UnknownType
from ..tools import Tool, ToolError, normalize_policy, parse_names, parse_tools

MODES = ("full", "stt", "llm", "tts")
CONTEXT_ROLES = ("system", "user", "assistant")
PROTOCOL_VERSION = 2  # AVA's local_ai_server protocol; a client's other value is accepted (AVA only warns)
TOOL_CHOICES = ("auto", "required", "none")
MAX_TOOL_RESULT_CHARS = 65536  # a tool's result as JSON; the model sees at most 4000 characters of it
STT_BACKEND = "faster_whisper"
TTS_BACKEND = "piper"



@dataclass(frozen=True)
class Limits:
    """Size limits the parser enforces on fields (everything that can reach a model is capped here)."""

    max_text_chars: int = 4000
    # `llm_request.context`: messages kept (the newest), and their total characters.
    max_context_items: int = 100
    max_context_chars: int = 32000


@dataclass(frozen=True)
class Auth:
    """`auth`: the first message when a token is configured."""

    token: str
    call_id: str | None = None
    request_id: RequestId = None


@dataclass(frozen=True)
class SetMode:
    """`set_mode`: session defaults (a missing mode keeps the current one)."""

    mode: str | None
    call_id: str | None = None
    segment_energy_threshold: int | None = None
    segment_silence_ms: int | None = None
    output_encoding: str | None = None
    output_sample_rate_hz: int | None = None
    request_id: RequestId = None


@dataclass(frozen=True)
class Audio:
    """`audio`: JSON with base64 data (binary frames are audio too, and never parsed as messages)."""

    data_b64: str | None
    rate: int | None = None
    format: str | None = None
    mode: str | None = None
    call_id: str | None = None
    request_id: RequestId = None
    output_encoding: str | None = None
    output_sample_rate_hz: int | None = None

    def payload(self) -> bytes:
        """The audio bytes (decodes base64; call off the loop for large payloads)."""
        try:
            return base64.b64decode(self.data_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidField("audio.data is not valid base64", request_id=_rid(self.request_id)) from None


@dataclass(frozen=True)
class LlmRequest:
    """`llm_request`: text in, `llm_response` (and optionally `llm_token`s) out."""

    text: str
    call_id: str | None = None
    request_id: RequestId = None
    mode: str | None = None
    context: tuple[tuple[str, str], ...] | None = None
    stream: bool = False


@dataclass(frozen=True)
class TtsRequest:
    """`tts_request`: text in, `tts_response` with base64 audio out."""

    text: str
    call_id: str | None = None
    request_id: RequestId = None
    mode: str | None = None
    output_encoding: str | None = None
    output_sample_rate_hz: int | None = None


@dataclass(frozen=True)
class SwitchModel:
    """`switch_model`: session scope sets the system prompt; global scope swaps model files."""

    scope: str | None
    call_id: str | None = None
    request_id: RequestId = None
    system_prompt: str | None = None
    llm_model_path: str | None = None
    stt_model_path: str | None = None
    tts_model_path: str | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class Reload:
    """`reload_models` (what="all") or `reload_llm` (what="llm")."""

    what: str
    model_path: str | None = None
    request_id: RequestId = None
    call_id: str | None = None


@dataclass(frozen=True)
class Status:
    """`status`: health and model state."""

    request_id: RequestId = None
    call_id: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """`capabilities`: which backends are installed."""

    request_id: RequestId = None
    call_id: str | None = None


@dataclass(frozen=True)
class BargeIn:
    """`barge_in`: cancel the answer in flight (and, with `rollback_assistant`, forget it)."""

    call_id: str | None = None
    request_id: RequestId = None
    reason: str | None = None
    rollback_assistant: bool = False


@dataclass(frozen=True)
class ToolContext:
    """`tool_context`: the tools the call may use, stored on the session, no reply."""

    tools: tuple[Tool, ...] = ()
    allowed_tools: tuple[str, ...] = ()
    tool_policy: str = "auto"
    call_id: str | None = None


@dataclass(frozen=True)
class LlmToolRequest:
    """`llm_tool_request`: find the tool calls an answer makes (or should make) -> `llm_tool_response`."""

    text: str
    latest_user_text: str = ""
    tools: tuple[Tool, ...] | None = None  # None: the session's tool_context
    allowed_tools: tuple[str, ...] | None = None
    tool_policy: str | None = None
    tool_choice: str = "auto"
    call_id: str | None = None
    request_id: RequestId = None


@dataclass(frozen=True)
class ToolResult:
    """`tool_result`: what a tool the client ran returned -> the spoken follow-up answer."""

    tool_name: str
    result: Any = None
    is_error: bool = False
    function_call_id: str | None = None
    call_id: str | None = None
    request_id: RequestId = None
    output_encoding: str | None = None
    output_sample_rate_hz: int | None = None


@dataclass(frozen=True)
class Backends:
    """`backends`: the STT, TTS and LLM backends this server has, with their settings' schema."""

    request_id: RequestId = None
    call_id: str | None = None


@dataclass(frozen=True)
class BackendSchema:
    """`backend_schema`: one backend's settings schema."""

    backend_type: str
    backend_name: str
    request_id: RequestId = None
    call_id: str | None = None


Message = (
    Auth | SetMode | Audio | LlmRequest | TtsRequest | SwitchModel | Reload | Status | Capabilities | BargeIn
    | ToolContext | LlmToolRequest | ToolResult | Backends | BackendSchema
)


_INT_RE = re.compile(r"-?[0-9]{1,12}")
_SAFE_NAME_RE = re.compile(r"[^a-z0-9_]")
# C0 controls and DEL: never part of an identifier; in free text they become spaces (tab/newline stay).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# json.loads turns a \ud800 escape into a lone surrogate: a str Python holds but no UTF-8 can encode.
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_ID_CHARS = 256
MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255  # longest file name POSIX file systems take


def clean_text(text: str) -> str:
    """Free text as the server uses it: control characters (NUL included) replaced by spaces."""
    return _TEXT_CONTROL_RE.sub(" ", text) if _TEXT_CONTROL_RE.search(text) else text


def _bad_unicode_at(value: Any, where: str, depth: int = 0) -> str | None:
    """The dotted name of the first key or string under `value` holding a lone surrogate, or None."""
    if isinstance(value, str):
        return where if _SURROGATE_RE.search(value) else None
    if depth > 64:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{_SAFE_NAME_RE.sub('', str(key).lower())[:40]}" if where else str(key)
            if _SURROGATE_RE.search(key):
                return where or "a key"
            found = _bad_unicode_at(item, name, depth + 1)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _bad_unicode_at(item, f"{where}[{i}]", depth + 1)
            if found is not None:
                return found
    return None


def normalize_type(value: Any) -> str:
    """Lower-case, trim and map `-` to `_`, as the protocol prescribes."""
    return str(value).replace("\x00", "").strip().lower().replace("-", "_")


def _rid(value: Any) -> RequestId:
    """A raw JSON value as a request id, or None when it cannot be one (and so cannot be echoed)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -2**63 <= value < 2**64 else None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS and not _SURROGATE_RE.search(value):
        return value
    return None


class _Fields:
    """Typed accessors over one message's JSON object; errors carry the request id."""

    def __init__(self, obj: Mapping[str, Any], mtype: str) -> None:
        self.obj = obj
        self.mtype = mtype
        raw_rid = obj.get("request_id")
        self.request_id: RequestId = _rid(raw_rid)
        if raw_rid is not None and self.request_id is None:
            raise InvalidField(f"{mtype}.request_id must be a string or integer (of at most {MAX_ID_CHARS} "
                               "characters)")
        self.call_id = self.opt_id("call_id")

    def fail(self, msg: str) -> InvalidField:
        return InvalidField(f"{self.mtype}.{msg}", request_id=_rid(self.request_id), call_id=self.call_id
                            if hasattr(self, "call_id") else None)

    def opt_str(self, key: str, max_len: int | None = None) -> str | None:
        """A free-text field: control characters (NUL included) become spaces, as docs/protocol.md says."""
        value = self._raw_str(key, max_len)
        return None if value is None else clean_text(value)

    def opt_id(self, key: str, max_len: int = MAX_ID_CHARS) -> str | None:
        """An identifier or keyword (ids, modes, formats, tokens): refused if it holds a control character."""
        value = self._raw_str(key, max_len)
        if value is not None and _CONTROL_RE.search(value):
            raise self.fail(f"{key} must not contain control characters")
        return value

    def _raw_str(self, key: str, max_len: int | None) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "call_id":
            value = str(value)  # some engines send numeric call ids
        if not isinstance(value, str):
            raise self.fail(f"{key} must be a string")
        if max_len is not None and len(value) > max_len:
            raise PayloadTooLarge(
                f"{self.mtype}.{key} is longer than {max_len} characters", request_id=_rid(self.request_id)
            )
        return value

    def req_str(self, key: str, max_len: int | None = None, *aliases: str) -> str:
        for name in (key, *aliases):
            value = self.opt_str(name, max_len)
            if value is not None:
                return value
        raise self.fail(f"{key} is required")

    def opt_path(self, key: str, value: Any = None) -> str | None:
        """A model path: refused unless the OS could take it (no NUL, names of at most 255 bytes)."""
        if value is None:
            value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{key} must be a non-empty string")
        if len(value) > MAX_PATH_CHARS:
            raise PayloadTooLarge(f"{self.mtype}.{key} is longer than {MAX_PATH_CHARS} characters",
                                  request_id=_rid(self.request_id))
        if _CONTROL_RE.search(value):
            raise self.fail(f"{key} must not contain control characters")
        if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in value.split("/")):
            raise self.fail(f"{key} has a name longer than {MAX_NAME_BYTES} bytes")
        if value.startswith("~") and not (value == "~" or value.startswith("~/")):
            raise self.fail(f"{key} must not name another user's home directory")
        return value

    def opt_int(self, key: str, lo: int, hi: int, *aliases: str) -> int | None:
        for name in (key, *aliases):
            value = self.obj.get(name)
            if value is None:
                continue
            if isinstance(value, bool):
                raise self.fail(f"{name} must be an integer")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
                value = int(value.strip())
            if not isinstance(value, int):
                raise self.fail(f"{name} must be an integer")
            if not lo <= value <= hi:
                raise self.fail(f"{name} must be between {lo} and {hi}")
            return value
        return None

    def opt_bool(self, key: str, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, (int,)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise self.fail(f"{key} must be a boolean")

    def opt_mode(self, key: str = "mode") -> str | None:
        value = self.opt_id(key, 32)
        if value is None:
            return None
        mode = value.strip().lower()
        if mode not in MODES:
            raise self.fail(f"{key} must be one of {', '.join(MODES)}")
        return mode

    def opt_encoding(self, *keys: str) -> str | None:
        for key in keys:
            value = self.opt_id(key, 32)
            if value is not None:
                return value
        return None


def _parse_auth(f: _Fields, limits: Limits) -> Auth:
    token = f.opt_id("auth_token", 4096)
    if token is None:
        token = f.opt_id("token", 4096)
    if token is None:
        raise f.fail("auth_token is required")
    return Auth(token=token, call_id=f.call_id, request_id=f.request_id)


def _parse_set_mode(f: _Fields, limits: Limits) -> SetMode:
    mode = f.opt_mode()
    return SetMode(
        mode=mode,
        call_id=f.call_id,
        segment_energy_threshold=f.opt_int("segment_energy_threshold", 0, 32767),
        segment_silence_ms=f.opt_int("segment_silence_ms", 50, 10000),
        output_encoding=f.opt_encoding("output_encoding", "encoding"),
        output_sample_rate_hz=f.opt_int("output_sample_rate_hz", 1, 384000, "sample_rate_hz"),
        request_id=f.request_id,
    )


def _parse_audio(f: _Fields, limits: Limits) -> Audio:
    data = f.obj.get("data")
    if data is None:
        data = f.obj.get("audio")
    if not isinstance(data, str):
        raise f.fail("data must be a base64 string")
    return Audio(
        data_b64=data,
        rate=f.opt_int("rate", 1, 384000, "sample_rate", "sample_rate_hz"),
        format=f.opt_id("format", 32) or f.opt_id("encoding", 32),
        mode=f.opt_mode(),
        call_id=f.call_id,
        request_id=f.request_id,
        output_encoding=f.opt_encoding("output_encoding"),
        output_sample_rate_hz=f.opt_int("output_sample_rate_hz", 1, 384000),
    )


def _parse_context(f: _Fields, limits: Limits) -> tuple[tuple[str, str], ...] | None:
    """`llm_request.context`: our list of {role, content}, or AVA's object (`messages` / `prior_messages`).

    The list is ours and checked strictly. AVA's engine sends an object, which AVA's own server ignores:
    its role/content lists are used, anything else in it is ignored, never refused.
    """
    ctx = f.obj.get("context")
    if ctx is None:
        return None
    if isinstance(ctx, dict):
        items = next((v for k in ("messages", "prior_messages") if isinstance(v := ctx.get(k), list)), None)
        if items is None:
            return None
        chat = [item for m in items if (item := _ava_chat_item(m)) is not None]
        return _capped_context(f, limits, chat[-limits.max_context_items:])
    if not isinstance(ctx, list):
        raise f.fail("context must be a list of {role, content} objects")
    if len(ctx) > limits.max_context_items:
        raise PayloadTooLarge(f"llm_request.context has more than {limits.max_context_items} messages",
                              request_id=_rid(f.request_id))
    out: list[tuple[str, str]] = []
    for item in ctx:
        if not isinstance(item, dict):
            raise f.fail("context items must be objects")
        role, content = item.get("role"), item.get("content")
        if role not in CONTEXT_ROLES or not isinstance(content, str):
            raise f.fail("context items need role system|user|assistant and a string content")
        out.append((role, content))
    return _capped_context(f, limits, out)


def _ava_chat_item(m: Any) -> tuple[str, str] | None:
    """One message of AVA's context as (role, content) for a chat template without tool roles, or None.

    AVA keeps OpenAI-style tool turns in its history: an assistant message whose `content` is null and
    whose `tool_calls` name the tools, then a `tool` message with the result. They become plain turns
    the model can read; anything else malformed is skipped, as AVA's own server ignores the context.
    """
    if not isinstance(m, dict):
        return None
    role, content = m.get("role"), m.get("content")
    if role == "tool" and isinstance(content, str) and content:
        return ("user", f"(The tool returned: {content})")
    if role == "assistant" and not content and isinstance(m.get("tool_calls"), list):
        names = [c["function"].get("name") for c in m["tool_calls"][:8] if isinstance(c, dict)
                 and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)]
        return ("assistant", f"(I used the tool {', '.join(names)}.)") if names else None
    if role in CONTEXT_ROLES and isinstance(content, str) and content:
        return (role, content)
    return None


def _capped_context(f: _Fields, limits: Limits, chat: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The context with control characters cleaned, refused when a message or the whole is over its cap."""
    total = 0
    for role, content in chat:
        if len(content) > limits.max_text_chars:
            raise PayloadTooLarge(f"llm_request.context has a {role} message longer than "
                                  f"{limits.max_text_chars} characters", request_id=_rid(f.request_id))
        total += len(content)
    if total > limits.max_context_chars:
        raise PayloadTooLarge(f"llm_request.context is longer than {limits.max_context_chars} characters",
                              request_id=_rid(f.request_id))
    return tuple((role, clean_text(content)) for role, content in chat)


def _parse_llm(f: _Fields, limits: Limits) -> LlmRequest:
    # AVA's pipeline sends an empty text after a tool ran, with the tool's result in the context.
    text = f.opt_str("text", limits.max_text_chars)
    if text is None:
        raise f.fail("text is required")
    return LlmRequest(
        text=text,
        call_id=f.call_id,
        request_id=f.request_id,
        mode=f.opt_mode(),
        context=_parse_context(f, limits),
        stream=f.opt_bool("stream"),
    )


def _parse_tts(f: _Fields, limits: Limits) -> TtsRequest:
    text = f.req_str("text", limits.max_text_chars)
    return TtsRequest(
        text=text,
        call_id=f.call_id,
        request_id=f.request_id,
        mode=f.opt_mode(),
        output_encoding=f.opt_encoding("output_encoding", "encoding"),
        output_sample_rate_hz=f.opt_int("output_sample_rate_hz", 1, 384000, "sample_rate_hz"),
    )


def _nested(f: _Fields, key: str) -> Mapping[str, Any]:
    value = f.obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise f.fail(f"{key} must be an object")
    return value


def _parse_switch(f: _Fields, limits: Limits) -> SwitchModel:
    scope = f.opt_id("scope", 32)
    if scope is not None:
        scope = scope.strip().lower()
        if scope not in ("session", "global"):
            raise f.fail("scope must be 'session' or omitted")
        if scope == "global":
            scope = None
    llm_cfg, stt_cfg, tts_cfg = _nested(f, "llm_config"), _nested(f, "stt_config"), _nested(f, "tts_config")

    def path_of(top: str, nested: Mapping[str, Any]) -> str | None:
        value = f.obj.get(top)
        if value is None:
            value = nested.get("model_path")
        return f.opt_path(top, value)

    prompt = llm_cfg.get("system_prompt")
    if prompt is None:
        prompt = f.obj.get("system_prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise f.fail("llm_config.system_prompt must be a string")
    prompt = None if prompt is None else clean_text(prompt)
    if prompt is not None and len(prompt) > limits.max_text_chars:
        raise PayloadTooLarge("switch_model.system_prompt is too long", request_id=_rid(f.request_id))
    return SwitchModel(
        scope=scope,
        call_id=f.call_id,
        request_id=f.request_id,
        system_prompt=prompt,
        llm_model_path=path_of("llm_model_path", llm_cfg),
        stt_model_path=path_of("stt_model_path", stt_cfg),
        tts_model_path=path_of("tts_model_path", tts_cfg),
        dry_run=f.opt_bool("dry_run"),
    )


def _parse_reload_all(f: _Fields, limits: Limits) -> Reload:
    return Reload(what="all", request_id=f.request_id, call_id=f.call_id)


def _parse_reload_llm(f: _Fields, limits: Limits) -> Reload:
    path = f.opt_path("model_path") or f.opt_path("llm_model_path")
    return Reload(what="llm", model_path=path, request_id=f.request_id, call_id=f.call_id)


def _parse_barge_in(f: _Fields, limits: Limits) -> BargeIn:
    reason = f.opt_id("reason", 64)
    return BargeIn(call_id=f.call_id, request_id=f.request_id, reason=reason.strip().lower() if reason else None,
                   rollback_assistant=f.opt_bool("rollback_assistant"))


def _tool_fields(f: _Fields) -> tuple[tuple[Tool, ...] | None, tuple[str, ...] | None]:
    """`tools` and `allowed_tools` (None when absent), capped as docs/protocol.md says."""
    try:
        tools = parse_tools(f.obj["tools"], f"{f.mtype}.tools") if "tools" in f.obj else None
        names = parse_names(f.obj["allowed_tools"], f"{f.mtype}.allowed_tools") if "allowed_tools" in f.obj else None
    except ToolError as err:
        cls = PayloadTooLarge if err.too_large else InvalidField
        raise cls(str(err), request_id=_rid(f.request_id), call_id=f.call_id) from None
    return tools, names


def _parse_tool_context(f: _Fields, limits: Limits) -> ToolContext:
    tools, names = _tool_fields(f)
    return ToolContext(tools=tools or (), allowed_tools=names or (),
                       tool_policy=normalize_policy(f.opt_id("tool_policy", 32)), call_id=f.call_id)


def _parse_llm_tool_request(f: _Fields, limits: Limits) -> LlmToolRequest:
    tools, names = _tool_fields(f)
    policy = f.opt_id("tool_policy", 32)
    choice = (f.opt_id("tool_choice", 32) or "auto").strip().lower()
    if choice not in TOOL_CHOICES:
        raise f.fail(f"tool_choice must be one of {', '.join(TOOL_CHOICES)}")
    return LlmToolRequest(
        text=f.opt_str("text", limits.max_text_chars) or "",
        latest_user_text=f.opt_str("latest_user_text", limits.max_text_chars) or "",
        tools=tools, allowed_tools=names, tool_policy=None if policy is None else normalize_policy(policy),
        tool_choice=choice, call_id=f.call_id, request_id=f.request_id,
    )


def _parse_tool_result(f: _Fields, limits: Limits) -> ToolResult:
    name = f.opt_id("tool_name", 64) or f.opt_id("function_call_id", 256) or "tool"
    result = f.obj.get("result")
    if len(json.dumps(result, default=str)) > MAX_TOOL_RESULT_CHARS:
        raise PayloadTooLarge(f"tool_result.result is longer than {MAX_TOOL_RESULT_CHARS} characters as JSON",
                              request_id=_rid(f.request_id))
    return ToolResult(
        tool_name=name, result=result, is_error=f.opt_bool("is_error"),
        function_call_id=f.opt_id("function_call_id", 256), call_id=f.call_id, request_id=f.request_id,
        output_encoding=f.opt_encoding("output_encoding", "encoding"),
        output_sample_rate_hz=f.opt_int("output_sample_rate_hz", 1, 384000, "sample_rate_hz"),
    )


def _parse_backend_schema(f: _Fields, limits: Limits) -> BackendSchema:
    # Sanitised: an unknown name is echoed in the error.
    return BackendSchema(backend_type=_SAFE_NAME_RE.sub("", (f.opt_id("backend_type", 64) or "").strip().lower()),
                         backend_name=_SAFE_NAME_RE.sub("", (f.opt_id("backend_name", 64) or "").strip().lower()),
                         request_id=f.request_id, call_id=f.call_id)


_PARSERS: dict[str, Callable[[_Fields, Limits], Message]] = {
    "auth": _parse_auth,
    "set_mode": _parse_set_mode,
    "audio": _parse_audio,
    "llm_request": _parse_llm,
    "tts_request": _parse_tts,
    "switch_model": _parse_switch,
    "reload_models": _parse_reload_all,
    "reload_llm": _parse_reload_llm,
    "status": lambda f, _l: Status(request_id=f.request_id, call_id=f.call_id),
    "capabilities": lambda f, _l: Capabilities(request_id=f.request_id, call_id=f.call_id),
    "barge_in": _parse_barge_in,
    "tool_context": _parse_tool_context,
    "llm_tool_request": _parse_llm_tool_request,
    "tool_result": _parse_tool_result,
    "backends": lambda f, _l: Backends(request_id=f.request_id, call_id=f.call_id),
    "backend_schema": _parse_backend_schema,
}

MESSAGE_TYPES: tuple[str, ...] = tuple(_PARSERS)


def decode_json(text: str) -> dict[str, Any]:
    """Decode one text frame into a JSON object, or raise InvalidJson."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidJson("message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidJson("message must be a JSON object")
    if _SURROGATE_ESCAPE_RE.search(text):
        # Only an escape can make one (the frame itself is valid UTF-8); checked here, once, so that no
        # string that cannot be encoded reaches an engine, a path or a reply that echoes it.
        where = _bad_unicode_at(obj, "")
        if where is not None:
            mtype = normalize_type(obj["type"]) if isinstance(obj.get("type"), str) and where != "type" else None
            name = f"{_SAFE_NAME_RE.sub('', mtype)[:40]}.{where}" if mtype else where
            raise InvalidField(f"{name} is not valid Unicode (a lone surrogate)",
                               request_id=_rid(obj.get("request_id")))
    return obj


def parse_object(obj: Mapping[str, Any], limits: Limits = Limits()) -> Message:
    """Turn a decoded JSON object into a typed message; raises a ProtocolError subclass."""
    raw_type = obj.get("type")
    if raw_type is None or not isinstance(raw_type, str):
        rid = obj.get("request_id")
        raise InvalidField("type is required and must be a string", request_id=_rid(rid))
    mtype = normalize_type(raw_type)
    parser = _PARSERS.get(mtype)
    if parser is None:
        rid = obj.get("request_id")
        # Echo only a sanitised form: client text in an error must never look like a path.
        raise UnknownType(f"unknown message type {_SAFE_NAME_RE.sub('', mtype)[:40]!r}", request_id=_rid(rid))
    return parser(_Fields(obj, mtype), limits)


def parse_text(text: str, limits: Limits = Limits()) -> Message:
    """Parse one text frame (JSON) into a typed message."""
    return parse_object(decode_json(text), limits)


# ---------------------------------------------------------------- server messages


def _with_ids(msg: dict[str, Any], request_id: RequestId, call_id: str | None = None) -> dict[str, Any]:
    if request_id is not None:
        msg["request_id"] = request_id
    return msg


def error_message(err: ServerError) -> dict[str, Any]:
    """The `error` envelope (ext) for a ServerError; never includes tracebacks or paths."""
    msg: dict[str, Any] = {"type": "error", "code": err.code, "message": err.message}
    if err.request_id is not None:
        msg["request_id"] = err.request_id
    if err.call_id is not None:
        msg["call_id"] = err.call_id
    return msg


def auth_response(ok: bool, message: str | None = None, request_id: RequestId = None) -> dict[str, Any]:
    """`auth_response` with status ok/error (and the request id of what it answers, when it had one)."""
    msg: dict[str, Any] = {"type": "auth_response", "status": "ok" if ok else "error"}
    if message:
        msg["message"] = message
    return _with_ids(msg, request_id)


def stt_result(
    text: str,
    *,
    call_id: str,
    mode: str,
    is_final: bool,
    confidence: float | None = None,
    request_id: RequestId = None,
    error: str | None = None,
) -> dict[str, Any]:
    """`stt_result` (partial or final)."""
    msg: dict[str, Any] = {
        "type": "stt_result",
        "text": text,
        "call_id": call_id,
        "mode": mode,
        "is_final": is_final,
        "is_partial": not is_final,
        "stt_backend": STT_BACKEND,
    }
    if confidence is not None:
        msg["confidence"] = round(float(confidence), 4)
    if error:
        msg["error"] = error
    return _with_ids(msg, request_id)


def llm_response(text: str, *, call_id: str, request_id: RequestId = None, mode: str = "llm",
                 flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`llm_response` with the whole answer; `flags` are AVA's top-level markers (`tool_result_final`, ...)."""
    msg = {"type": "llm_response", "text": text, "call_id": call_id, "mode": mode, **(flags or {})}
    return _with_ids(msg, request_id)


def llm_token(delta: str, *, call_id: str, request_id: RequestId, tokens: int = 1) -> dict[str, Any]:
    """`llm_token` (ext): one streamed piece of the answer (`tokens` model tokens, coalesced).

    The text is in `token` (what AVA's client reads) and in `delta` (what this server documented first).
    """
    return {"type": "llm_token", "call_id": call_id, "request_id": request_id, "token": delta, "delta": delta,
            "tokens": tokens}


def llm_tool_response(
    *,
    call_id: str,
    request_id: RequestId,
    text: str,
    tool_calls: list[dict[str, Any]],
    tool_path: str,
    structured_attempts: int = 0,
    server_gated: bool = False,
) -> dict[str, Any]:
    """`llm_tool_response`: the tool calls found (`parameters`, as AVA reads them) and how they were found."""
    msg: dict[str, Any] = {
        "type": "llm_tool_response",
        "call_id": call_id,
        "text": text,
        "tool_calls": tool_calls,
        "finish_reason": "tool_calls" if tool_calls else "stop",
        "tool_path": tool_path,
        "tool_parse_failures": 0,
        "repair_attempts": 0,
        "structured_attempts": structured_attempts,
        "protocol_version": PROTOCOL_VERSION,
    }
    if server_gated:
        msg["server_gated"] = True
    return _with_ids(msg, request_id)


def tts_audio(
    *,
    call_id: str,
    mode: str,
    encoding: str,
    sample_rate_hz: int,
    byte_length: int,
    utterance_id: str,
    chunk_index: int,
    is_final: bool,
    request_id: RequestId = None,
) -> dict[str, Any]:
    """The `tts_audio` header that precedes every binary frame."""
    msg: dict[str, Any] = {
        "type": "tts_audio",
        "call_id": call_id,
        "mode": mode,
        "encoding": encoding,
        "sample_rate_hz": sample_rate_hz,
        "byte_length": byte_length,
        "utterance_id": utterance_id,
        "chunk_index": chunk_index,
        "is_final": is_final,
    }
    return _with_ids(msg, request_id)


def tts_response(
    text: str, audio: bytes, *, call_id: str, encoding: str, sample_rate_hz: int, request_id: RequestId = None
) -> dict[str, Any]:
    """`tts_response` with base64 audio; `text` echoed exactly."""
    return _with_ids(
        {
            "type": "tts_response",
            "text": text,
            "call_id": call_id,
            "audio_data": base64.b64encode(audio).decode("ascii"),
            "encoding": encoding,
            "sample_rate_hz": sample_rate_hz,
            "byte_length": len(audio),
        },
        request_id,
    )


def mode_ready(
    *,
    mode: str,
    call_id: str,
    segment_energy_threshold: int | None,
    segment_silence_ms: int | None,
    output_encoding: str | None,
    output_sample_rate_hz: int | None,
    request_id: RequestId = None,
) -> dict[str, Any]:
    """`mode_ready` echoing the effective session settings."""
    return _with_ids(
        {
            "type": "mode_ready",
            "mode": mode,
            "call_id": call_id,
            "segment_energy_threshold": segment_energy_threshold,
            "segment_silence_ms": segment_silence_ms,
            "output_encoding": output_encoding,
            "output_sample_rate_hz": output_sample_rate_hz,
        },
        request_id,
    )


def barge_in_ack(*, call_id: str, request_id: RequestId) -> dict[str, Any]:
    """`barge_in_ack`."""
    return {"type": "barge_in_ack", "status": "ok", "call_id": call_id, "request_id": request_id}


def switch_response(
    status: str,
    message: str,
    *,
    changed: list[str],
    request_id: RequestId = None,
    call_id: str | None = None,
    scope: str | None = None,
) -> dict[str, Any]:
    """`switch_response` for session or global scope."""
    msg: dict[str, Any] = {"type": "switch_response", "status": status, "message": message, "changed": changed}
    if scope is not None:
        msg["scope"] = scope
    if call_id is not None:
        msg["call_id"] = call_id
    if request_id is not None or scope == "session":
        msg["request_id"] = request_id
    return msg


def reload_response(status: str, message: str, *, request_id: RequestId = None) -> dict[str, Any]:
    """`reload_response`."""
    return _with_ids({"type": "reload_response", "status": status, "message": message}, request_id)


def dumps(msg: Mapping[str, Any]) -> str:
    """Serialise a server message compactly."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)
