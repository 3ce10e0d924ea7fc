"""The only module that knows websockets: handshake, HTTP probes, receive loop, writer, shutdown."""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import json
import os
import platform
import signal
import ssl
import time
from http import HTTPStatus
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Origin

from . import protocol as P
from .config import ServerConfig, cpu_count
from .errors import Busy, InvalidField, ServerError
from .heap import malloc_trim
from .metrics import Metrics
from .pipeline import SessionRunner, Turn
from .runtime import FETCH_HINT, Engines
from .session import Session

log = structlog.get_logger(__name__)

# Text frames longer than this are JSON-decoded on a thread (a whole-utterance base64 frame is megabytes).
BIG_FRAME = 256 * 1024
MAX_AUTH_FAILURES = 3
_session_ids = itertools.count(1)


class ConnectionOutbox:
    """Per-connection writer: control messages overtake data; cancelled turns' data is dropped unsent."""

    def __init__(self, ws: ServerConnection, max_items: int) -> None:
        self.ws = ws
        self.max_items = max_items
        self._control: collections.deque[dict[str, Any]] = collections.deque()
        self._data: collections.deque[tuple[dict[str, Any], bytes | None, Turn | None]] = collections.deque()
        self._wake = asyncio.Event()
        self.overflowed = False
        self._closer: asyncio.Future[None] | None = None

    def send_control(self, msg: dict[str, Any]) -> None:
        """Queue a reply that must not wait behind audio."""
        self._control.append(msg)
        self._wake.set()

    def send_data(self, msg: dict[str, Any], turn: Turn | None = None) -> None:
        """Queue an ordered data message."""
        self._push((msg, None, turn))

    def send_audio(self, header: dict[str, Any], payload: bytes, turn: Turn) -> None:
        """Queue a tts_audio header with its binary frame."""
        self._push((header, payload, turn))

    def _push(self, item: tuple[dict[str, Any], bytes | None, Turn | None]) -> None:
        if len(self._data) >= self.max_items:
            # The client stopped reading: memory must stay bounded, so the connection goes.
            if not self.overflowed:
                self.overflowed = True
                log.warning("connection.send_queue_overflow", items=len(self._data))
                self._closer = asyncio.ensure_future(self._close_stuck())
            return
        self._data.append(item)
        self._wake.set()

    async def _close_stuck(self) -> None:
        """Close with 1008; a client that reads nothing never sees the close frame, so then drop the TCP link."""
        try:
            await asyncio.wait_for(self.ws.close(1008, "client is not reading; send queue full"), 2.0)
        except (asyncio.TimeoutError, ConnectionClosed):
            pass
        if self.ws.transport is not None and not self.ws.transport.is_closing():
            self.ws.transport.abort()

    async def run(self) -> None:
        """Send queued messages until the connection closes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._control or self._data:
                if self._control:
                    await self.ws.send(P.dumps(self._control.popleft()))
                    continue
                msg, payload, turn = self._data.popleft()
                if turn is not None and turn.cancelled:
                    continue
                await self.ws.send(P.dumps(msg))
                if payload is not None:
                    # No await between header and audio may let another message in: the pair is atomic.
                    await self.ws.send(payload)


class VoiceServer:
    """Accepts connections, routes messages, owns the engines."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engines = Engines(cfg, self.metrics)
        self.runners: set[SessionRunner] = set()
        self.started = time.monotonic()
        self._server: Server | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._admin_task: asyncio.Task[Any] | None = None
        self.limits = P.Limits(max_text_chars=cfg.max_text_chars)

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, stop: asyncio.Future[None]) -> None:
        """Open the port first, load models in the background, serve until `stop` resolves."""
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
            max_queue=64,
            compression=None,
            server_header="local-ai-server",
        ) as server:
            self._server = server
            ports = sorted({s.getsockname()[1] for s in server.sockets})
            log.info("server.listening", host=self.cfg.host, port=ports[0] if ports else None, pid=os.getpid())
            self._background(self.engines.start())
            self._background(self._watch_loop_lag())
            self._background(self._trim_memory())
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
        for task in list(self._bg):
            task.cancel()
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

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

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
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = request.path.split("?", 1)[0].rstrip("/") or "/"
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

    def _hardware(self) -> dict[str, Any]:
        """What this process runs on; the installer's description (CPU model, GPU) when it left one."""
        hw: dict[str, Any] = {"cpu_cores": cpu_count(), "arch": platform.machine(), "gpu": None,
                              "llm_gpu_layers": self.cfg.llm.gpu_layers, "stt_device": self.cfg.stt.device}
        installed = (self.cfg.expected or {}).get("hardware")
        if isinstance(installed, dict):
            hw |= {k: installed[k] for k in ("cpu_model", "ram_gb", "gpu") if k in installed}
        return hw

    # ------------------------------------------------------------------ connections

    async def _handler(self, ws: ServerConnection) -> None:
        session = Session(id=next(_session_ids), max_history_turns=self.cfg.llm.history_turns)
        session.authenticated = self.cfg.auth_token is None
        outbox = ConnectionOutbox(ws, self.cfg.send_queue_max)
        runner = SessionRunner(session, self.engines, outbox, self.cfg, self.metrics)
        self.runners.add(runner)
        writer = asyncio.ensure_future(outbox.run())
        self.metrics.sessions.inc()
        self.metrics.connections.inc()
        log.info("session.open", session=session.id, remote=_remote(ws))
        try:
            async for frame in ws:
                try:
                    await self._on_frame(frame, session, runner, ws)
                except ServerError as err:
                    runner.error(err)
                except ConnectionClosed:
                    raise
                except Exception:
                    log.exception("message.failed", session=session.id)
                    runner.error(ServerError("internal error while handling the message"))
                if writer.done():
                    break
        except ConnectionClosed:
            pass
        finally:
            self.runners.discard(runner)
            await runner.close()
            writer.cancel()
            self.metrics.sessions.dec()
            log.info("session.closed", session=session.id, call_id=session.call_id,
                     code=ws.close_code)

    async def _on_frame(self, frame: str | bytes, session: Session, runner: SessionRunner,
                        ws: ServerConnection) -> None:
        if isinstance(frame, bytes):
            self.metrics.messages.labels("binary").inc()
            if not session.authenticated:
                runner.out.send_control(P.auth_response(False, "authentication_required"))
                return
            runner.accept_audio(frame, None, None, None, binary=True)
            return
        obj = (await self.engines.run_aux(P.decode_json, frame)) if len(frame) > BIG_FRAME else P.decode_json(frame)
        msg = P.parse_object(obj, self.limits)
        mtype = P.normalize_type(obj.get("type"))
        self.metrics.messages.labels(mtype).inc()
        if not session.authenticated and not isinstance(msg, P.Auth):
            runner.out.send_control(P.auth_response(False, "authentication_required"))
            return
        await self._dispatch(msg, session, runner, ws)

    async def _dispatch(self, msg: P.Message, session: Session, runner: SessionRunner,
                        ws: ServerConnection) -> None:
        out = runner.out
        if isinstance(msg, P.Auth):
            await self._auth(msg, session, runner, ws)
        elif isinstance(msg, P.Audio):
            self._enter(msg.call_id, msg.mode, session, runner)
            if msg.output_encoding is not None or msg.output_sample_rate_hz is not None:
                session.output_encoding = msg.output_encoding or session.output_encoding
                session.output_sample_rate_hz = msg.output_sample_rate_hz
            data = msg.data_b64 or ""
            payload = (await self.engines.run_aux(msg.payload)) if len(data) > 64 * 1024 else msg.payload()
            runner.accept_audio(payload, msg.format, msg.rate, msg.request_id)
        elif isinstance(msg, P.LlmRequest):
            self._enter(msg.call_id, msg.mode, session, runner)
            if not msg.text.strip():
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
            out.send_control(P.mode_ready(
                mode=session.mode, call_id=session.call_id,
                segment_energy_threshold=session.segment_energy_threshold,
                segment_silence_ms=session.segment_silence_ms,
                output_encoding=session.output_encoding, output_sample_rate_hz=session.output_sample_rate_hz,
                request_id=msg.request_id,
            ))
        elif isinstance(msg, P.BargeIn):
            cancelled = runner.cancel_all()
            if msg.reason == "stop_session":
                # The call is over; the connection stays open for the next one.
                runner.stop_speech()
                session.reset_history()
                session.call_id = "unknown"
            log.info("barge_in", session=session.id, call_id=msg.call_id or session.call_id, cancelled=cancelled,
                     reason=msg.reason)
            out.send_control(P.barge_in_ack(call_id=msg.call_id or session.call_id, request_id=msg.request_id))
        elif isinstance(msg, P.Status):
            out.send_control(self.status_response(msg.request_id))
        elif isinstance(msg, P.Capabilities):
            out.send_control(self.capabilities_response(msg.request_id))
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
                self._admin(self._switch_global(msg, runner), msg.request_id)
        elif isinstance(msg, P.Reload):
            self._admin(self._reload(msg, runner), msg.request_id)
        elif isinstance(msg, P.ToolContext):
            session.tool_context = dict(msg.payload)

    def _admin(self, coro: Any, request_id: P.RequestId) -> None:
        """Run one model switch/reload at a time; a second one while one runs gets `busy`."""
        if self._admin_task is not None and not self._admin_task.done():
            coro.close()
            raise Busy("a model switch or reload is already in progress", request_id=request_id)
        self._admin_task = asyncio.ensure_future(coro)
        self._bg.add(self._admin_task)
        self._admin_task.add_done_callback(self._bg.discard)

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
            runner.out.send_control(P.auth_response(True))
            return
        session.auth_failures += 1
        log.warning("auth.failed", session=session.id, failures=session.auth_failures, remote=_remote(ws))
        runner.out.send_control(P.auth_response(False, "invalid_auth_token"))
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
                exists = await self.engines.run_aux(path.exists)
                if not exists:
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

    # ------------------------------------------------------------------ status

    def status_response(self, request_id: P.RequestId) -> dict[str, Any]:
        """status_response: AVA fields plus our extensions."""
        e = self.engines
        missing = e.missing()
        models = e.model_status()
        models["llm"]["tool_capability"] = {"level": "none", "source": "local-ai-server"}
        msg: dict[str, Any] = {
            "type": "status_response",
            "status": "warming_up" if e.warming else "ok",
            "stt_backend": P.STT_BACKEND,
            "tts_backend": P.TTS_BACKEND,
            "models": models,
            "config": {
                "host": self.cfg.host,
                "port": self.cfg.port,
                "auth_required": self.cfg.auth_token is not None,
                "models_dir": None,
                "stt_idle_ms": self.cfg.stt.idle_ms,
                "segment_silence_ms": self.cfg.stt.silence_ms,
                "segment_energy_threshold": self.cfg.stt.energy_threshold,
                "output_encoding": "mulaw",
                "output_sample_rate_hz": 8000,
                "llm_workers": self.cfg.llm.workers,
                "llm_max_queue": self.cfg.llm.max_queue,
                "degraded": bool(missing) and not e.warming,
            },
            "degraded": bool(missing) and not e.warming,
            "missing": missing,
            "tier": self.cfg.tier,
            "hardware": self._hardware(),
            "expected": self.cfg.expected,
            "pool": e.pool.snapshot(),
            "sessions": len(self.runners),
            "uptime_s": self.uptime(),
        }
        if missing and not e.warming:
            msg["hint"] = FETCH_HINT
        if request_id is not None:
            msg["request_id"] = request_id
        return msg

    def capabilities_response(self, request_id: P.RequestId) -> dict[str, Any]:
        """capabilities_response naming the installed backends."""
        e = self.engines
        caps = {
            "vosk": False, "sherpa": False, "kroko_embedded": False, "tone": False,
            "faster_whisper": e.stt is not None, "whisper_cpp": False,
            "piper": e.tts is not None, "kokoro": False, "melotts": False,
            "silero": e.vad is not None, "llama": e.pool.state == "ready",
            "streaming_llm": True, "barge_in": True, "partials": True, "tool_calling": False,
        }
        msg: dict[str, Any] = {"type": "capabilities_response", "capabilities": caps}
        if request_id is not None:
            msg["request_id"] = request_id
        return msg


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
