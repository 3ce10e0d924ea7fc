"""OpenAI Realtime server events (GA names and shapes), built from the front's state (pure, no I/O)."""

from __future__ import annotations

import base64
import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..audio import alaw_encode
from ..errors import RequestId
from ..voice.events import Event
from ..voice.turn import Turn
from .realtime_parse import FORMATS, Invalid, SessionConfig
from .realtime_tools import function_call_item, tools_wire

# Raw audio per response.output_audio.delta: 200 ms, so a client may start playing before a sentence ends.
DELTA_MS = 200


class Ids:
    """Ids unique on a connection (a counter) and, with a random tag, across connections."""

    def __init__(self) -> None:
        self._tag = secrets.token_hex(5)
        self._n = itertools.count(1)

    def new(self, prefix: str) -> str:
        """A fresh id such as event_…, item_…, resp_…"""
        return f"{prefix}_{self._tag}{next(self._n):06x}"


@dataclass(frozen=True)
class VadDefaults:
    """The server's segmentation defaults, reported where the client leaves a field unset."""

    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int


@dataclass(frozen=True)
class About:
    """What the session object says of the server: its id, the model asked for, the voice, the STT model."""

    session_id: str
    model: str
    voice: str
    transcription_model: str


def error(ids: Ids, message: str, *, code: str, param: str | None = None, client_event_id: str | None = None,
          kind: str = "invalid_request_error") -> dict[str, Any]:
    """An `error` event in OpenAI's shape (the session goes on)."""
    return {"type": "error", "event_id": ids.new("event"),
            "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": client_event_id}}


def invalid(ids: Ids, err: Invalid) -> dict[str, Any]:
    """A rejected client event as its `error`."""
    return error(ids, err.message, code=err.code, param=err.param, client_event_id=err.event_id)


def format_object(kind: str) -> dict[str, Any]:
    """An audio format as the session reports it."""
    return {"type": kind, "rate": FORMATS[kind]}


def session_object(cfg: SessionConfig, about: About, vad: VadDefaults) -> dict[str, Any]:
    """The session as session.created / session.updated report it: every value is the one in effect."""
    td = cfg.turn_detection
    turn_detection = None if td is None else {
        "type": "semantic_vad", "eagerness": td.eagerness, "create_response": td.create_response,
        "interrupt_response": td.interrupt_response,
    } if td.eagerness is not None else {
        "type": "server_vad",
        "threshold": td.threshold if td.threshold is not None else vad.threshold,
        "prefix_padding_ms": td.prefix_padding_ms if td.prefix_padding_ms is not None else vad.prefix_padding_ms,
        "silence_duration_ms": (td.silence_duration_ms if td.silence_duration_ms is not None
                                else vad.silence_duration_ms),
        "idle_timeout_ms": None,
        "create_response": td.create_response,
        "interrupt_response": td.interrupt_response,
    }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": about.session_id,
        "model": about.model,
        "output_modalities": ["audio"] if cfg.audio_output else ["text"],
        "instructions": cfg.instructions or "",
        "tools": tools_wire(cfg.tools),
        "tool_choice": cfg.tool_choice.wire(),
        "max_output_tokens": "inf",
        "tracing": None,
        "prompt": None,
        "expires_at": 0,
        "include": None,
        "audio": {
            "input": {"format": format_object(cfg.input_format), "noise_reduction": None,
                      "transcription": {"model": about.transcription_model, "language": None, "prompt": None},
                      "turn_detection": turn_detection},
            "output": {"format": format_object(cfg.output_format), "voice": about.voice, "speed": 1.0},
        },
    }


def user_item(item_id: str, *, text: str | None = None, transcript: str | None = None,
              status: str = "completed") -> dict[str, Any]:
    """A user message: typed text, or audio with its transcript (None until transcribed)."""
    part = ({"type": "input_text", "text": text} if text is not None
            else {"type": "input_audio", "transcript": transcript})
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
            "content": [part]}


def assistant_item(item_id: str, audio: bool, text: str | None, status: str) -> dict[str, Any]:
    """The assistant message a response produces (content empty until its part is added)."""
    content: list[dict[str, Any]] = []
    if text is not None:
        content = [{"type": "output_audio", "transcript": text} if audio else {"type": "output_text", "text": text}]
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content}


class TextDeltas:
    """Streamed text made tidy: no leading whitespace, trailing whitespace held back until more text follows.

    What was sent always joins to `text`, which is what the `.done` event carries.
    """

    def __init__(self) -> None:
        self.text = ""
        self._held = ""

    def push(self, delta: str) -> str:
        """The piece to send now for `delta` ("" when there is nothing to send yet)."""
        piece = self._held + delta
        if not self.text:
            piece = piece.lstrip()
        stripped = piece.rstrip()
        self._held = piece[len(stripped):]
        self.text += stripped
        return stripped


