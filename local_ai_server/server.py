"""The WebSocket server: accept, route each connection to its front, pump its frames, shut down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import time
from collections.abc import Collection, Sequence
from http import HTTPStatus
from typing import Any, Protocol

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Origin, Subprotocol

from . import probes
from .admission import CLOSE_FULL, FULL_MESSAGE
from .config import ServerConfig
from .drain import Drain, DrainPolicy, Leaving, StopRequests
from .fronts import realtime_render
from .fronts.ava import AvaFront
from .fronts.realtime import RealtimeFront
from .fronts.realtime_input import authorized, is_realtime_path, model_of, subprotocol
from .heap import malloc_trim
from .hub import Hub
from .metrics import Metrics
from .outbox import ConnectionOutbox
from .runtime import Engines
from .session import Session
from .tasks import TaskOwner
from .wyoming_server import WyomingListener

log = structlog.get_logger(__name__)

# Received frames a connection may have waiting to be handled, in bytes of the largest frame allowed.
RECEIVE_QUEUE_BYTES = 64 * 1024 * 1024


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


class Front(Protocol):
    """What the server needs of a connection's front."""

    remote: str | None

    async def on_frame(self, frame: str | bytes) -> None: ...

    async def close(self) -> None: ...

    def between_turns(self) -> bool: ...


class WsCall:
    """The drain's view of one WebSocket connection: its front, and what is still on the wire."""

    def __init__(self, front: Front, ws: ServerConnection, kind: str) -> None:
        self.kind = kind
        self.front = front
        self.ws = ws
        self.handling = False  # a frame is being handled
        self.leaving = False  # the close frame is out: later frames are not served

    def between_turns(self) -> bool:
        """Between turns: no frame being handled or waiting to be, and the front says nothing is under way."""
        return not self.handling and not _frames_waiting(self.ws) and self.front.between_turns()

    async def go_away(self) -> None:
        """Close with 1001 (going away); the client calls again, through the load balancer, elsewhere."""
        self.leaving = True
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(1001, "server shutting down")


