"""The protocol's constants, the parser's size limits and the client messages as frozen dataclasses."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidField, RequestId
from ..tools import Tool
from .fields import _rid

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
    # Turn detection (voice/endpoint.py): "vad" | "smart", the detector's threshold, short and long silence.
    turn_detection: str | None = None
    turn_threshold: float | None = None
    turn_short_ms: int | None = None
    turn_long_ms: int | None = None


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
