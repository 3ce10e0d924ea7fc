"""AVA's wire protocol v2, sans-I/O: client messages parsed into dataclasses, server messages built as dicts."""

from ..errors import RequestId
from .build import (
    auth_response,
    barge_in_ack,
    dumps,
    error_message,
    llm_response,
    llm_token,
    llm_tool_response,
    mode_ready,
    reload_response,
    stt_result,
    switch_response,
    tts_audio,
    tts_response,
)
from .fields import MAX_ID_CHARS, MAX_NAME_BYTES, MAX_PATH_CHARS, MODES, clean_text, normalize_type
from .messages import (
    CONTEXT_ROLES,
    MAX_TOOL_RESULT_CHARS,
    PROTOCOL_VERSION,
    STT_BACKEND,
    TOOL_CHOICES,
    TTS_BACKEND,
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
from .parse import MESSAGE_TYPES, decode_json, parse_object, parse_text

__all__ = [
    "CONTEXT_ROLES", "MAX_ID_CHARS", "MAX_NAME_BYTES", "MAX_PATH_CHARS", "MAX_TOOL_RESULT_CHARS", "MESSAGE_TYPES",
    "MODES", "PROTOCOL_VERSION", "STT_BACKEND", "TOOL_CHOICES", "TTS_BACKEND",
    "Audio", "Auth", "BackendSchema", "Backends", "BargeIn", "Capabilities", "Limits", "LlmRequest", "LlmToolRequest",
    "Message", "Reload", "RequestId", "SetMode", "Status", "SwitchModel", "ToolContext", "ToolResult", "TtsRequest",
    "auth_response", "barge_in_ack", "clean_text", "decode_json", "dumps", "error_message", "llm_response",
    "llm_token", "llm_tool_response", "mode_ready", "normalize_type", "parse_object", "parse_text",
    "reload_response", "stt_result", "switch_response", "tts_audio", "tts_response",
]
