"""The only module that knows websockets: handshake, HTTP probes, receive loop, writer, shutdown."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import signal
import ssl
import time
from http import HTTPStatus
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Origin

from . import protocol as P
from . import reports
from .config import ServerConfig
from .errors import Busy, InvalidField, ServerError
from .heap import malloc_trim
from .metrics import Metrics
from .outbox import ConnectionOutbox
from .pipeline import SessionRunner
from .runtime import FETCH_HINT, Engines
from .session import Session
from .tasks import TaskOwner

log = structlog.get_logger(__name__)

# Text frames longer than this are JSON-decoded on a thread (a whole-utterance base64 frame is megabytes).
BIG_FRAME = 256 * 1024
MAX_AUTH_FAILURES = 3
# Received frames a connection may have waiting to be handled, in bytes of the largest frame allowed.
RECEIVE_QUEUE_BYTES = 64 * 1024 * 1024
PROBES = ("/health", "/ready", "/metrics")
_session_ids = itertools.count(1)


class AnsweringProtocol(ServerProtocol):
    """websockets' server protocol, answering a request it cannot parse with 400 rather than a bare close."""

    def send_eof(self) -> None:
        if self.state is State.CONNECTING and isinstance(self.handshake_exc, InvalidMessage) and not self.writes:
            self.writes.append(self.reject(HTTPStatus.BAD_REQUEST, "malformed HTTP request\n").serialize())
        super().send_eof()


class GuardedConnection(ServerConnection):
    """A connection that cannot make the server hold more than its budget for a client that stops reading.

    websockets answers every ping with a pong written straight to the socket's buffer, outside any
    queue of ours: a client that floods pings and never reads would grow that buffer without end.
    """

    send_budget = 32 * 1024 * 1024  # set per server from ServerConfig.send_buffer_bytes
    outbox: ConnectionOutbox | None = None

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        # Nothing has been parsed yet: the protocol can still change its class (it adds no state).
        protocol.__class__ = AnsweringProtocol
        super().__init__(protocol, *args, **kwargs)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        held = transport.get_write_buffer_size() + (self.outbox.queued_bytes if self.outbox else 0)
        if held > self.send_budget:
            log.warning("connection.not_reading", buffered=held, budget=self.send_budget)
            transport.abort()


