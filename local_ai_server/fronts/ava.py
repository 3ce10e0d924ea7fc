"""AVA protocol v2 (the local_ai_server protocol of AVA): frames in, calls on the voice core, messages out."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

import structlog

from .. import protocol as P
from ..admission import CLOSE_FULL, FULL_MESSAGE
from ..errors import Busy, InvalidField, RequestId, ServerError
from ..hub import Hub
from ..outbox import ConnectionOutbox
from ..session import DEFAULT_CALL_ID, Session
from ..tasks import TaskOwner
from ..voice.call import Call
from . import ava_reports
from .ava_render import AvaSink

log = structlog.get_logger(__name__)

# Text frames longer than this are JSON-decoded on a thread (a whole-utterance base64 frame is megabytes).
BIG_FRAME = 256 * 1024
# A base64 audio field longer than this is decoded on a thread.
BIG_AUDIO_B64 = 64 * 1024
MAX_AUTH_FAILURES = 3
# The messages that make a connection a call (and so need one of the box's places): every request for work.
# auth, status and the reports, barge_in and model switches never do: a monitor is never refused.
CALL_WORK = (P.Audio, P.LlmRequest, P.TtsRequest, P.SetMode, P.ToolContext, P.LlmToolRequest, P.ToolResult)

Closer = Callable[[int, str], Awaitable[None]]


class AvaFront:
    """One AVA connection: every frame parsed, dispatched to its call, and answered exactly once."""

    def __init__(self, hub: Hub, session: Session, outbox: ConnectionOutbox, tasks: TaskOwner, close: Closer,
                 remote: str | None = None) -> None:
        self.hub = hub
        self.session = session
        self.out = outbox
        self.remote = remote
        self._close = close
        self.limits = P.Limits(max_text_chars=hub.cfg.max_text_chars)
        self.call = Call(session, hub.engines, AvaSink(outbox, session), hub.cfg, hub.metrics, tasks)
        self.refused = False  # the box was full at this call's start: it is being closed

    async def on_frame(self, frame: str | bytes) -> None:
        """Handle one frame; whatever goes wrong becomes exactly one error reply with its request id."""
        msg: P.Message | None = None
        if self.refused:
            return  # it crossed our close frame
        try:
            msg = await self._parse(frame)
            if msg is not None and (not isinstance(msg, CALL_WORK)
                                    or await self._admitted(getattr(msg, "request_id", None))):
                await self._dispatch(msg)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, none ends the connection
            self._failed(msg, exc)

    async def close(self) -> None:
        """The connection ended: end the call and everything it started."""
        await self.call.close()

    def between_turns(self) -> bool:
        """Idle between turns (a draining server may close it): no utterance, nothing in flight, all sent."""
        return self.call.between_turns() and self.out.idle

    # ------------------------------------------------------------------ parsing

    def _failed(self, msg: P.Message | None, exc: BaseException) -> None:
        """The one answer to a request that failed: its own error reply where it has one, and the envelope."""
        if isinstance(exc, ServerError):
            err = exc
        else:
            log.error("message.failed", session=self.session.id, exc_info=exc)
            err = ServerError("internal error while handling the message")
        rid = getattr(msg, "request_id", None)
        if err.request_id is None:
            err.request_id = rid
        if isinstance(msg, P.SwitchModel) and msg.scope != "session":
            self.out.send_control(P.switch_response("error", err.message, changed=[], request_id=rid))
        elif isinstance(msg, P.Reload):
            self.out.send_control(P.reload_response("error", err.message, request_id=rid))
        self.call.error(err)

    async def _admitted(self, request_id: RequestId) -> bool:
        """Whether this connection's call has a place (taken at its first request for work).

        On a full box the call is refused at its start: an `error` `busy`, then close 1013 (try again later;
        through a load balancer another server answers). A call already admitted is never refused.
        """
        if self.hub.admit(self.session.id, "ava"):
            return True
        self.refused = True
        self.call.error(Busy(FULL_MESSAGE, request_id=request_id))
        await self.out.flush(2.0)  # the error goes out before the close frame
        await self._close(CLOSE_FULL, "server full")
        return False

    async def _parse(self, frame: str | bytes) -> P.Message | None:
        """A frame as a message (None when nothing is to be dispatched); raises ServerError for bad input."""
        metrics, engines = self.hub.metrics, self.hub.engines
        if isinstance(frame, bytes):
            metrics.messages.labels("binary").inc()
            if not self.session.authenticated:
                self.out.send_control(P.auth_response(False, "authentication_required"))
                return None
            if not await self._admitted(None):
                return None
            self.call.accept_audio(frame, None, None, None, binary=True)
            return None
        obj = (await engines.run_aux(P.decode_json, frame)) if len(frame) > BIG_FRAME else P.decode_json(frame)
        msg = P.parse_object(obj, self.limits)
        metrics.messages.labels(P.normalize_type(obj.get("type"))).inc()
        if not self.session.authenticated and not isinstance(msg, P.Auth):
            self.out.send_control(P.auth_response(False, "authentication_required", getattr(msg, "request_id", None)))
            return None
        return msg

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, msg: P.Message) -> None:
        s, call, out, hub = self.session, self.call, self.out, self.hub
        if isinstance(msg, P.Auth):
            await self._auth(msg)
        elif isinstance(msg, P.Audio):
            self._enter(msg.call_id, msg.mode)
            if msg.output_encoding is not None or msg.output_sample_rate_hz is not None:
                s.output_encoding, s.output_sample_rate_hz, _fb = s.output_format(msg.output_encoding,
                                                                                  msg.output_sample_rate_hz)
            data = msg.data_b64 or ""
            payload = (await hub.engines.run_aux(msg.payload)) if len(data) > BIG_AUDIO_B64 else msg.payload()
            call.accept_audio(payload, msg.format, msg.rate, msg.request_id)
        elif isinstance(msg, P.LlmRequest):
            self._enter(msg.call_id, msg.mode)
            if not msg.text.strip() and not msg.context:
                # An empty text asks to answer the context as it stands (AVA, after a tool ran).
                raise InvalidField("llm_request.text must not be empty", request_id=msg.request_id)
            call.start_turn(msg.text, kind="llm_request", request_id=msg.request_id, speak=False,
                            stream_tokens=msg.stream, context=msg.context)
        elif isinstance(msg, P.TtsRequest):
            self._enter(msg.call_id, msg.mode)
            if not msg.text.strip():
                raise InvalidField("tts_request.text must not be empty", request_id=msg.request_id)
            call.speak_text(msg.text, request_id=msg.request_id, encoding=msg.output_encoding,
                            rate=msg.output_sample_rate_hz)
        elif isinstance(msg, P.SetMode):
            self._set_mode(msg)
        elif isinstance(msg, P.BargeIn):
            cancelled = call.cancel_all(rollback=msg.rollback_assistant and msg.reason != "stop_session")
            if msg.reason == "stop_session":
                # The call is over; the connection stays open for the next one.
                call.stop_speech()
                s.reset_history()
                s.call_id = DEFAULT_CALL_ID
                hub.release(s.id)  # the call is over: its place is free; the next call here takes one again
            log.info("barge_in", session=s.id, call_id=msg.call_id or s.call_id, cancelled=cancelled,
                     reason=msg.reason, rollback=msg.rollback_assistant, history=len(s.history))
            out.send_control(P.barge_in_ack(call_id=msg.call_id or s.call_id, request_id=msg.request_id))
        elif isinstance(msg, P.Status):
            out.send_control(ava_reports.status_response(hub.engines, hub.cfg, sessions=hub.calls,
                                                         uptime_s=hub.uptime(), request_id=msg.request_id))
        elif isinstance(msg, P.Capabilities):
            out.send_control(ava_reports.capabilities_response(hub.engines, msg.request_id))
        elif isinstance(msg, P.Backends):
            out.send_control(ava_reports.backends_response(hub.engines, msg.request_id))
        elif isinstance(msg, P.BackendSchema):
            out.send_control(ava_reports.backend_schema_response(hub.engines, msg.backend_type,
                                                                 msg.backend_name, msg.request_id))
        elif isinstance(msg, P.SwitchModel):
            self._switch_model(msg)
        elif isinstance(msg, P.Reload):
            hub.admin(self._reload(msg), "Reload", msg.request_id, lambda exc: self._failed(msg, exc))
        elif isinstance(msg, P.ToolContext):
            self._adopt(msg.call_id)
            s.tools, s.allowed_tools, s.tool_policy = msg.tools, msg.allowed_tools, msg.tool_policy
            log.info("tool_context", session=s.id, call_id=s.call_id, tools=len(msg.tools),
                     allowed=list(msg.allowed_tools), policy=msg.tool_policy)
        elif isinstance(msg, P.LlmToolRequest):
            self._enter(msg.call_id, None)
            call.find_tools(text=msg.text, latest_user_text=msg.latest_user_text, tools=msg.tools,
                            allowed_tools=msg.allowed_tools, policy=msg.tool_policy, choice=msg.tool_choice,
                            request_id=msg.request_id)
        elif isinstance(msg, P.ToolResult):
            self._enter(msg.call_id, None)
            call.tool_result(tool_name=msg.tool_name, result=msg.result, is_error=msg.is_error,
                             request_id=msg.request_id, encoding=msg.output_encoding,
                             rate=msg.output_sample_rate_hz)

    def _set_mode(self, msg: P.SetMode) -> None:
        s = self.session
        self._adopt(msg.call_id)
        if msg.mode:
            s.mode = msg.mode
        if msg.segment_energy_threshold is not None:
            s.segment_energy_threshold = msg.segment_energy_threshold
        if msg.segment_silence_ms is not None:
            s.segment_silence_ms = msg.segment_silence_ms
        for key in ("turn_detection", "turn_threshold", "turn_short_ms", "turn_long_ms"):
            if getattr(msg, key) is not None:
                setattr(s, key, getattr(msg, key))
        if msg.output_encoding is not None or msg.output_sample_rate_hz is not None:
            s.output_encoding, s.output_sample_rate_hz, _fb = s.output_format(msg.output_encoding,
                                                                              msg.output_sample_rate_hz)
        self.call.settings_changed()
        enc, rate, _fb = s.output_format()  # what will be sent, never null (as AVA's server)
        self.out.send_control(P.mode_ready(
            mode=s.mode, call_id=s.call_id, segment_energy_threshold=s.segment_energy_threshold,
            segment_silence_ms=s.segment_silence_ms, output_encoding=enc, output_sample_rate_hz=rate,
            request_id=msg.request_id, turn=self.call.listener.turn_echo()))

    def _enter(self, call_id: str | None, mode: str | None) -> None:
        """A message's call_id and mode override the session's from now on."""
        self._adopt(call_id)
        if mode:
            self.session.mode = mode

    def _adopt(self, call_id: str | None) -> None:
        previous = self.session.call_id
        if self.session.adopt_call_id(call_id) and previous != DEFAULT_CALL_ID:
            # A new call on a reused connection: nothing of the previous call may leak into it.
            self.call.cancel_all()
            self.call.stop_speech()
            log.info("session.new_call", session=self.session.id, call_id=self.session.call_id)

    async def _auth(self, msg: P.Auth) -> None:
        s, token = self.session, self.hub.cfg.auth_token
        if token is None or hmac.compare_digest(msg.token.encode(), token.encode()):
            s.authenticated = True
            if msg.call_id:
                s.adopt_call_id(msg.call_id)
            self.out.send_control(P.auth_response(True, request_id=msg.request_id))
            return
        s.auth_failures += 1
        log.warning("auth.failed", session=s.id, failures=s.auth_failures, remote=self.remote)
        self.out.send_control(P.auth_response(False, "invalid_auth_token", msg.request_id))
        if s.auth_failures >= MAX_AUTH_FAILURES:
            await asyncio.sleep(0.05)  # let the reply go out first
            await self._close(1008, "too many failed authentication attempts")

    # ------------------------------------------------------------------ models

    def _switch_model(self, msg: P.SwitchModel) -> None:
        s = self.session
        if msg.scope != "session":
            self.hub.admin(self._switch_global(msg), "SwitchModel", msg.request_id, lambda exc: self._failed(msg, exc))
            return
        self._adopt(msg.call_id)
        changed = []
        if msg.system_prompt is not None:
            # dry_run only concerns model loading (as in AVA's server); a prompt is always applied.
            s.system_prompt = msg.system_prompt or None
            changed.append("system_prompt")
        self.out.send_control(P.switch_response(
            "success", "session system prompt updated" if changed else "nothing to change", changed=changed,
            request_id=msg.request_id, call_id=msg.call_id or s.call_id, scope="session"))

    async def _switch_global(self, msg: P.SwitchModel) -> None:
        """Global switch_model: the engines validate and load off the loop; one reply either way."""
        rid = msg.request_id
        try:
            status, message, changed = await self.hub.engines.switch_models(
                stt=msg.stt_model_path, llm=msg.llm_model_path, tts=msg.tts_model_path,
                system_prompt=msg.system_prompt, dry_run=msg.dry_run)
        except ServerError as err:
            log.warning("switch_model.failed", error=err.message)
            self._failed(msg, err)
            return
        self.out.send_control(P.switch_response(status, message, changed=changed, request_id=rid))

    async def _reload(self, msg: P.Reload) -> None:
        """reload_models / reload_llm: reload off the loop; one reply either way."""
        try:
            message = await self.hub.engines.reload(msg.what, msg.model_path)
        except ServerError as err:
            self._failed(msg, err)
            return
        self.out.send_control(P.reload_response("success", message, request_id=msg.request_id))

