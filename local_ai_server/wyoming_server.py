"""The Wyoming listener: accept TCP or unix-socket connections, pump events to their front, shut down.

Built on asyncio streams rather than the `wyoming` package's `AsyncServer`: that server starts each
connection as a task nobody owns, reads header lines of any length, and writes from the reading task
(a client that stops reading stalls its own requests). Here every connection is a task of the
listener's owner, reading is bounded (`fronts.wyoming_wire`), and writing is a task of its own
behind a byte-bounded outbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from typing import Any

import structlog
from wyoming.event import Event

from .config import is_loopback
from .fronts.wyoming import WyomingFront
from .fronts.wyoming_render import error_event
from .fronts.wyoming_wire import TooLarge, WireError, WireLimits, WireParser, encode
from .hub import Hub
from .session import Session
from .tasks import TaskOwner
from .voice.turn import Turn
from .wyoming_uri import WyomingUri

log = structlog.get_logger(__name__)

READ_BYTES = 64 * 1024
# How long a closing connection may take to flush what it still owes (an error event, the last audio).
FLUSH_S = 2.0


class WyomingOutbox:
    """What a connection will send, waiting for the client to read it; past `max_bytes` it is closed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.overflowed = False
        self.closing = False
        self._items: collections.deque[tuple[bytes, Turn | None]] = collections.deque()
        self._wake = asyncio.Event()
        self._writing = False  # an event taken off the queue is being written

    def send(self, event: Event, turn: Turn | None = None) -> None:
        """Queue one event (always taken into an empty outbox, whatever its size)."""
        if self.overflowed or self.closing:
            return
        data = encode(event)
        if self._items and self.queued_bytes + len(data) > self.max_bytes:
            self.overflowed = True  # a client that does not read may not make the server hold more
            self._wake.set()
            return
        self._items.append((data, turn))
        self.queued_bytes += len(data)
        self._wake.set()

    def close(self) -> None:
        """Send what is queued, then stop."""
        self.closing = True
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Everything queued has been written to the socket."""
        return not self._items and not self._writing

    async def run(self, writer: asyncio.StreamWriter) -> None:
        """Write queued events in order, skipping those of cancelled turns, until closed or overflowed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items and not self.overflowed:
                data, turn = self._items.popleft()
                self.queued_bytes -= len(data)
                if turn is not None and turn.cancelled:
                    continue
                self._writing = True
                try:
                    writer.write(data)
                    await writer.drain()
                finally:
                    self._writing = False
            if self.overflowed:
                log.warning("wyoming.not_reading", queued=self.queued_bytes, budget=self.max_bytes)
                writer.transport.abort()
                return
            if self.closing:
                return


class WyomingCall:
    """The drain's view of one Wyoming connection: closed (end of the TCP stream) when idle between requests."""

    kind = "wyoming"

    def __init__(self, front: WyomingFront, out: WyomingOutbox, parser: WireParser,
                 writer: asyncio.StreamWriter) -> None:
        self.front, self.out, self.parser, self.writer = front, out, parser, writer

    def between_turns(self) -> bool:
        """Nothing half-read, nothing left to send, and the front serves nothing."""
        return self.parser.buffered == 0 and self.out.idle and self.front.between_turns()

    async def go_away(self) -> None:
        """End the stream (Wyoming has no close code): what is queued is flushed, then the socket closes."""
        self.out.close()
        self.writer.close()