class VoiceServer:
    """Accepts connections, routes messages, owns the engines."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engines = Engines(cfg, self.metrics)
        self.runners: set[SessionRunner] = set()
        self.started = time.monotonic()
        self._server: Server | None = None
        # The server's own background work (model loading, probes of itself, model switches).
        self.tasks = TaskOwner("server")
        self._admin_task: asyncio.Task[Any] | None = None
        self.limits = P.Limits(max_text_chars=cfg.max_text_chars)

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, stop: asyncio.Future[None]) -> None:
        """Open the port first, load models in the background, serve until `stop` resolves."""
        connection_class = type("Connection", (GuardedConnection,), {"send_budget": self.cfg.send_buffer_bytes})
        receive_queue = max(4, min(64, RECEIVE_QUEUE_BYTES // self.cfg.max_frame_bytes))
        async with serve(
            self._handler,
            self.cfg.host,
            self.cfg.port,
            ssl=self._ssl_context(),
            # Browsers send Origin; other clients (telephony engines) do not, and stay allowed.
            origins=self._origins(),
            process_request=self._process_request,
            max_size=self.cfg.max_frame_bytes,
            # Clients may not answer pings quickly (or at all): keepalive pings, never a ping timeout close.
            ping_interval=60,
            ping_timeout=None,
            # Frames received but not handled yet: bounded in bytes of the largest frame, not only in count.
            max_queue=receive_queue,
            compression=None,
            server_header="local-ai-server",
            create_connection=connection_class,
        ) as server:
            self._server = server
            ports = sorted({s.getsockname()[1] for s in server.sockets})
            log.info("server.listening", host=self.cfg.host, port=ports[0] if ports else None, pid=os.getpid())
            self.tasks.spawn(self.engines.start(), name="load-models")
            self.tasks.spawn(self._watch_loop_lag(), name="loop-lag")
            self.tasks.spawn(self._trim_memory(), name="trim-memory")
            await stop
            log.info("server.stopping", sessions=len(self.runners))
            server.close(close_connections=True)  # 1001 going away
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=5)
            except asyncio.TimeoutError:
                # Name what is still running: a handler that does not return is a bug worth seeing.
                stuck = sorted({_task_name(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()})
                log.warning("server.close_timeout", pending=stuck[:20])
        for runner in list(self.runners):
            await runner.close()
        await self.tasks.aclose()
        await self.engines.close()
        log.info("server.stopped")

    def _origins(self) -> list[Origin | None] | None:
        """The Origin allow-list; connections without an Origin header are always allowed."""
        if not self.cfg.allowed_origins:
            return None
        return [*(Origin(o) for o in self.cfg.allowed_origins), None]

    def _ssl_context(self) -> ssl.SSLContext | None:
        """TLS (wss://) when a certificate is configured."""
        if self.cfg.tls_cert is None or self.cfg.tls_key is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        return ctx

    async def _watch_loop_lag(self) -> None:
        """Measure how late the loop wakes a sleeping task: the figure that shows it never blocks."""
        interval = 0.05
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(interval)
            lag = max(0.0, time.perf_counter() - t0 - interval)
            self.metrics.loop_lag.observe(lag)

    async def _trim_memory(self, every_s: float = 30.0) -> None:
        """Hand freed heap back to the OS now and then (glibc keeps it in per-thread arenas otherwise)."""
        trim = malloc_trim()
        if trim is None:
            return
        while True:
            await asyncio.sleep(every_s)
            await self.engines.run_aux(trim, 0)

    # ------------------------------------------------------------------ HTTP probes

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP on the WebSocket port: probes, and a 4xx (never a 5xx) for anything malformed."""
        try:
            return self._http(request)
        except Exception:  # noqa: BLE001 - a request we cannot make sense of is the client's error
            log.warning("http.bad_request", path=request.path[:80], exc_info=True)
            return _json_response(HTTPStatus.BAD_REQUEST, {"status": "bad_request"})

    def _http(self, request: Request) -> Response | None:
        upgrades = [v.strip().lower() for v in request.headers.get_all("Upgrade")]
        path = request.path.split("?", 1)[0].rstrip("/") or "/"
        if "websocket" in upgrades:
            if len(upgrades) > 1:
                return _json_response(HTTPStatus.BAD_REQUEST, {"status": "bad_request",
                                                               "message": "more than one Upgrade header"})
            return None  # the WebSocket handshake, checked by websockets itself
        if request.method not in ("GET", "HEAD"):
            status = HTTPStatus.METHOD_NOT_ALLOWED if path in PROBES else HTTPStatus.NOT_FOUND
            response = _json_response(status, {"status": status.phrase.lower().replace(" ", "_")})
            response.headers["Allow"] = "GET, HEAD"
            return response
        response = self._probe(path)
        if request.method == "HEAD":
            # The headers of the GET (Content-Length included), without its body.
            return Response(response.status_code, response.reason_phrase, response.headers, b"")
        return response

    def _probe(self, path: str) -> Response:
        if path == "/health":
            return _json_response(HTTPStatus.OK, {"status": "ok", "uptime_s": self.uptime()})
        if path == "/ready":
            missing = self.engines.missing()
            if self.engines.warming:
                return _json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                      {"status": "warming_up", "missing": missing})
            if missing:
                return _json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                      {"status": "not_ready", "missing": missing, "hint": FETCH_HINT})
            return _json_response(HTTPStatus.OK, {"status": "ready"})
        if path == "/metrics":
            body = self.metrics.render()
            headers = Headers([("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                               ("Content-Length", str(len(body))), ("Connection", "close")])
            return Response(200, "OK", headers, body)
        return _json_response(HTTPStatus.NOT_FOUND, {"status": "not_found",
                                                     "endpoints": ["/health", "/ready", "/metrics", "ws://"]})

    def uptime(self) -> float:
        """Seconds since start."""
        return round(time.monotonic() - self.started, 1)

    # ------------------------------------------------------------------ connections

    async def _handler(self, ws: ServerConnection) -> None:
        session = Session(id=next(_session_ids), max_history_turns=self.cfg.llm.history_turns)
        session.authenticated = self.cfg.auth_token is None
        # Everything this connection starts belongs to it, and ends with it (runner.close awaits it all).
        tasks = TaskOwner(f"session-{session.id}")
        outbox = ConnectionOutbox(ws, self.cfg.send_queue_max, tasks, self.cfg.send_buffer_bytes)
        if isinstance(ws, GuardedConnection):
            ws.outbox = outbox
        runner = SessionRunner(session, self.engines, outbox, self.cfg, self.metrics, tasks)
        self.runners.add(runner)
        writer = tasks.spawn(_write(outbox), name="writer")
        self.metrics.sessions.inc()
        self.metrics.connections.inc()
        log.info("session.open", session=session.id, remote=_remote(ws))
        try:
            async for frame in ws:
                await self._on_frame(frame, session, runner, ws)
                if writer.done():
                    break
        except ConnectionClosed:
            pass
        finally:
            self.runners.discard(runner)
            await runner.close()
            self.metrics.sessions.dec()
            log.info("session.closed", session=session.id, call_id=session.call_id,
                     code=ws.close_code)

    async def _on_frame(self, frame: str | bytes, session: Session, runner: SessionRunner,
                        ws: ServerConnection) -> None:
        """Handle one frame; whatever goes wrong becomes exactly one error reply with its request id."""
        msg: P.Message | None = None
        try:
            msg = await self._parse(frame, session, runner)
            if msg is not None:
                await self._dispatch(msg, session, runner, ws)
        except ConnectionClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered, none ends the connection
            self._request_failed(runner, msg, exc)

    def _request_failed(self, runner: SessionRunner, msg: P.Message | None, exc: BaseException) -> None:
        """The one answer to a request that failed: its own error reply where it has one, and the envelope."""
        if isinstance(exc, ServerError):
            err = exc
        else:
            log.error("message.failed", session=runner.session.id, exc_info=exc)
            err = ServerError("internal error while handling the message")
        rid = getattr(msg, "request_id", None)
        if err.request_id is None:
            err.request_id = rid
        if isinstance(msg, P.SwitchModel) and msg.scope != "session":
            runner.out.send_control(P.switch_response("error", err.message, changed=[], request_id=rid))
        elif isinstance(msg, P.Reload):
            runner.out.send_control(P.reload_response("error", err.message, request_id=rid))
        runner.error(err)

    async def _parse(self, frame: str | bytes, session: Session, runner: SessionRunner) -> P.Message | None:
        """A frame as a message (None when nothing is to be dispatched); raises ServerError for bad input."""
        if isinstance(frame, bytes):
            self.metrics.messages.labels("binary").inc()
            if not session.authenticated:
                runner.out.send_control(P.auth_response(False, "authentication_required"))
                return None
            runner.accept_audio(frame, None, None, None, binary=True)
            return None
        obj = (await self.engines.run_aux(P.decode_json, frame)) if len(frame) > BIG_FRAME else P.decode_json(frame)
        msg = P.parse_object(obj, self.limits)
        self.metrics.messages.labels(P.normalize_type(obj.get("type"))).inc()
        if not session.authenticated and not isinstance(msg, P.Auth):
            runner.out.send_control(P.auth_response(False, "authentication_required",
                                                    getattr(msg, "request_id", None)))
            return None
        return msg

    async def _dispatch(self, msg: P.Message, session: Session, runner: SessionRunner,
                        ws: ServerConnection) -> None:
        out = runner.out
        if isinstance(msg, P.Auth):
            await self._auth(msg, session, runner, ws)
        elif isinstance(msg, P.Audio):
            self._enter(msg.call_id, msg.mode, session, runner)
            if msg.output_encoding is not None or msg.output_sample_rate_hz is not None:
                session.output_encoding, session.output_sample_rate_hz, _fb = session.output_format(
                    msg.output_encoding, msg.output_sample_rate_hz)
            data = msg.data_b64 or ""
            payload = (await self.engines.run_aux(msg.payload)) if len(data) > 64 * 1024 else msg.payload()
            runner.accept_audio(payload, msg.format, msg.rate, msg.request_id)
        elif isinstance(msg, P.LlmRequest):
            self._enter(msg.call_id, msg.mode, session, runner)
            if not msg.text.strip() and not msg.context:
                # An empty text asks to answer the context as it stands (AVA, after a tool ran).
                raise InvalidField("llm_request.text must not be empty", request_id=msg.request_id)
            runner.start_turn(msg.text, kind="llm_request", request_id=msg.request_id, speak=False,
                              stream_tokens=msg.stream, context=msg.context)
        elif isinstance(msg, P.TtsRequest):
            self._enter(msg.call_id, msg.mode, session, runner)
            if not msg.text.strip():
                raise InvalidField("tts_request.text must not be empty", request_id=msg.request_id)
            runner.start_tts(msg)
        elif isinstance(msg, P.SetMode):
            self._adopt(msg.call_id, session, runner)
            if msg.mode:
                session.mode = msg.mode
            if msg.segment_energy_threshold is not None:
                session.segment_energy_threshold = msg.segment_energy_threshold
            if msg.segment_silence_ms is not None:
                session.segment_silence_ms = msg.segment_silence_ms
            if msg.output_encoding is not None or msg.output_sample_rate_hz is not None:
                enc, rate, _fell_back = session.output_format(msg.output_encoding, msg.output_sample_rate_hz)
                session.output_encoding, session.output_sample_rate_hz = enc, rate
            runner.settings_changed()
            enc, rate, _fb = session.output_format()  # what will be sent, never null (as AVA's server)
            out.send_control(P.mode_ready(
                mode=session.mode, call_id=session.call_id,
                segment_energy_threshold=session.segment_energy_threshold,
                segment_silence_ms=session.segment_silence_ms,
                output_encoding=enc, output_sample_rate_hz=rate, request_id=msg.request_id,
            ))
        elif isinstance(msg, P.BargeIn):
            cancelled = runner.cancel_all(rollback=msg.rollback_assistant and msg.reason != "stop_session")
            if msg.reason == "stop_session":
                # The call is over; the connection stays open for the next one.
                runner.stop_speech()
                session.reset_history()
                session.call_id = "unknown"
            log.info("barge_in", session=session.id, call_id=msg.call_id or session.call_id, cancelled=cancelled,
                     reason=msg.reason, rollback=msg.rollback_assistant, history=len(session.history))
            out.send_control(P.barge_in_ack(call_id=msg.call_id or session.call_id, request_id=msg.request_id))
        elif isinstance(msg, P.Status):
            out.send_control(reports.status_response(self.engines, self.cfg, sessions=len(self.runners),
                                                     uptime_s=self.uptime(), request_id=msg.request_id))
        elif isinstance(msg, P.Capabilities):
            out.send_control(reports.capabilities_response(self.engines, msg.request_id))
        elif isinstance(msg, P.Backends):
            out.send_control(reports.backends_response(self.engines, msg.request_id))
        elif isinstance(msg, P.BackendSchema):
            out.send_control(reports.backend_schema_response(self.engines, msg.backend_type, msg.backend_name,
                                                             msg.request_id))
        elif isinstance(msg, P.SwitchModel):
            if msg.scope == "session":
                self._adopt(msg.call_id, session, runner)
                changed = []
                if msg.system_prompt is not None:
                    # dry_run only concerns model loading (as in AVA's server); a prompt is always applied.
                    session.system_prompt = msg.system_prompt or None
                    changed.append("system_prompt")
                out.send_control(P.switch_response(
                    "success", "session system prompt updated" if changed else "nothing to change",
                    changed=changed, request_id=msg.request_id, call_id=msg.call_id or session.call_id,
                    scope="session"))
            else:
                self._admin(self._switch_global(msg, runner), msg, runner)
        elif isinstance(msg, P.Reload):
            self._admin(self._reload(msg, runner), msg, runner)
        elif isinstance(msg, P.ToolContext):
            self._adopt(msg.call_id, session, runner)
            session.tools, session.allowed_tools, session.tool_policy = msg.tools, msg.allowed_tools, msg.tool_policy
            log.info("tool_context", session=session.id, call_id=session.call_id, tools=len(msg.tools),
                     allowed=list(msg.allowed_tools), policy=msg.tool_policy)
        elif isinstance(msg, P.LlmToolRequest):
            self._enter(msg.call_id, None, session, runner)
            runner.start_tool_request(msg)
        elif isinstance(msg, P.ToolResult):
            self._enter(msg.call_id, None, session, runner)
            runner.start_tool_result(msg)

    def _admin(self, coro: Any, msg: P.SwitchModel | P.Reload, runner: SessionRunner) -> None:
        """Run one model switch/reload at a time; a second one while one runs gets `busy`.

        The server owns the task (a model load outlives the connection that asked for it); a failure
        nobody foresaw still gets the requester its one answer.
        """
        if self._admin_task is not None and not self._admin_task.done():
            coro.close()
            raise Busy("a model switch or reload is already in progress", request_id=msg.request_id)
        self._admin_task = self.tasks.spawn(coro, name=type(msg).__name__,
                                            on_error=lambda exc: self._request_failed(runner, msg, exc))

    def _enter(self, call_id: str | None, mode: str | None, session: Session, runner: SessionRunner) -> None:
        """A message's call_id and mode override the session's from now on."""
        self._adopt(call_id, session, runner)
        if mode:
            session.mode = mode

    def _adopt(self, call_id: str | None, session: Session, runner: SessionRunner) -> None:
        previous = session.call_id
        if session.adopt_call_id(call_id) and previous != "unknown":
            # A new call on a reused connection: nothing of the previous call may leak into it.
            runner.cancel_all()
            runner.stop_speech()
            log.info("session.new_call", session=session.id, call_id=session.call_id)

    async def _auth(self, msg: P.Auth, session: Session, runner: SessionRunner, ws: ServerConnection) -> None:
        token = self.cfg.auth_token
        if token is None or hmac.compare_digest(msg.token.encode(), token.encode()):
            session.authenticated = True
            if msg.call_id:
                session.adopt_call_id(msg.call_id)
            runner.out.send_control(P.auth_response(True, request_id=msg.request_id))
            return
        session.auth_failures += 1
        log.warning("auth.failed", session=session.id, failures=session.auth_failures, remote=_remote(ws))
        runner.out.send_control(P.auth_response(False, "invalid_auth_token", msg.request_id))
        if session.auth_failures >= MAX_AUTH_FAILURES:
            await asyncio.sleep(0.05)  # let the reply go out first
            await ws.close(1008, "too many failed authentication attempts")

    # ------------------------------------------------------------------ model management

    async def _switch_global(self, msg: P.SwitchModel, runner: SessionRunner) -> None:
        """Global switch_model: validate, then load each changed model off the loop."""
        rid = msg.request_id
        try:
            plan: list[tuple[str, Any]] = []
            for kind, raw in (("stt", msg.stt_model_path), ("llm", msg.llm_model_path),
                              ("tts", msg.tts_model_path)):
                if raw is None:
                    continue
                path = self.engines.resolve_model_path(raw)
                current = {"stt": self.engines.stt_state.path, "llm": self.engines.pool.model_path,
                           "tts": self.engines.tts_state.path}[kind]
                if not await self.engines.model_file_exists(path):
                    raise InvalidField(f"{kind} model path does not exist")
                if current is not None and path == current.resolve():
                    continue
                plan.append((kind, path))
            changed = [f"{k}_model_path" for k, _ in plan]
            prompt_changed = msg.system_prompt is not None and msg.system_prompt != self.engines.default_prompt
            if prompt_changed:
                # Applied even with dry_run: AVA's engine sends its prompt as a dry-run global switch.
                self.engines.default_prompt = msg.system_prompt or self.cfg.llm.system_prompt
                changed.insert(0, "system_prompt")
            if not changed:
                runner.out.send_control(P.switch_response("no_change", "already in use", changed=[],
                                                          request_id=rid))
                return
            if msg.dry_run:
                message = "dry run: " + ", ".join(changed) if plan else "system prompt updated"
                runner.out.send_control(P.switch_response("success", message, changed=changed, request_id=rid))
                return
            for kind, value in plan:
                if kind == "stt":
                    await self.engines.switch_stt(value)
                elif kind == "tts":
                    await self.engines.switch_tts(value)
                else:
                    await self.engines.switch_llm(value)
            log.info("switch_model.done", changed=changed)
            runner.out.send_control(P.switch_response("success", "switched " + ", ".join(changed),
                                                      changed=changed, request_id=rid))
        except ServerError as err:
            log.warning("switch_model.failed", error=err.message)
            runner.out.send_control(P.switch_response("error", err.message, changed=[], request_id=rid))
            err.request_id = rid
            runner.error(err)

    async def _reload(self, msg: P.Reload, runner: SessionRunner) -> None:
        """reload_models / reload_llm: reload from the current (or given) paths off the loop."""
        rid = msg.request_id
        try:
            if msg.what == "llm" or msg.model_path:
                path = (self.engines.resolve_model_path(msg.model_path) if msg.model_path
                        else self.engines.pool.model_path)
                if path is None:
                    raise InvalidField("no LLM model configured to reload")
                if msg.model_path and not await self.engines.model_file_exists(path):
                    raise InvalidField("llm model path does not exist")
                await self.engines.switch_llm(path)
                message = f"LLM reloaded ({path.name})"
            else:
                if self.engines.stt_state.path is not None:
                    await self.engines.switch_stt(self.engines.stt_state.path)
                if self.engines.tts_state.path is not None:
                    await self.engines.switch_tts(self.engines.tts_state.path)
                if self.engines.pool.model_path is not None:
                    await self.engines.switch_llm(self.engines.pool.model_path)
                message = "models reloaded"
            runner.out.send_control(P.reload_response("success", message, request_id=rid))
        except ServerError as err:
            runner.out.send_control(P.reload_response("error", err.message, request_id=rid))
            err.request_id = rid
            runner.error(err)


async def _write(outbox: ConnectionOutbox) -> None:
    """The connection's writer; a closed connection ends it quietly."""
    try:
        await outbox.run()
    except ConnectionClosed:
        pass


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    where = f":{frame.f_lineno}" if frame is not None else ""
    return f"{getattr(coro, '__qualname__', repr(coro))}{where}"


def _json_response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)


def _remote(ws: ServerConnection) -> str | None:
    try:
        addr = ws.remote_address
        return f"{addr[0]}:{addr[1]}" if addr else None
    except Exception:  # noqa: BLE001
        return None


async def run(cfg: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop(signame: str) -> None:
        log.info("server.signal", signal=signame)
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    await VoiceServer(cfg).serve(stop)