class VoiceServer:
    """Accepts connections, routes each to the front of its path, pumps its frames, shuts down."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.hub = Hub(cfg)
        self.fronts: set[Front] = set()
        self.calls: set[WsCall] = set()
        self._server: Server | None = None
        self.wyoming: WyomingListener | None = None

    @property
    def engines(self) -> Engines:
        """The models every front runs on."""
        return self.hub.engines

    @property
    def metrics(self) -> Metrics:
        """The server's counters."""
        return self.hub.metrics

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, stop: StopRequests) -> None:
        """Open the port first, load models in the background, serve until `stop` asks; drain, then shut down."""
        connection_class = type("Connection", (GuardedConnection,), {"send_budget": self.cfg.send_buffer_bytes})
        receive_queue = max(4, min(64, RECEIVE_QUEUE_BYTES // self.cfg.max_frame_bytes))
        tasks = self.hub.tasks
        async with serve(
            self._handler,
            self.cfg.host,
            self.cfg.port,
            ssl=self._ssl_context(),
            # Browsers send Origin; other clients (telephony engines) do not, and stay allowed.
            origins=self._origins(),
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
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
            tasks.spawn(self.engines.start(), name="load-models")
            tasks.spawn(self._watch_loop_lag(), name="loop-lag")
            tasks.spawn(self._trim_memory(), name="trim-memory")
            if self.cfg.wyoming_uri is not None:
                self.wyoming = WyomingListener(self.hub, self.cfg.wyoming_uri)
                await self.wyoming.start()
            await stop.drain.wait()
            await self._drain(stop.now)
            log.info("server.stopping", sessions=len(self.fronts))
            if self.wyoming is not None:
                await self.wyoming.close()
            server.close(close_connections=True)  # 1001 going away
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=5)
            except asyncio.TimeoutError:
                # Name what is still running: a handler that does not return is a bug worth seeing.
                stuck = sorted({_task_name(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()})
                log.warning("server.close_timeout", pending=stuck[:20])
        for front in list(self.fronts):
            await front.close()
        await tasks.aclose()
        await self.engines.close()
        log.info("server.stopped")

    async def _drain(self, stop_now: asyncio.Event) -> None:
        """Refuse new calls at once (/ready says draining); close each open one between turns, or at the timeout."""
        self.hub.draining = True
        if self.wyoming is not None:
            self.wyoming.stop_accepting()
        policy = DrainPolicy(self.cfg.drain_notice_s, self.cfg.drain_timeout_s)
        drain = Drain(policy, self._open_calls, stop_now)
        log.info("server.draining", calls=len(self._open_calls()), notice_s=policy.notice_s,
                 timeout_s=policy.timeout_s)
        report = await drain.run()
        log.info("server.drained", open_at_start=report.open_at_start, closed=dict(report.closed),
                 left=report.left, seconds=report.seconds)

    def _open_calls(self) -> Collection[Leaving]:
        wyoming = self.wyoming.calls if self.wyoming is not None else set()
        return [*self.calls, *wyoming]

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
            if is_realtime_path(request.path) and not authorized(request.headers, self.cfg.auth_token):
                # OpenAI's clients authenticate on the handshake (a bearer token), not in a message.
                log.warning("auth.failed", front="realtime", remote=_remote(connection))
                return probes.json_response(HTTPStatus.UNAUTHORIZED, {"error": {
                    "type": "invalid_request_error", "code": "invalid_api_key",
                    "message": "missing or wrong token (Authorization: Bearer, or the openai-insecure-api-key."
                               " subprotocol)"}})
            return probes.answer(request, self.hub)
        except Exception:  # noqa: BLE001 - a request we cannot make sense of is the client's error
            log.warning("http.bad_request", path=request.path[:80], exc_info=True)
            return probes.json_response(HTTPStatus.BAD_REQUEST, {"status": "bad_request"})

    # ------------------------------------------------------------------ connections

    async def _handler(self, ws: ServerConnection) -> None:
        """One connection: refused at once if it is a Realtime call and the box is full, else served."""
        session = Session(id=self.hub.new_session_id(), max_history_turns=self.cfg.llm.history_turns)
        session.authenticated = self.cfg.auth_token is None
        path = ws.request.path if ws.request else "/"
        if is_realtime_path(path) and not self.hub.admit(session.id, "realtime"):
            await _refuse_full(ws)  # a Realtime session is a call from its handshake on
            return
        try:
            await self._serve(ws, session, path)
        finally:
            self.hub.release(session.id)  # its place, if it took one (AVA: at its first request for work)

    async def _serve(self, ws: ServerConnection, session: Session, path: str) -> None:
        """One connection: its front, its writer, its frames; every task it starts ends with it."""
        async with TaskOwner(f"session-{session.id}") as tasks:
            outbox = ConnectionOutbox(ws, self.cfg.send_queue_max, tasks, self.cfg.send_buffer_bytes)
            if isinstance(ws, GuardedConnection):
                ws.outbox = outbox
            front: Front
            if is_realtime_path(path):  # checked at the handshake: authenticated already
                front = RealtimeFront(self.hub, session, outbox, tasks, ws.close, remote=_remote(ws),
                                      model=model_of(path))
                call = WsCall(front, ws, "realtime")
            else:
                # Every other path speaks AVA's protocol (its clients connect to "/" or to a path of their own).
                front = AvaFront(self.hub, session, outbox, tasks, ws.close, remote=_remote(ws))
                call = WsCall(front, ws, "ava")
            self.fronts.add(front)
            self.calls.add(call)
            writer = tasks.spawn(_write(outbox), name="writer")
            self.hub.calls += 1
            self.metrics.sessions.inc()
            self.metrics.connections.inc()
            log.info("session.open", session=session.id, remote=front.remote, path=ws.request.path[:80]
                     if ws.request else None)
            try:
                async for frame in ws:
                    if call.leaving:
                        continue  # it came after our close frame: the client sends it again on its next connection
                    call.handling = True
                    try:
                        await front.on_frame(frame)
                    finally:
                        call.handling = False
                    if writer.done():
                        break
            except ConnectionClosed:
                pass
            finally:
                self.fronts.discard(front)
                self.calls.discard(call)
                await front.close()
                self.hub.calls -= 1
                self.metrics.sessions.dec()
                log.info("session.closed", session=session.id, call_id=session.call_id, code=ws.close_code)


async def _refuse_full(ws: ServerConnection) -> None:
    """A Realtime call on a full box: OpenAI's `error` event (code `busy`), then close 1013 (try again later)."""
    event = realtime_render.error(realtime_render.Ids(), FULL_MESSAGE, code="busy", kind="server_error")
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps(event))
        await ws.close(CLOSE_FULL, "server full")


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Answer "realtime" to a browser on the Realtime path that offers it (else no subprotocol, as before)."""
    path = connection.request.path if connection.request else "/"
    chosen = subprotocol(path, offered)
    return Subprotocol(chosen) if chosen else None


async def _write(outbox: ConnectionOutbox) -> None:
    """The connection's writer; a closed connection ends it quietly."""
    try:
        await outbox.run()
    except ConnectionClosed:
        pass


def _frames_waiting(ws: ServerConnection) -> bool:
    """Whether frames received are waiting to be read (websockets' receive queue; absent: assume none)."""
    frames = getattr(getattr(ws, "recv_messages", None), "frames", None)
    try:
        return bool(frames is not None and len(frames))
    except TypeError:
        return False


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    where = f":{frame.f_lineno}" if frame is not None else ""
    return f"{getattr(coro, '__qualname__', repr(coro))}{where}"


def _remote(ws: ServerConnection) -> str | None:
    try:
        addr = ws.remote_address
        return f"{addr[0]}:{addr[1]}" if addr else None
    except Exception:  # noqa: BLE001
        return None


async def run(cfg: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain and shut down gracefully; a second signal ends the drain at once."""
    loop = asyncio.get_running_loop()
    stop = StopRequests()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.signal, sig.name)
    await VoiceServer(cfg).serve(stop)
