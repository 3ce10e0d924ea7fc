"""Where the Wyoming front listens: `tcp://HOST:PORT` or `unix://PATH`, as the reference servers spell it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# The port Home Assistant's docs use for a first Wyoming service (wyoming-faster-whisper's default).
DEFAULT_PORT = 10300


@dataclass(frozen=True)
class WyomingUri:
    """A parsed listen address: TCP host and port, or a unix socket path."""

    scheme: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_uri(raw: str) -> WyomingUri:
    """`tcp://HOST[:PORT]` (port 10300 by default, 0 for any free port) or `unix://PATH`; raises ValueError."""
    text = raw.strip()
    parts = urlsplit(text)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise ValueError(f"{raw!r}: a unix:// address needs a socket path")
        return WyomingUri("unix", path=Path(path))
    if parts.scheme != "tcp":
        raise ValueError(f"{raw!r}: only tcp://HOST:PORT and unix://PATH are supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{raw!r}: a tcp:// address is only a host and a port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{raw!r}: the port must be a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{raw!r}: a tcp:// address needs a host (0.0.0.0 for every interface)")
    return WyomingUri("tcp", host=host, port=DEFAULT_PORT if port is None else port)
