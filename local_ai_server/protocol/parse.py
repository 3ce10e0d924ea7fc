"""Client messages: one text frame -> a JSON object -> a typed message (or a ProtocolError)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidField, InvalidJson, PayloadTooLarge, UnknownType
from ..tools import Tool, ToolError, normalize_policy, parse_names, parse_tools
from .fields import _SAFE_NAME_RE, _SURROGATE_ESCAPE_RE, _bad_unicode_at, _Fields, _rid, clean_text, normalize_type
from .messages import (
    CONTEXT_ROLES,
    MAX_TOOL_RESULT_CHARS,
    TOOL_CHOICES,
    Audio,
    Auth,
    Backends,
    BackendSchema,
    BargeIn,
    Capabilities,
    Limits,
    LlmRequest,
    LlmToolRequest,
    Message,
    Reload,
    SetMode,
    Status,
    SwitchModel,
    ToolContext,
    ToolResult,
    TtsRequest,
)


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
        turn_detection=f.opt_choice("turn_detection", ("vad", "smart")),
        turn_threshold=f.opt_float("turn_threshold", 0.0, 1.0),
        turn_short_ms=f.opt_int("turn_short_ms", 50, 5000),
        turn_long_ms=f.opt_int("turn_long_ms", 100, 10000),
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
