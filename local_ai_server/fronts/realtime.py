"""OpenAI Realtime API (`/v1/realtime`): client events in, calls on the voice core, GA server events out.

The core listens in its "stt" mode: it segments and transcribes, and this front decides when a response
is made (server_vad's create_response, or the client's response.create); realtime_respond runs each
response, and the function calls it makes.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..errors import ProtocolError, RequestId, ServerError
from ..hub import Hub
from ..outbox import ConnectionOutbox
from ..session import Session
from ..tasks import TaskOwner
from ..tool_decl import Tool
from ..vad import SegmenterSettings
from ..voice.call import Call
from ..voice.events import Event, Failure, Transcribed, VoiceActivity
from ..voice.guess import Guess
from ..voice.turn import Turn
from . import realtime_render as R
from . import realtime_tools as T
from .realtime_input import CORE_OUT, ManualBuffer, core_input, to_16k
from .realtime_items import Conversation, Item
from .realtime_parse import (
    EAGERNESS_THRESHOLD,
    AudioAppend,
    AudioClear,
    AudioCommit,
    ClientEvent,
    FunctionOutput,
    Invalid,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    Limits,
    OutputAudioClear,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    decode,
    event_id_of,
    parse,
)
from .realtime_respond import Responses

log = structlog.get_logger(__name__)

BIG_FRAME = 256 * 1024  # text frames longer than this are JSON-decoded on a thread
BIG_AUDIO_B64 = 64 * 1024  # base64 audio longer than this is decoded on a thread
MAX_BUFFER_S = 120.0  # audio a manual turn may hold before its commit
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms
KEEP_ITEMS = 64  # utterances remembered between speech_stopped and their transcript

Closer = Callable[[int, str], Awaitable[None]]


class RealtimeFront:
    """One Realtime connection: a session, its conversation as the core's history, one response at a time."""

    def __init__(self, hub: Hub, session: Session, outbox: ConnectionOutbox, tasks: TaskOwner, close: Closer,
                 remote: str | None = None, model: str | None = None) -> None:
        self.hub = hub
        self.session = session
        self.out = outbox
        self.remote = remote
        self._close = close
        self.ids = R.Ids()
        self.limits = Limits(max_text_chars=hub.cfg.max_text_chars)
        self.cfg = SessionConfig()
        status = hub.engines.model_status()
        self.about = R.About(session_id=self.ids.new("sess"), model=model or status["llm"]["display"] or "local",
                             voice=status["tts"]["display"] or "none",
                             transcription_model=status["stt"]["display"] or "none")
        self.vad = R.VadDefaults(hub.cfg.stt.vad_threshold, SegmenterSettings().preroll_ms, hub.cfg.stt.silence_ms)
        session.mode = "stt"  # the core transcribes; this front decides when to answer
        session.authenticated = True  # the handshake was checked (server.py)
        self.call = Call(session, hub.engines, R.ForwardingSink(self.on_core_event), hub.cfg, hub.metrics, tasks)
        self.conv = Conversation(session)  # the items, and what the user texts waiting for a response are
        self.responses = Responses(self.ids, session, self.call, outbox, self._next_response, self.conv)
        self._respond_after = False  # a turn ended while a response ran: answer it when that one is done
        self._vad_item: str | None = None  # the utterance in progress
        self._partial = ""  # its transcript as sent in deltas
        self._awaiting: collections.deque[str] = collections.deque(maxlen=KEEP_ITEMS)  # stopped, not transcribed
        self._manual = ManualBuffer(MAX_BUFFER_S)
        self._closed = False
        self._answer_final = False  # the final just transcribed calls for a response: heard() (next) starts it
        self._guesses: dict[Turn, SessionConfig] = {}  # responses' turns started early, with the settings then
        self.call.answer_stt_with(self)  # server_vad responses may start early (held) on the early transcript
        self._apply_session()
        self._send(self._event("session.created", session=self._session_object()))
        log.info("realtime.session_open", session=session.id, remote=remote, model=self.about.model)

    # ------------------------------------------------------------------ frames in

    async def on_frame(self, frame: str | bytes) -> None:
        """One client event: applied and answered, or answered with an `error` and nothing changed."""
        obj: dict[str, Any] | None = None
        try:
            if isinstance(frame, bytes):
                raise Invalid("binary frames are not supported: send JSON events", code="invalid_event")
            obj = (await self.hub.engines.run_aux(decode, frame)) if len(frame) > BIG_FRAME else decode(frame)
            await self._dispatch(parse(obj, self.limits))
        except Invalid as err:
            err.event_id = err.event_id or (event_id_of(obj) if obj else None)
            self._error(R.invalid(self.ids, err))
        except ServerError as err:
            self.hub.metrics.errors.labels(err.code).inc()
            kind = "invalid_request_error" if isinstance(err, ProtocolError) else "server_error"
            self._error(R.error(self.ids, err.message, code=err.code, kind=kind,
                                client_event_id=event_id_of(obj) if obj else None))
        except Exception:  # noqa: BLE001 - every failure is answered, none ends the session
            log.error("realtime.event_failed", session=self.session.id, exc_info=True)
            self._error(R.error(self.ids, "internal error while handling the event", code="internal",
                                kind="server_error", client_event_id=event_id_of(obj) if obj else None))

    def between_turns(self) -> bool:
        """Idle (a draining server may close it): no response running or due, no output or audio held, all sent."""
        r = self.responses
        return (r.active is None and not r.fn.waiting and not r.fn.awaiting_output and not self._respond_after
                and self._manual.seconds == 0 and self._vad_item is None and not self._awaiting
                and self.call.between_turns() and self.out.idle)

    async def close(self) -> None:
        """The connection ended: end the call and everything it started."""
        self._closed = self.responses.closed = True
        await self.call.close()

    async def _dispatch(self, ev: ClientEvent) -> None:
        if isinstance(ev, SessionUpdate):
            before = self.cfg
            self.cfg = ev.patch.apply(before)
            if (before.turn_detection is None) != (self.cfg.turn_detection is None):
                self._reset_input()  # audio taken for one way of turn-taking is not carried into the other
            self._apply_session()
            self._send(self._event("session.updated", session=self._session_object()))
        elif isinstance(ev, AudioAppend):
            await self._append(ev)
        elif isinstance(ev, AudioCommit):
            await self._commit(ev)
        elif isinstance(ev, AudioClear):
            self._reset_input()
            self._send(self._event("input_audio_buffer.cleared"))
        elif isinstance(ev, ItemCreate):
            item_id = self.ids.new("item")
            self._added(R.user_item(item_id, text=ev.text), "message")
            self.conv.user(item_id, ev.text)
        elif isinstance(ev, FunctionOutput):
            item_id = self.ids.new("item")
            name = self.responses.fn.output(ev, item_id)  # an unknown call_id is refused here, nothing is added
            self._added(T.function_output_item(item_id, ev), "function_call_output")
            self.conv.output(item_id, T.remembered_output(name, ev.output))
        elif isinstance(ev, ResponseCreate):
            if self.responses.active is not None:
                raise Invalid(f"the conversation already has an active response ({self.responses.active.id})",
                              code="conversation_already_has_active_response", event_id=ev.event_id)
            tools, choice = ev.tools if ev.tools is not None else self.cfg.tools, ev.tool_choice or self.cfg.tool_choice
            T.check_choice(tools, choice, "response.tool_choice")
            self._start_response(ev.instructions, ev.audio_output, ev.out_of_band, tools, choice)
        elif isinstance(ev, ResponseCancel):
            resp = self.responses.active
            if resp is None or (ev.response_id is not None and ev.response_id != resp.id):
                raise Invalid("there is no active response to cancel", code="response_cancel_not_active",
                              param="response_id", event_id=ev.event_id)
            self.responses.cancel("client_cancelled")
        elif isinstance(ev, ItemTruncate):
            item = self.conv.check_truncate(ev.item_id, ev.content_index, ev.audio_end_ms, ev.event_id)
            self._editing(item)
            self.conv.truncate(item, ev.audio_end_ms)
            self._send(self._event("conversation.item.truncated", item_id=ev.item_id, content_index=ev.content_index,
                                   audio_end_ms=ev.audio_end_ms))
        elif isinstance(ev, ItemDelete):
            item = self.conv.find(ev.item_id, "delete", ev.event_id)
            self._editing(item)
            self.conv.delete(item)
            if item.call_id is not None:
                self.responses.fn.forget(item.call_id)  # its output is refused from now on
            self.responses.fn.drop(item.id)  # an output waiting for a response
            self._send(self._event("conversation.item.deleted", item_id=ev.item_id))
        elif isinstance(ev, OutputAudioClear):
            rid = self.responses.mute()
            if rid is None:
                raise Invalid("there is no response audio to clear", code="response_audio_not_active",
                              event_id=ev.event_id)
            self._send(self._event("output_audio_buffer.cleared", response_id=rid))

    def _editing(self, item: Item) -> None:
        """An item is deleted or truncated: the response making it ends first (its end is sent before the edit's
        answer), and an early answer started on the conversation as it was is dropped at its final."""
        if item.response is not None and item.response is self.responses.active:
            self.responses.cancel("client_cancelled")
        self._guesses.clear()

    # ------------------------------------------------------------------ session

    def _session_object(self) -> dict[str, Any]:
        return R.session_object(self.cfg, self.about, self.vad)

    def _apply_session(self) -> None:
        """The session's settings onto the core's session: prompt, output format, segmentation."""
        s, td = self.session, self.cfg.turn_detection
        s.system_prompt = self.cfg.instructions
        s.output_encoding, s.output_sample_rate_hz = CORE_OUT[self.cfg.output_format]
        s.segment_silence_ms = td.silence_duration_ms if td is not None else None
        s.segment_vad_threshold = td.threshold if td is not None else None
        s.segment_preroll_ms = td.prefix_padding_ms if td is not None else None
        semantic = td is not None and td.eagerness is not None  # semantic_vad: the turn detector
        s.turn_detection = "smart" if semantic else "vad"
        s.turn_threshold = EAGERNESS_THRESHOLD[td.eagerness] if td is not None and td.eagerness else None
        self.call.settings_changed()

    # ------------------------------------------------------------------ input audio

    async def _append(self, ev: AudioAppend) -> None:
        raw = (await self.hub.engines.run_aux(ev.audio)) if len(ev.audio_b64) > BIG_AUDIO_B64 else ev.audio()
        payload, fmt, rate = core_input(self.cfg.input_format, raw)
        if fmt == "pcm16le" and len(payload) % 2:
            raise Invalid("audio/pcm audio must have an even number of bytes", param="audio", event_id=ev.event_id)
        if self.cfg.turn_detection is not None:
            self.call.accept_audio(payload, fmt, rate, ev.event_id)
        elif not self._manual.add(payload, fmt, rate):
            raise Invalid(f"the input audio buffer holds at most {MAX_BUFFER_S:g} s: commit it first",
                          code="input_audio_buffer_full", param="audio", event_id=ev.event_id)

    async def _commit(self, ev: AudioCommit) -> None:
        if self.cfg.turn_detection is not None:
            raise Invalid("with server_vad turn detection the server commits the audio itself; set "
                          "turn_detection to null to commit by hand", param="type", event_id=ev.event_id)
        seconds = self._manual.seconds
        if seconds < MIN_COMMIT_S:
            raise Invalid(f"buffer too small: at least {MIN_COMMIT_S * 1000:g} ms of audio is needed, "
                          f"{seconds * 1000:.0f} ms are buffered", code="input_audio_buffer_commit_empty",
                          event_id=ev.event_id)
        segments = self._manual.take()
        item_id = self._committed(self.ids.new("item"))
        # Transcribed before the next event is read: a response.create right after the commit answers it.
        engines = self.hub.engines
        try:
            audio = await engines.run_aux(to_16k, segments)
            text = (await engines.transcribe(audio, "final")).text.strip()
        except ServerError as err:
            self._heard(item_id, "", err.code, err.message)
            return
        log.info("realtime.committed", session=self.session.id, audio_s=round(seconds, 2), chars=len(text))
        self._heard(item_id, text)

    def _reset_input(self) -> None:
        self._manual.clear()
        self.call.stop_speech()
        self._vad_item, self._partial = None, ""

    def _committed(self, item_id: str) -> str:
        """input_audio_buffer.committed and the user item it becomes (its transcript still to come)."""
        previous = self.conv.add(Item(item_id, "message", "user"))
        self._send(self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id))
        self._send(self._event("conversation.item.added", previous_item_id=previous,
                               item=R.user_item(item_id, transcript=None, status="in_progress")))
        return item_id

    def _heard(self, item_id: str, text: str, code: str | None = None, message: str = "") -> None:
        """A user audio item's transcript (or why there is none)."""
        if code is not None:
            self._send(self._event("conversation.item.input_audio_transcription.failed", item_id=item_id,
                                   content_index=0, error={"type": "server_error", "code": code, "message": message}))
        else:
            self._send(self._event("conversation.item.input_audio_transcription.completed", item_id=item_id,
                                   content_index=0, transcript=text, usage={"type": "duration", "seconds": 0}))
        self._send(self._event("conversation.item.done", previous_item_id=None,
                               item=R.user_item(item_id, transcript=text)))
        self.conv.user(item_id, text)

    # ------------------------------------------------------------------ what the core says

    def on_core_event(self, event: Event, turn: Turn | None) -> None:
        """One core event as Realtime events, for the response (or the user item) it belongs to."""
        if self._closed:
            return
        if self.responses.on_event(event, turn):
            return
        if isinstance(event, Transcribed):
            self._transcribed(event)
        elif isinstance(event, VoiceActivity):
            self._voice_activity(event)
        elif isinstance(event, Failure):
            # Not of a response: an audio frame refused, an utterance cut at the cap, an engine error.
            err = event.error
            rid = err.request_id if isinstance(err.request_id, str) else None
            kind = "invalid_request_error" if isinstance(err, ProtocolError) else "server_error"
            self._error(R.error(self.ids, err.message, code=err.code, kind=kind, client_event_id=rid))

    def _voice_activity(self, ev: VoiceActivity) -> None:
        td = self.cfg.turn_detection
        if ev.started:
            self._vad_item, self._partial = self.ids.new("item"), ""
            self._send(self._event("input_audio_buffer.speech_started", audio_start_ms=ev.audio_ms,
                                   item_id=self._vad_item))
            if td is not None and td.interrupt_response:
                self.responses.cancel("turn_detected")
        elif self._vad_item is not None:
            self._send(self._event("input_audio_buffer.speech_stopped", audio_end_ms=ev.audio_ms,
                                   item_id=self._vad_item))
            if ev.transcribed:
                self._awaiting.append(self._vad_item)
            self._vad_item, self._partial = None, ""

    def _transcribed(self, ev: Transcribed) -> None:
        if not ev.final:
            # Partials re-transcribe the whole utterance: only a continuation of what was sent is a delta.
            text = ev.text
            if self._vad_item is not None and text.startswith(self._partial) and len(text) > len(self._partial):
                delta, self._partial = text[len(self._partial):], text
                self._send(self._event("conversation.item.input_audio_transcription.delta", item_id=self._vad_item,
                                       content_index=0, delta=delta))
            return
        if not self._awaiting:
            if ev.error is not None:  # audio arrived, and there is no model to hear it
                self._error(R.error(self.ids, "no speech-to-text model is loaded: the audio is not transcribed",
                                    code=ev.error, kind="server_error"))
            return  # else the idle flush of a stream with nothing said
        item_id = self._committed(self._awaiting.popleft())
        if ev.error is not None:
            self._heard(item_id, "", ev.error, "speech could not be transcribed: no speech-to-text model is loaded")
            return
        self._heard(item_id, ev.text.strip())
        td = self.cfg.turn_detection
        # The core calls heard() right after this event, with the response's turn if it started early.
        self._answer_final = td is not None and td.create_response and bool(ev.text.strip())

    # ------------------------------------------------------------------ the core's early answers (SttAnswers)

    def guess(self, text: str, request_id: RequestId) -> Turn | None:
        """Start the response to an utterance still in its end-of-utterance silence, held; None if not now."""
        td = self.cfg.turn_detection
        if self._closed or td is None or not td.create_response or self.conv.pending or self.responses.active:
            return None  # the response would not be (only) to these words, or not now
        turn = self.responses.guess(text, audio=self.cfg.audio_output, tools=self.cfg.tools,
                                    choice=self.cfg.tool_choice)
        if turn is not None:
            self._guesses = {t: c for t, c in self._guesses.items() if not t.cancelled}
            self._guesses[turn] = self.cfg
        return turn

    def heard(self, text: str, request_id: RequestId, guess: Guess | None) -> None:
        """A final (after its Transcribed): the response to it, taking its early turn if nothing changed since."""
        answer, self._answer_final = self._answer_final, False
        settings = self._guesses.pop(guess.turn, None) if guess is not None else None
        if guess is not None and not (answer and settings is self.cfg and self.conv.pending_texts == [text]
                                      and self.responses.active is None):
            self.call.drop_guess(guess)
            guess = None
        if not answer:
            return
        if self.responses.active is not None:
            self._respond_after = True  # interrupt_response is off: this turn is answered next
        else:
            self._start_response(None, None, False, guess=guess)

    # ------------------------------------------------------------------ responses

    def _start_response(self, instructions: str | None, audio_output: bool | None, out_of_band: bool,
                        tools: tuple[Tool, ...] | None = None, choice: T.ToolChoice | None = None,
                        guess: Guess | None = None) -> None:
        user_text, item_id, previous = "\n".join(self.conv.pending_texts), self.ids.new("item"), None
        if not out_of_band:  # the response (Responses.start) takes the waiting user texts into its exchange
            previous = self.conv.add(Item(item_id, "message", "assistant"))
        self._respond_after = False
        self.responses.start(user_text, item_id, previous, audio=self.cfg.audio_output if audio_output is None
                             else audio_output, output_format=self.cfg.output_format, instructions=instructions,
                             out_of_band=out_of_band, tools=self.cfg.tools if tools is None else tools,
                             choice=choice or self.cfg.tool_choice, guess=guess)

    def _next_response(self) -> None:
        if self._respond_after and self.conv.pending:
            self._start_response(None, None, False)

    # ------------------------------------------------------------------ out

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": self.ids.new("event"), **fields}

    def _send(self, msg: dict[str, Any]) -> None:
        self.out.send_data(msg)

    def _error(self, msg: dict[str, Any]) -> None:
        log.info("realtime.error", session=self.session.id, code=msg["error"]["code"], param=msg["error"]["param"])
        self.out.send_control(msg)

    def _added(self, item: dict[str, Any], kind: str) -> None:
        """A client's item, added to the conversation (and done: it is whole)."""
        previous = self.conv.add(Item(item["id"], kind, "user"))
        self._send(self._event("conversation.item.added", previous_item_id=previous, item=item))
        self._send(self._event("conversation.item.done", previous_item_id=previous, item=item))
