"""Per-connection writer: control replies overtake audio, cancelled turns are dropped, memory is bounded."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from . import protocol as P
from .tasks import TaskOwner

if TYPE_CHECKING:
    from .voice.turn import Turn

log = structlog.get_logger(__name__)

# Per queued item, beyond its own bytes: the deque slot, the tuple, the str object headers.
ITEM_OVERHEAD = 200


class Socket(Protocol):
    """What the outbox needs of a connection (a websockets ServerConnection)."""

    transport: Any

    async def send(self, message: str | bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class ConnectionOutbox:
    """Everything a connection will send, waiting for the client to read it, within two bounds.

    Control replies (acks, status, errors) overtake data (transcripts, tokens, audio), and data of a
    cancelled turn is dropped unsent. Both kinds count towards `max_items` and `max_bytes`: a client that
    stops reading while it keeps sending requests (or while answers stream to it) is closed with 1008,
    and its TCP link dropped, once it would hold more than that; nothing it does makes the server hold
    more. One message is always taken into an empty outbox, whatever its size.
    """

    def __init__(self, ws: Socket, max_items: int, owner: TaskOwner, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.ws = ws
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._owner = owner
        self._control: collections.deque[str] = collections.deque()
        self._data: collections.deque[tuple[str, bytes | None, Turn | None]] = collections.deque()
        self.queued_bytes = 0
        self._wake = asyncio.Event()
        self.overflowed = False
        self._sending = False  # the writer is sending what it took off the queues

    @property
    def idle(self) -> bool:
        """Everything queued has been handed to the connection (a close frame now follows all of it)."""
        return not self._control and not self._data and not self._sending

    def __len__(self) -> int:
        return len(self._control) + len(self._data)

    def send_control(self, msg: dict[str, Any]) -> None:
        """Queue a reply that must not wait behind audio."""
        text = P.dumps(msg)
        if self._admit(len(text)):
            self._control.append(text)
            self._wake.set()

    def send_data(self, msg: dict[str, Any], turn: Turn | None = None) -> None:
        """Queue an ordered data message."""
        text = P.dumps(msg)
        if self._admit(len(text)):
            self._data.append((text, None, turn))
            self._wake.set()

    def send_audio(self, header: dict[str, Any], payload: bytes, turn: Turn) -> None:
        """Queue a tts_audio header with its binary frame."""
        text = P.dumps(header)
        if self._admit(len(text) + len(payload)):
            self._data.append((text, payload, turn))
            self._wake.set()

    def discard_speech(self) -> int:
        """Drop queued audio, and everything of voice turns, even of answers already complete (barge-in).

        Replies owed to a request (an llm_response, a tts_response) stay: each request gets its answer.
        """
        kept: collections.deque[tuple[str, bytes | None, Turn | None]] = collections.deque()
        dropped = 0
        for item in self._data:
            text, payload, turn = item
            if turn is not None and (payload is not None or turn.kind == "voice"):
                self.queued_bytes -= len(text) + len(payload or b"") + ITEM_OVERHEAD
                dropped += 1
            else:
                kept.append(item)
        self._data = kept
        return dropped

    def _admit(self, size: int) -> bool:
        """Count a message in, or close the connection if the client is not reading it."""
        if self.overflowed:
            return False
        cost = size + ITEM_OVERHEAD
        if len(self) and (len(self) >= self.max_items or self.queued_bytes + cost > self.max_bytes):
            # The client stopped reading: memory must stay bounded, so the connection goes.
            self.overflowed = True
            log.warning("connection.send_queue_overflow", items=len(self), bytes=self.queued_bytes)
            self._control.clear()
            self._data.clear()
            self.queued_bytes = 0
            self._owner.spawn(self._close_stuck(), name="close-stuck")
            return False
        self.queued_bytes += cost
        return True

    async def _close_stuck(self) -> None:
        """Close with 1008; a client that reads nothing never sees the close frame, so then drop the TCP link."""
        try:
            await asyncio.wait_for(self.ws.close(1008, "client is not reading; send queue full"), 2.0)
        except (asyncio.TimeoutError, OSError):
            pass
        except Exception:  # noqa: BLE001 - ConnectionClosed and friends: the link goes below either way
            pass
        transport = self.ws.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been handed to the connection; False if `timeout` came first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.idle:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)  # rare (a refusal before a close): a short poll keeps the writer simple
        return True

    async def run(self) -> None:
        """Send queued messages until the connection closes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._sending = True
            try:
                await self._send_queued()
            finally:
                self._sending = False

    async def _send_queued(self) -> None:
        """Send until both queues are empty: control first, then data (skipping cancelled turns' data)."""
        while self._control or self._data:
            if self._control:
                text = self._control.popleft()
                self.queued_bytes -= len(text) + ITEM_OVERHEAD
                await self.ws.send(text)
                continue
            text, payload, turn = self._data.popleft()
            self.queued_bytes -= len(text) + len(payload or b"") + ITEM_OVERHEAD
            if turn is not None and turn.cancelled:
                continue
            await self.ws.send(text)
            if payload is not None:
                # No await between header and audio may let another message in: the pair is atomic.
                await self.ws.send(payload)
