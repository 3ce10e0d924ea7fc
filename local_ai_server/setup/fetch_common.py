"""What every fetch step shares: its errors, the progress-log protocol and its default sink."""

from __future__ import annotations

from typing import Protocol

import structlog

from local_ai_server.setup.registry import SetupError


class FetchError(SetupError):
    """A model file could not be fetched or did not verify."""


class DiskSpaceError(FetchError):
    """Not enough free disk space to fetch the missing files."""


class LogFn(Protocol):
    """Progress sink: an event name plus key-value fields (structlog style)."""

    def __call__(self, event: str, **fields: object) -> None:
        """Record one progress event."""


def structlog_log(event: str, **fields: object) -> None:
    """Default progress sink: an info event on the `local_ai_server.setup` structlog logger."""
    structlog.get_logger("local_ai_server.setup").info(event, **fields)


def mb(n: int) -> float:
    """Bytes as MB with one decimal, as the fetch log reports sizes."""
    return round(n / 1_000_000, 1)
