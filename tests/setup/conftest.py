"""Fixtures for installer tests: tiny real wheels and a real local PEP 503 index over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import zipfile
from collections.abc import Iterator
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
