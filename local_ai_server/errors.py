"""One exception hierarchy for the server; each class carries its wire error code."""

from __future__ import annotations

# Echoed to clients exactly as they sent it (AVA matches replies by equality).
RequestId = str | int | None


class ServerError(Exception):
    """Base of every error the server turns into an `error` message on the wire."""

    code: str = "internal"

    def __init__(self, message: str, *, request_id: RequestId = None, call_id: str | None = None) -> None:
        super().__init__(message)
        # The message is sent to clients verbatim: it must never hold paths or tracebacks.
        self.message = message
        self.request_id = request_id
        self.call_id = call_id


class ProtocolError(ServerError):
    """A client message that cannot be accepted as it is."""

    code = "invalid_field"


class InvalidJson(ProtocolError):
    """A text frame that is not JSON, or JSON that is not an object."""

    code = "invalid_json"


class UnknownType(ProtocolError):
    """A message whose `type` the server does not know."""

    code = "unknown_type"


class InvalidField(ProtocolError):
    """A missing, mistyped or out-of-range field."""

    code = "invalid_field"


class PayloadTooLarge(ProtocolError):
    """A text or audio payload over its configured limit."""

    code = "payload_too_large"


class UnsupportedAudio(ProtocolError):
    """Audio in a format, rate or shape the server does not accept."""

    code = "unsupported_audio"


class NotReady(ServerError):
    """The model a request needs is not loaded (yet, or at all)."""

    code = "not_ready"


class Busy(ServerError):
    """The LLM queue is full."""

    code = "busy"


class Cancelled(ServerError):
    """The work was cancelled (barge-in, new utterance, disconnect)."""

    code = "cancelled"


class Timeout(ServerError):
    """The work took longer than its configured limit."""

    code = "timeout"


class EngineError(ServerError):
    """An engine failed (a worker died, a model raised)."""

    code = "engine_error"


class ModelLoadError(EngineError):
    """A model file could not be loaded."""

    code = "engine_error"


def describe(exc: BaseException) -> str:
    """An exception as one short line without file paths (such text may reach clients)."""
    if isinstance(exc, FileNotFoundError):
        return "model file not found"
    text = str(exc).split("\n", 1)[0]
    if "/" in text or not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


ERROR_CODES: tuple[str, ...] = (
    "invalid_json",
    "unknown_type",
    "invalid_field",
    "payload_too_large",
    "unsupported_audio",
    "not_ready",
    "busy",
    "cancelled",
    "timeout",
    "engine_error",
    "internal",
)
