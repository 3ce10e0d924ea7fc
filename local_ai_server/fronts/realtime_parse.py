"""OpenAI Realtime client events: JSON in, typed requests out, every field checked (pure, no I/O).

GA shapes are the reference; the beta's flat session fields (`input_audio_format`, `modalities`, ...) are
accepted as aliases. Fields we do not know are ignored, as the Realtime API's own clients expect of a
server; a known field with a bad value raises `Invalid`, and nothing of that event is applied.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, replace
from typing import Any

from ..tool_decl import Tool
from .realtime_fields import Invalid, get_bool, get_int, get_obj, get_str, is_number, short
from .realtime_tools import (
    FunctionOutput,
    ToolChoice,
    check_choice,
    parse_function_output,
    parse_realtime_tools,
    parse_tool_choice,
)

# Wire audio formats -> (rate, what the core takes in, what the core puts out).
FORMATS: dict[str, int] = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
BETA_FORMATS: dict[str, str] = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
MODALITIES = ("audio", "text")


@dataclass(frozen=True)
class Limits:
    """How much text one event may carry."""

    max_text_chars: int = 4000
    max_instructions_chars: int = 32000


@dataclass(frozen=True)
class TurnDetection:
    """server_vad settings; None fields take the server's defaults."""

    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    create_response: bool = True
    interrupt_response: bool = True
    eagerness: str | None = None  # semantic_vad (the turn detector, voice/endpoint.py): low|medium|high|auto


# semantic_vad's eagerness as the turn detector's threshold: an eager server ends turns on weaker evidence.
EAGERNESS_THRESHOLD = {"low": 0.7, "medium": 0.5, "auto": 0.5, "high": 0.3}


@dataclass(frozen=True)
class SessionConfig:
    """What a Realtime session is set to (the part session.update may change)."""

    instructions: str | None = None
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    audio_output: bool = True  # output_modalities ["audio"]; False: ["text"]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()


@dataclass(frozen=True)
class SessionPatch:
    """The fields a session.update sets; `turn_detection_set` tells a null from an absent one."""

    instructions: str | None = None
    instructions_set: bool = False
    input_format: str | None = None
    output_format: str | None = None
    turn_detection: TurnDetection | None = None
    turn_detection_set: bool = False
    audio_output: bool | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None

    def apply(self, cfg: SessionConfig) -> SessionConfig:
        """The session with this update applied; Invalid if the result forces a function it does not declare."""
        out = cfg
        if self.instructions_set:
            out = replace(out, instructions=self.instructions or None)
        if self.input_format is not None:
            out = replace(out, input_format=self.input_format)
        if self.output_format is not None:
            out = replace(out, output_format=self.output_format)
        if self.turn_detection_set:
            out = replace(out, turn_detection=self.turn_detection)
        if self.audio_output is not None:
            out = replace(out, audio_output=self.audio_output)
        if self.tools is not None:
            out = replace(out, tools=self.tools)
        if self.tool_choice is not None:
            out = replace(out, tool_choice=self.tool_choice)
        check_choice(out.tools, out.tool_choice, "session.tool_choice")
        return out


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    patch: SessionPatch