class WyomingListener:
    """The Wyoming front's socket: one task per connection, all owned, all ended by `close`."""

    def __init__(self, hub: Hub, uri: WyomingUri) -> None:
        self.hub = hub
        self.uri = uri
        self.fronts: set[WyomingFront] = set()
        self.calls: set[WyomingCall] = set()
        self._tasks = TaskOwner("wyoming")
        self._server: asyncio.Server | None = None
        self._zeroconf: Any = None

    @property
    def port(self) -> int | None:
        """The TCP port listened on (the real one when the URI asked for port 0)."""
        if self._server is None or self.uri.scheme != "tcp":
            return None
        ports = sorted({s.getsockname()[1] for s in self._server.sockets})
        return ports[0] if ports else None

    async def start(self) -> None:
        """Open the socket (and announce it over zeroconf if asked)."""
        if self.uri.scheme == "unix":
            assert self.uri.path is not None
            with contextlib.suppress(FileNotFoundError):
                if self.uri.path.is_socket():
                    self.uri.path.unlink()  # a stale socket of an earlier run
            self._server = await asyncio.start_unix_server(self._accept, path=str(self.uri.path), limit=READ_BYTES)
        else:
            self._server = await asyncio.start_server(self._accept, self.uri.host, self.uri.port, limit=READ_BYTES)
            if not is_loopback(self.uri.host):
                # Wyoming has no authentication: anyone who reaches the port may use the models.
                log.warning("wyoming.open_to_network", host=self.uri.host,
                            hint="Wyoming has no authentication; firewall the port to Home Assistant's host")
        log.info("wyoming.listening", uri=str(self.uri), port=self.port, pid=os.getpid())
        name = self.hub.cfg.wyoming_zeroconf
        if name is not None and self.uri.scheme == "tcp" and self.port is not None:
            await self._announce(name or None, self.port)

    async def _announce(self, name: str | None, port: int) -> None:
        try:
            from wyoming.zeroconf import HomeAssistantZeroconf  # needs the `zeroconf` extra
        except ImportError:
            log.error("wyoming.zeroconf_missing", hint="pip install 'local-ai-server[zeroconf]'")
            return
        if is_loopback(self.uri.host):
            log.warning("wyoming.zeroconf_loopback", host=self.uri.host,
                        hint="announced, but only this machine can connect; listen on 0.0.0.0 for Home Assistant")
        # On every interface: announce the address other machines reach this one at (found by the package).
        host = None if self.uri.host in ("0.0.0.0", "::", "") else self.uri.host
        try:
            self._zeroconf = HomeAssistantZeroconf(port=port, name=name, host=host)
            await self._zeroconf.register_server()
        except OSError as exc:  # no network route or no multicast: serve on, unannounced
            log.error("wyoming.zeroconf_failed", error=str(exc))
            self._zeroconf = None
            return
        log.info("wyoming.zeroconf", name=self._zeroconf.name, host=self._zeroconf.host, port=port)

    def stop_accepting(self) -> None:
        """Close the listening socket (the server drains); open connections go on."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting, end every connection, withdraw the announcement."""
        if self._server is not None:
            self._server.close()
        await self._tasks.aclose()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf._aiozc.async_close()
        if self.uri.scheme == "unix" and self.uri.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.uri.path.unlink()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new connection: served by a task of this listener (closed at once if the listener is closing)."""
        try:
            self._tasks.spawn(self._serve(reader, writer), name="wyoming-connection")
        except RuntimeError:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hub, cfg = self.hub, self.hub.cfg
        session = Session(id=hub.new_session_id(), max_history_turns=cfg.llm.history_turns)
        session.authenticated = True
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unix"
        out = WyomingOutbox(cfg.send_buffer_bytes)
        parser = WireParser(WireLimits(payload_bytes=cfg.max_frame_bytes))
        hub.calls += 1
        log.info("wyoming.open", session=session.id, remote=remote)
        try:
            # The writer outlives the call's own tasks, so that what they sent last still goes out.
            async with TaskOwner(f"wyoming-{session.id}-writer") as writing:
                sending = writing.spawn(out.run(writer), name="wyoming-writer")
                async with TaskOwner(f"wyoming-{session.id}") as tasks:
                    front = WyomingFront(hub, session, out, tasks, remote)
                    call = WyomingCall(front, out, parser, writer)
                    self.fronts.add(front)
                    self.calls.add(call)
                    try:
                        await self._pump(reader, parser, front, out, sending, session.id)
                    finally:
                        self.fronts.discard(front)
                        self.calls.discard(call)
                        await front.close()
                out.close()
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await asyncio.wait_for(asyncio.shield(sending), timeout=FLUSH_S)
        except ConnectionError:
            pass
        finally:
            hub.calls -= 1
            hub.release(session.id)
            writer.close()
            log.info("wyoming.closed", session=session.id)

    async def _pump(self, reader: asyncio.StreamReader, parser: WireParser, front: WyomingFront,
                    out: WyomingOutbox, sending: asyncio.Task[None], session_id: int) -> None:
        """Read until the client closes (then finish what it asked for) or sends what cannot be read."""
        while not sending.done():
            chunk = await reader.read(READ_BYTES)
            if not chunk:
                # The client sent all it will: serve what it asked for, unless it stops reading meanwhile.
                async with TaskOwner(f"wyoming-{session_id}-drain") as draining:  # leaving it cancels the drain
                    served = draining.spawn(front.end_of_input(), name="wyoming-drain")
                    await asyncio.wait([served, sending], return_when=asyncio.FIRST_COMPLETED)
                return
            try:
                events = parser.feed(chunk)
            except WireError as err:
                what = "too_large" if isinstance(err, TooLarge) else "malformed"
                log.warning("wyoming.bad_input", session=session_id, problem=what, error=str(err))
                out.send(error_event(str(err), "payload_too_large" if what == "too_large" else "invalid_event"))
                return
            for event in events:
                front.on_event(event)
                if front.refused:
                    return  # the box is full: the refusal goes out, then the connection closes
