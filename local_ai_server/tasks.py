"""Structured concurrency: every background task has an owner that handles its failure and outlives it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

from .errors import ServerError

log = structlog.get_logger(__name__)
T = TypeVar("T")

# What an owner does with a task's exception (never a CancelledError): reply to the client, count it.
ErrorHandler = Callable[[BaseException], None]


class TaskOwner:
    """A set of tasks with one owner: each failure goes to its handler; `aclose` cancels and awaits all.

    Unlike a bare `create_task`, no exception here can end as "Task exception was never retrieved":
    a task that raises has its exception logged with its traceback (server side only) and handed to
    the `on_error` given at spawn (or the owner's default). Unlike `asyncio.TaskGroup`, one failing task
    does not cancel its siblings: a connection's requests are independent, and each gets its own answer.
    """

    def __init__(self, name: str, on_error: ErrorHandler | None = None) -> None:
        self.name = name
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, on_error: ErrorHandler | None = None,
              name: str | None = None) -> asyncio.Task[T]:
        """Start `coro` as a task of this owner; its exception goes to `on_error` (else the default)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name} is closed")
        handler = on_error or self._on_error
        task = asyncio.get_running_loop().create_task(self._guard(coro, handler), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        # A task cancelled before it first ran never started `coro`: close it, or Python warns it was never
        # awaited (closing a finished coroutine does nothing).
        task.add_done_callback(lambda t: coro.close() if t.cancelled() else None)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            # Marks the outcome retrieved: the guard has handled it; an awaiter still gets it raised.
            task.exception()

    async def _guard(self, coro: Coroutine[Any, Any, T], handler: ErrorHandler | None) -> T:
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            what = getattr(coro, "__qualname__", repr(coro))
            if isinstance(exc, ServerError):
                # An error the server itself raised on purpose: its message is the client's reply.
                log.info("task.error", owner=self.name, task=what, code=exc.code, error=exc.message)
            else:
                # A bug: the traceback stays in the server's log; the client gets the handler's reply.
                log.exception("task.failed", owner=self.name, task=what)
            if handler is not None:
                try:
                    handler(exc)
                except Exception:  # noqa: BLE001 - a failing handler must not hide the first failure
                    log.exception("task.error_handler_failed", owner=self.name)
            raise

    def cancel(self) -> None:
        """Cancel every task (they finish their cleanup when next scheduled)."""
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait for them; no task of this owner runs after it returns (within timeout)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                log.warning("tasks.not_stopped", owner=self.name, pending=len(pending))

    async def __aenter__(self) -> TaskOwner:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        # Leaving the block ends every task started in it: nothing outlives its scope.
        await self.aclose()
