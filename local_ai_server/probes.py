"""HTTP on the WebSocket port: /health, /ready and /metrics, and a 4xx for anything else that is not a handshake."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .hub import Hub
from .runtime import FETCH_HINT

PROBES = ("/health", "/ready", "/metrics")


def answer(request: Request, hub: Hub) -> Response | None:
    """The response to a plain HTTP request, or None to let the WebSocket handshake proceed."""
    upgrades = [v.strip().lower() for v in request.headers.get_all("Upgrade")]
    path = request.path.split("?", 1)[0].rstrip("/") or "/"
    if "websocket" in upgrades:
        if len(upgrades) > 1:
            return json_response(HTTPStatus.BAD_REQUEST, {"status": "bad_request",
                                                          "message": "more than one Upgrade header"})
        return None  # the WebSocket handshake, checked by websockets itself
    # websockets < 17 parses only GET (its Request has no `method`): other methods never get this far there.
    method = getattr(request, "method", "GET")
    if method not in ("GET", "HEAD"):
        status = HTTPStatus.METHOD_NOT_ALLOWED if path in PROBES else HTTPStatus.NOT_FOUND
        response = json_response(status, {"status": status.phrase.lower().replace(" ", "_")})
        response.headers["Allow"] = "GET, HEAD"
        return response
    response = probe(path, hub)
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
        missing = engines.missing()
        if engines.warming:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "warming_up", "missing": missing})
        if missing:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"status": "not_ready", "missing": missing, "hint": FETCH_HINT})
        return json_response(HTTPStatus.OK, {"status": "ready"})
    if path == "/metrics":
        body = hub.metrics.render()
        headers = Headers([("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                           ("Content-Length", str(len(body))), ("Connection", "close")])
        return Response(200, "OK", headers, body)
    return json_response(HTTPStatus.NOT_FOUND, {"status": "not_found",
                                                "endpoints": ["/health", "/ready", "/metrics", "ws://"]})


def json_response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    """A small JSON response that closes the connection."""
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)