@dataclass(frozen=True)
class AudioAppend:
    event_id: str | None
    audio_b64: str

    def audio(self) -> bytes:
        """The decoded audio (may be large: the front decodes big ones on a thread)."""
        try:
            return base64.b64decode(self.audio_b64, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid("audio is not valid base64", param="audio", event_id=self.event_id) from None


@dataclass(frozen=True)
class AudioCommit:
    event_id: str | None


@dataclass(frozen=True)
class AudioClear:
    event_id: str | None


@dataclass(frozen=True)
class ItemCreate:
    """A user message (its text), the one kind of item a client may add here."""

    event_id: str | None
    text: str


@dataclass(frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class OutputAudioClear:
    event_id: str | None


@dataclass(frozen=True)
class ItemTruncate:
    event_id: str | None
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None
    instructions: str | None = None
    audio_output: bool | None = None
    out_of_band: bool = False  # conversation "none": the answer is not added to the conversation
    tools: tuple[Tool, ...] | None = None  # this response's tools and tool_choice, instead of the session's
    tool_choice: ToolChoice | None = None


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None


ClientEvent = (SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | FunctionOutput | ItemTruncate
               | ItemDelete | OutputAudioClear | ResponseCreate | ResponseCancel)

# Known events this server does not serve (said so, rather than "unknown").
UNSUPPORTED = {
    "conversation.item.retrieve": "retrieving items is not supported",
    "transcription_session.update": "transcription sessions are not supported; use a realtime session",
}


def decode(frame: str | bytes) -> dict[str, Any]:
    """A text frame as a JSON object, or Invalid."""
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        raise Invalid("the event is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise Invalid("the event must be a JSON object", code="invalid_json")
    return obj


def event_id_of(obj: dict[str, Any]) -> str | None:
    """The client's event_id, if it gave a usable one."""
    eid = obj.get("event_id")
    return eid[:128] if isinstance(eid, str) else None


def parse(obj: dict[str, Any], limits: Limits = Limits()) -> ClientEvent:
    """One client event, checked; raises Invalid (with the event's id) for anything it cannot accept."""
    eid = event_id_of(obj)
    kind = obj.get("type")
    try:
        if not isinstance(kind, str):
            raise Invalid("missing the event's type", code="missing_required_parameter", param="type")
        if kind == "session.update":
            return SessionUpdate(eid, parse_session(get_obj(obj, "session", required=True) or {}, limits))
        if kind == "input_audio_buffer.append":
            return AudioAppend(eid, get_str(obj, "audio", required=True) or "")
        if kind == "input_audio_buffer.commit":
            return AudioCommit(eid)
        if kind == "input_audio_buffer.clear":
            return AudioClear(eid)
        if kind == "conversation.item.create":
            item = get_obj(obj, "item", required=True) or {}
            if item.get("type") == "function_call_output":
                return parse_function_output(eid, item)
            return ItemCreate(eid, _user_text(item, limits))
        if kind == "conversation.item.truncate":
            return ItemTruncate(eid, get_str(obj, "item_id", required=True) or "",
                                get_int(obj, "content_index", 0, 0, 16),
                                get_int(obj, "audio_end_ms", None, 0, 24 * 3600 * 1000))
        if kind == "conversation.item.delete":
            return ItemDelete(eid, get_str(obj, "item_id", required=True) or "")
        if kind == "output_audio_buffer.clear":
            return OutputAudioClear(eid)
        if kind == "response.create":
            return _response_create(eid, get_obj(obj, "response") or {}, limits)
        if kind == "response.cancel":
            return ResponseCancel(eid, get_str(obj, "response_id"))
        if kind in UNSUPPORTED:
            raise Invalid(UNSUPPORTED[kind], code="unsupported_event", param="type")
        raise Invalid(f"unknown event type {short(kind)}", code="invalid_event_type", param="type")
    except Invalid as err:
        err.event_id = eid
        raise


def parse_session(s: dict[str, Any], limits: Limits) -> SessionPatch:
    """A session.update's session object (GA nesting, or the beta's flat fields)."""
    stype = s.get("type")
    if stype is not None and stype != "realtime":
        raise Invalid("only realtime sessions are supported (session.type \"realtime\")", param="session.type")
    patch: dict[str, Any] = {}
    if "instructions" in s:
        text = s["instructions"]
        if text is not None and not isinstance(text, str):
            raise Invalid("instructions must be a string", code="invalid_type", param="session.instructions")
        if text is not None and len(text) > limits.max_instructions_chars:
            raise Invalid(f"instructions longer than {limits.max_instructions_chars} characters",
                          param="session.instructions")
        patch.update(instructions=text, instructions_set=True)
    if "tools" in s:
        patch["tools"] = parse_realtime_tools(s["tools"], "session.tools")
    if s.get("tool_choice") is not None:
        patch["tool_choice"] = parse_tool_choice(s["tool_choice"], "session.tool_choice")
    for key in ("output_modalities", "modalities"):
        if key in s:
            patch["audio_output"] = _modalities(s[key], f"session.{key}")
    audio = get_obj(s, "audio", param="session.audio") or {}
    audio_in = get_obj(audio, "input", param="session.audio.input") or {}
    audio_out = get_obj(audio, "output", param="session.audio.output") or {}
    for where, param, beta in ((audio_in, "session.audio.input.format", "input_audio_format"),
                               (audio_out, "session.audio.output.format", "output_audio_format")):
        fmt = _format(where["format"], param) if "format" in where else None
        if beta in s:
            fmt = _beta_format(s[beta], f"session.{beta}")
        if fmt is not None:
            patch["input_format" if where is audio_in else "output_format"] = fmt
    if "turn_detection" in audio_in:
        patch.update(turn_detection=_turn_detection(audio_in["turn_detection"], "session.audio.input.turn_detection"),
                     turn_detection_set=True)
    elif "turn_detection" in s:
        patch.update(turn_detection=_turn_detection(s["turn_detection"], "session.turn_detection"),
                     turn_detection_set=True)
    return SessionPatch(**patch)


def _turn_detection(td: Any, param: str) -> TurnDetection | None:
    if td is None:
        return None
    if not isinstance(td, dict):
        raise Invalid("turn_detection must be an object or null", code="invalid_type", param=param)
    kind = td.get("type", "server_vad")
    if kind == "semantic_vad":
        eagerness = td.get("eagerness", "auto")
        if eagerness not in EAGERNESS_THRESHOLD:
            raise Invalid("eagerness must be low, medium, high or auto", param=f"{param}.eagerness")
        return TurnDetection(eagerness=eagerness, create_response=get_bool(td, "create_response", True, param),
                             interrupt_response=get_bool(td, "interrupt_response", True, param))
    if kind != "server_vad":
        raise Invalid(f"turn_detection type {short(kind)} is not supported; use server_vad, semantic_vad or null",
                      param=f"{param}.type")
    threshold = td.get("threshold")
    if threshold is not None and (not is_number(threshold) or not 0.0 <= threshold <= 1.0):
        raise Invalid("threshold must be a number from 0 to 1", param=f"{param}.threshold")
    return TurnDetection(
        threshold=float(threshold) if threshold is not None else None,
        prefix_padding_ms=get_int(td, "prefix_padding_ms", None, 0, 5000, param, optional=True),
        silence_duration_ms=get_int(td, "silence_duration_ms", None, 50, 10000, param, optional=True),
        create_response=get_bool(td, "create_response", True, param),
        interrupt_response=get_bool(td, "interrupt_response", True, param),
    )


def _response_create(eid: str | None, r: dict[str, Any], limits: Limits) -> ResponseCreate:
    instructions = get_str(r, "instructions", param="response.instructions")
    if instructions is not None and len(instructions) > limits.max_instructions_chars:
        raise Invalid(f"instructions longer than {limits.max_instructions_chars} characters",
                      param="response.instructions")
    audio_output = None
    for key in ("output_modalities", "modalities"):
        if r.get(key) is not None:
            audio_output = _modalities(r[key], f"response.{key}")
    conversation = r.get("conversation", "auto")
    if conversation not in (None, "auto", "none"):
        raise Invalid("conversation must be \"auto\" or \"none\"", param="response.conversation")
    if r.get("input") is not None:
        raise Invalid("response.input is not supported: the response answers the conversation",
                      code="unsupported_parameter", param="response.input")
    tools = parse_realtime_tools(r["tools"], "response.tools") if r.get("tools") is not None else None
    choice = parse_tool_choice(r["tool_choice"], "response.tool_choice") if r.get("tool_choice") is not None else None
    return ResponseCreate(eid, instructions, audio_output, out_of_band=conversation == "none", tools=tools,
                          tool_choice=choice)


def _user_text(item: dict[str, Any], limits: Limits) -> str:
    """The text of a user message item (input_text parts joined)."""
    kind = item.get("type", "message")
    if kind != "message":
        raise Invalid(f"items of type {short(kind)} are not supported; add a user message or a function_call_output",
                      code="unsupported_parameter", param="item.type")
    if item.get("role") != "user":
        raise Invalid("only user messages may be added to the conversation", param="item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise Invalid("item.content must be a non-empty list", code="invalid_type", param="item.content")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "text"):
            raise Invalid("only input_text content is supported in a user message", param=f"item.content[{i}]")
        text = part.get("text")
        if not isinstance(text, str):
            raise Invalid("input_text needs a text string", code="invalid_type", param=f"item.content[{i}].text")
        texts.append(text)
    text = "\n".join(texts)
    if not text.strip():
        raise Invalid("the message has no text", param="item.content")
    if len(text) > limits.max_text_chars:
        raise Invalid(f"text longer than {limits.max_text_chars} characters", param="item.content")
    return text


# ---------------------------------------------------------------------------------------------- fields


def _modalities(value: Any, param: str) -> bool:
    """True for audio output (with its transcript), False for text only."""
    if not isinstance(value, list) or not value or any(m not in MODALITIES for m in value):
        raise Invalid("output_modalities must be [\"audio\"] or [\"text\"]", param=param)
    return "audio" in value


def _format(value: Any, param: str) -> str:
    if isinstance(value, str):
        return _beta_format(value, param)
    if not isinstance(value, dict) or value.get("type") not in FORMATS:
        raise Invalid("format must be {\"type\": \"audio/pcm\"}, \"audio/pcmu\" or \"audio/pcma\"", param=param)
    kind: str = value["type"]
    rate = value.get("rate")
    if rate is not None and rate != FORMATS[kind]:
        raise Invalid(f"{kind} is supported at {FORMATS[kind]} Hz only", param=f"{param}.rate")
    return kind


def _beta_format(value: Any, param: str) -> str:
    if isinstance(value, str) and value in BETA_FORMATS:
        return BETA_FORMATS[value]
    if isinstance(value, str) and value in FORMATS:
        return value
    raise Invalid("audio format must be pcm16, g711_ulaw or g711_alaw", param=param)