def audio_chunks(payload: bytes, output_format: str) -> list[str]:
    """Speech from the core (linear16 or mu-law at the format's rate) as base64 deltas of DELTA_MS each."""
    if output_format == "audio/pcma":
        payload = alaw_encode(payload)  # the core spoke linear16 at 8 kHz for it
    width = 2 if output_format == "audio/pcm" else 1
    step = FORMATS[output_format] * width * DELTA_MS // 1000
    return [base64.b64encode(payload[i:i + step]).decode("ascii") for i in range(0, len(payload), step)]


@dataclass
class Response:
    """One response in flight: its ids, what it has sent, and the events that open, stream and close it."""

    ids: Ids
    id: str
    item_id: str
    audio: bool
    output_format: str
    out_of_band: bool = False
    user_text: str = ""
    previous_item_id: str | None = None  # the conversation item before its output item
    deltas: TextDeltas = field(default_factory=TextDeltas)
    output_tokens: int = 0
    audio_bytes: int = 0
    closed: bool = False
    item_open: bool = False  # its message item was added (a response that became a function call has none)
    output_item: dict[str, Any] | None = None  # the function call it made instead
    history_key: RequestId = None  # the request id its exchange carries in the core's history
    spoken: list[tuple[str, float]] = field(default_factory=list)  # (sentence, ms) of each speech chunk sent
    muted: bool = False  # output_audio_buffer.clear: none of its audio is sent any more
    usage: dict[str, int] = field(default_factory=dict)  # the engine's counts for its answer (Answer.usage)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A server event of this response, with a fresh event_id."""
        return {"type": kind, "event_id": self.ids.new("event"), **fields}

    def _part(self, **fields: Any) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0, **fields}

    def _content(self) -> dict[str, Any]:
        text = self.deltas.text
        return {"type": "audio", "transcript": text} if self.audio else {"type": "text", "text": text}

    def body(self, status: str, details: dict[str, Any] | None = None, *, with_output: bool = False) -> dict[str, Any]:
        """The response object, as response.created and response.done carry it."""
        output = []
        if with_output and self.output_item is not None:
            output = [self.output_item]
        elif with_output and self.item_open:
            output = [assistant_item(self.item_id, self.audio, self.deltas.text,
                                     "completed" if status == "completed" else "incomplete")]
        # The input is text (the caller's words are transcribed); audio is spoken from the text, no tokens.
        inp, cached = self.usage.get("input_tokens", 0), self.usage.get("cached_tokens", 0)
        out = self.usage.get("output_tokens", self.output_tokens)
        usage = {"total_tokens": inp + out, "input_tokens": inp, "output_tokens": out,
                 "input_token_details": {"cached_tokens": cached, "text_tokens": inp, "audio_tokens": 0,
                                         "image_tokens": 0,
                                         "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0,
                                                                   "image_tokens": 0}},
                 "output_token_details": {"text_tokens": out, "audio_tokens": 0}}
        return {"id": self.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output, "conversation_id": None if self.out_of_band else "conv_default",
                "output_modalities": ["audio"] if self.audio else ["text"],
                "audio": {"output": {"format": format_object(self.output_format)}} if self.audio else None,
                "max_output_tokens": "inf", "metadata": None,
                "usage": usage if status != "in_progress" else None}

    def opening(self, previous_item_id: str | None) -> list[dict[str, Any]]:
        """response.created up to the content part the deltas go into."""
        return [self.created(), *self.message_opening(previous_item_id)]

    def created(self) -> dict[str, Any]:
        """response.created (its output item follows once it is known: a message or a function call)."""
        return self.event("response.created", response=self.body("in_progress"))

    def message_opening(self, previous_item_id: str | None) -> list[dict[str, Any]]:
        """The assistant message item and its content part, which the deltas go into."""
        self.item_open = True
        item = assistant_item(self.item_id, self.audio, None, "in_progress")
        events = [self.event("response.output_item.added", response_id=self.id, output_index=0, item=item)]
        if not self.out_of_band:
            events.append(self.event("conversation.item.added", previous_item_id=previous_item_id, item=item))
        part = {"type": "audio", "transcript": ""} if self.audio else {"type": "text", "text": ""}
        events.append(self.event("response.content_part.added", **self._part(part=part)))
        return events

    def text_delta(self, delta: str, tokens: int) -> dict[str, Any] | None:
        """A token's text as a transcript (or text) delta; None when nothing is to be sent yet."""
        self.output_tokens += tokens
        piece = self.deltas.push(delta)
        if not piece:
            return None
        kind = "response.output_audio_transcript.delta" if self.audio else "response.output_text.delta"
        return self.event(kind, **self._part(delta=piece))

    @property
    def audio_ms(self) -> float:
        """How long the audio it sent plays."""
        return sum(ms for _, ms in self.spoken)

    def audio_deltas(self, payload: bytes, text: str = "", ms: float = 0.0) -> list[dict[str, Any]]:
        """A chunk of speech (`ms` of it, saying `text`) as audio deltas."""
        self.audio_bytes += len(payload)
        self.spoken.append((text, ms))
        return [self.event("response.output_audio.delta", **self._part(delta=b64))
                for b64 in audio_chunks(payload, self.output_format)]

    def closing(self, status: str, details: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Everything that ends the response, response.done last; `status` completed, cancelled or failed."""
        self.closed = True
        if not self.item_open:  # ended while its tools were being decided: no output item was added
            return [self.event("response.done", response=self.body(status, details, with_output=True))]
        item_status = "completed" if status == "completed" else "incomplete"
        text = self.deltas.text
        events = []
        if self.audio:
            events += [self.event("response.output_audio.done", **self._part()),
                       self.event("response.output_audio_transcript.done", **self._part(transcript=text))]
        else:
            events.append(self.event("response.output_text.done", **self._part(text=text)))
        item = assistant_item(self.item_id, self.audio, text, item_status)
        events += [self.event("response.content_part.done", **self._part(part=self._content())),
                   self.event("response.output_item.done", response_id=self.id, output_index=0, item=item)]
        if not self.out_of_band:
            events.append(self.event("conversation.item.done", item=item))
        events.append(self.event("response.done", response=self.body(status, details, with_output=True)))
        return events


    def function_call(self, previous_item_id: str | None, call_id: str, name: str,
                      parameters: dict[str, Any]) -> list[dict[str, Any]]:
        """This response's output as one function call, from its output item to response.done (it closes it)."""
        arguments = json.dumps(parameters, ensure_ascii=False)
        part = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "call_id": call_id}
        added = function_call_item(self.item_id, call_id, name, "", "in_progress")
        done = function_call_item(self.item_id, call_id, name, arguments, "completed")
        self.closed, self.output_item = True, done
        events = [self.event("response.output_item.added", response_id=self.id, output_index=0, item=added)]
        if not self.out_of_band:
            events.append(self.event("conversation.item.added", previous_item_id=previous_item_id, item=added))
        # The grammar-held decision comes whole: its arguments are one delta.
        events += [self.event("response.function_call_arguments.delta", **part, delta=arguments),
                   self.event("response.function_call_arguments.done", **part, name=name, arguments=arguments),
                   self.event("response.output_item.done", response_id=self.id, output_index=0, item=done)]
        if not self.out_of_band:
            events.append(self.event("conversation.item.done", item=done))
        events.append(self.event("response.done", response=self.body("completed", with_output=True)))
        return events


