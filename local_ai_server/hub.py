"""What every front shares: the config, the engines, the metrics, the server's own tasks and its calls."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from .admission import Admission
from .config import ServerConfig
from .errors import Busy, RequestId
from .metrics import Metrics
from .runtime import Engines
from .tasks import ErrorHandler, TaskOwner

log = structlog.get_logger(__name__)


class Hub:
    """The server-wide state a connection's front may read or ask for."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engines = Engines(cfg, self.metrics)
        # The server's own background work (model loading, probes of itself, model switches).
        self.tasks = TaskOwner("server")
        self.calls = 0  # connections open now
        self.admission = Admission(cfg.max_calls)  # calls in progress, against LOCAL_MAX_CALLS
        # Set on SIGTERM: /ready says "draining" and new connections are refused while the calls end.
        self.draining = False
        self.started = time.monotonic()
        self._admin_task: asyncio.Task[Any] | None = None
        self._session_ids = itertools.count(1)

    def new_session_id(self) -> int:
        """A number for a new connection's session, unique across every front."""
        return next(self._session_ids)

    def uptime(self) -> float:
        """Seconds since start."""
        return round(time.monotonic() - self.started, 1)

    def admit(self, session_id: int, front: str) -> bool:
        """Count the session's call in (True), or refuse it because the box is full (False, counted)."""
        if self.admission.admitted(session_id):
            return True
        if not self.admission.admit(session_id):
            self.metrics.calls_refused.labels(front).inc()
            log.warning("call.refused_full", session=session_id, front=front, calls=self.admission.active,
                        max_calls=self.admission.max_calls)
            return False
        self.metrics.calls_active.set(self.admission.active)
        return True

    def release(self, session_id: int) -> None:
        """The session's call ended: its place is free."""
        self.admission.release(session_id)
        self.metrics.calls_active.set(self.admission.active)

    def admin(self, coro: Coroutine[Any, Any, None], name: str, request_id: RequestId,
              on_error: ErrorHandler) -> None:
        """Run one model switch/reload at a time; a second one while one runs gets `busy`.

        The server owns the task (a model load outlives the connection that asked for it); a failure
        nobody foresaw still reaches `on_error`, so the requester gets its one answer.
        """
        if self._admin_task is not None and not self._admin_task.done():
            coro.close()
            raise Busy("a model switch or reload is already in progress", request_id=request_id)
        self._admin_task = self.tasks.spawn(coro, name=name, on_error=on_error)
