"""Wyoming's wire format, sans I/O and bounded: bytes in, `Event`s out; `Event`s in, bytes out.

An event is a JSON header line, then `data_length` bytes of JSON merged into its `data`, then
`payload_length` bytes of payload. The `wyoming` package's own reader trusts those lengths and reads
a header line of any length; this one refuses what would make the server hold more than its limits,
before it holds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from wyoming.event import Event
from wyoming.version import __version__ as WIRE_VERSION  # written into every header, as its peers do

_SKIP = object()  # a blank line between events: nothing to return, keep reading


class WireError(ValueError):
    """Bytes that are not a Wyoming event: the connection cannot be read any further."""


class TooLarge(WireError):
    """A header, data or payload longer than the server accepts."""


@dataclass(frozen=True)
class WireLimits:
    """The most the parser holds for one event."""

    header_bytes: int = 64 * 1024
    data_bytes: int = 256 * 1024
    payload_bytes: int = 8 * 1024 * 1024


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"{key} must be a non-negative integer")
    if value > limit:
        raise TooLarge(f"{key} {value} is over the limit of {limit} bytes")
    return value


class WireParser:
    """Feed it bytes as they arrive; it returns the events they complete."""

    def __init__(self, limits: WireLimits | None = None) -> None:
        self.limits = limits or WireLimits()
        self._buf = bytearray()
        # The event whose header has been read, with the data and payload lengths still to come.
        self._header: dict[str, Any] | None = None
        self._data_len = 0
        self._payload_len = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of an event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        """The events `chunk` completes; raises WireError (or TooLarge) when the stream is not valid."""
        self._buf += chunk
        events: list[Event] = []
        while True:
            event = self._next()
            if event is None:
                return events
            if isinstance(event, Event):
                events.append(event)

    def _next(self) -> Event | object | None:
        if self._header is None:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.limits.header_bytes:
                    raise TooLarge(f"header line over {self.limits.header_bytes} bytes")
                return None
            if end > self.limits.header_bytes:
                raise TooLarge(f"header line over {self.limits.header_bytes} bytes")
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            if not line.strip():
                return _SKIP  # blank lines between events are tolerated
            self._header = _header(line)
            self._data_len = _length(self._header, "data_length", self.limits.data_bytes)
            self._payload_len = _length(self._header, "payload_length", self.limits.payload_bytes)
        need = self._data_len + self._payload_len
        if len(self._buf) < need:
            return None
        header, self._header = self._header, None
        data = dict(header.get("data") or {})
        if self._data_len:
            extra = _json_object(bytes(self._buf[:self._data_len]), "data")
            data.update(extra)
        payload = bytes(self._buf[self._data_len:need]) if self._payload_len else None
        del self._buf[:need]
        return Event(type=header["type"], data=data, payload=payload)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise WireError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what} is not a JSON object")
    return obj


def _header(line: bytes) -> dict[str, Any]:
    header = _json_object(line, "header")
    if not isinstance(header.get("type"), str) or not header["type"]:
        raise WireError("header has no event type")
    if header.get("data") is not None and not isinstance(header["data"], dict):
        raise WireError("header data is not a JSON object")
    return header


def encode(event: Event) -> bytes:
    """One event as it goes on the wire (data after the header line, as the `wyoming` package writes it)."""
    header: dict[str, Any] = {"type": event.type, "version": WIRE_VERSION}
    data = json.dumps(event.data, ensure_ascii=False).encode() if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    line = json.dumps(header, ensure_ascii=False).encode() + b"\n"
    return line + data + (event.payload or b"")
