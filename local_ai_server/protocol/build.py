"""Server messages, built as dicts (and serialised by `dumps`)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from ..errors import RequestId, ServerError
from .messages import PROTOCOL_VERSION, STT_BACKEND


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
    turn: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`mode_ready` echoing the effective session settings (`turn`: turn_detection and its settings)."""
    return _with_ids(
        {
            "type": "mode_ready",
            "mode": mode,
            "call_id": call_id,
            "segment_energy_threshold": segment_energy_threshold,
            "segment_silence_ms": segment_silence_ms,
            "output_encoding": output_encoding,
            "output_sample_rate_hz": output_sample_rate_hz,
            **(turn or {}),
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
