"""HTTP on the WebSocket port: the browser console at /, /health, /ready, /metrics, and a 4xx for anything else."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from http import HTTPStatus
from importlib import resources
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .hub import Hub
from .runtime import FETCH_HINT

PROBES = ("/health", "/ready", "/metrics")
# The browser console (local_ai_server/console/): path -> (file, Content-Type). Static, no build step.
CONSOLE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/worklet.js": ("worklet.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}
# A Host header fit to be named in the CSP (a name or an address, and a port); anything else gets 'self' only.
HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def answer(request: Request, hub: Hub) -> Response | None:
    """The response to a plain HTTP request, or None to let the WebSocket handshake proceed."""
    upgrades = [v.strip().lower() for v in request.headers.get_all("Upgrade")]
    path = request.path.split("?", 1)[0].rstrip("/") or "/"
    if "websocket" in upgrades:
        if len(upgrades) > 1:
            return json_response(HTTPStatus.BAD_REQUEST, {"status": "bad_request",
                                                          "message": "more than one Upgrade header"})
        if hub.draining:
            # Calls end here; a new one belongs on another instance (a load balancer retries it there).
            return draining()
        return None  # the WebSocket handshake, checked by websockets itself
    # websockets < 17 parses only GET (its Request has no `method`): other methods never get this far there.
    method = getattr(request, "method", "GET")
    if method not in ("GET", "HEAD"):
        status = HTTPStatus.METHOD_NOT_ALLOWED if path in PROBES else HTTPStatus.NOT_FOUND
        response = json_response(status, {"status": status.phrase.lower().replace(" ", "_")})
        response.headers["Allow"] = "GET, HEAD"
        return response
    response = console(path, request.headers.get("Host")) if path in CONSOLE else probe(path, hub)
    if method == "HEAD":
        # The headers of the GET (Content-Length included), without its body.
        return Response(response.status_code, response.reason_phrase, response.headers, b"")
    return response


def probe(path: str, hub: Hub) -> Response:
    """A probe's answer (404 with the list of endpoints for any other path)."""
    engines = hub.engines
    if path == "/health":
        return json_response(HTTPStatus.OK, {"status": "ok", "uptime_s": hub.uptime()})
    if path == "/ready":
        if hub.draining:
            return draining(hub.calls)
        missing = engines.missing()
        if engines.warming:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "warming_up", "missing": missing})
        if missing:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"status": "not_ready", "missing": missing, "hint": FETCH_HINT})
        if hub.admission.full():
            return full(hub)
        return json_response(HTTPStatus.OK, {"status": "ready"})
    if path == "/metrics":
        body = hub.metrics.render()
        headers = Headers([("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                           ("Content-Length", str(len(body))), ("Connection", "close")])
        return Response(200, "OK", headers, body)
    return json_response(HTTPStatus.NOT_FOUND, {"status": "not_found",
                                                "endpoints": ["/", "/health", "/ready", "/metrics", "ws://"]})


def draining(calls: int | None = None) -> Response:
    """503 "draining": what /ready says, and how a new connection is refused, while the server drains."""
    body: dict[str, Any] = {"status": "draining", "message": "shutting down: open calls end their turns, "
                                                            "new calls are refused"}
    if calls is not None:
        body["calls"] = calls
    response = json_response(HTTPStatus.SERVICE_UNAVAILABLE, body)
    response.headers["Retry-After"] = "1"
    return response


def full(hub: Hub) -> Response:
    """503 "full": every call place is taken (LOCAL_MAX_CALLS); a load balancer sends new calls elsewhere."""
    admission = hub.admission
    response = json_response(HTTPStatus.SERVICE_UNAVAILABLE, {
        "status": "full", "calls": admission.active, "max_calls": admission.max_calls,
        "message": "every call place is taken: new calls are refused busy, calls in progress go on"})
    response.headers["Retry-After"] = "1"
    return response


def console(path: str, host: str | None) -> Response:
    """A file of the browser console, with a CSP that allows nothing but this server (and its WebSocket)."""
    name, content_type = CONSOLE[path]
    body = _console_file(name)
    # CSP level 3 lets 'self' cover ws:// and wss:// of the same host; older browsers need them spelled out.
    sockets = f" ws://{host} wss://{host}" if host and HOST.fullmatch(host) else ""
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
           f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Content-Security-Policy", csp), ("X-Content-Type-Options", "nosniff"),
                       ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-cache"), ("Connection", "close")])
    return Response(200, "OK", headers, body)


@lru_cache(maxsize=len(CONSOLE))
def _console_file(name: str) -> bytes:
    """A console file as shipped in the package (read once)."""
    return (resources.files(__package__) / "console" / name).read_bytes()


def json_response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    """A small JSON response that closes the connection."""
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)