def rate_limits(ids: Ids, max_output_tokens: int) -> dict[str, Any]:
    """rate_limits.updated as a response starts: the limits this server really has, none made up.

    `requests`: one response in progress per connection, which this one now holds; `tokens`: what one
    response may generate, each response with a budget of its own. Neither has a time window (reset 0).
    """
    return {"type": "rate_limits.updated", "event_id": ids.new("event"), "rate_limits": [
        {"name": "requests", "limit": 1, "remaining": 0, "reset_seconds": 0.0},
        {"name": "tokens", "limit": max_output_tokens, "remaining": max_output_tokens, "reset_seconds": 0.0}]}


def cancelled_details(reason: str) -> dict[str, Any]:
    """status_details of a cancelled response: client_cancelled or turn_detected."""
    return {"type": "cancelled", "reason": reason}


def failed_details(code: str, message: str) -> dict[str, Any]:
    """status_details of a failed response."""
    return {"type": "failed", "error": {"type": "server_error", "code": code, "message": message}}


class ForwardingSink:
    """A call's sink that hands every core event, with its turn, to the front that knows its response."""

    def __init__(self, handle: Callable[[Event, Turn | None], None]) -> None:
        self.handle = handle

    def control(self, event: Event) -> None:
        """Errors (the core's failures and cancellations)."""
        self.handle(event, None)

    def data(self, event: Event, turn: Turn | None = None) -> None:
        """Transcripts, voice activity, tokens, speech, answers, in order."""
        self.handle(event, turn)

    def discard_speech(self) -> int:
        """Nothing to drop: a cancelled response's queued deltas are dropped by the outbox (its turn is cancelled)."""
        return 0
