"""The turn detector's part of the runtime: loaded like the VAD, run on the STT threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import structlog

from .config import ServerConfig
from .engines.turn import SmartTurn
from .errors import NotReady

log = structlog.get_logger(__name__)
T = TypeVar("T")


class TurnDetection:
    """Mixin of runtime.Engines: the optional turn detector; a missing model only disables smart turns."""

    cfg: ServerConfig
    turn: SmartTurn | None = None
    turn_error: str | None = None

    async def run_aux(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work off the loop (runtime.Engines')."""
        raise NotImplementedError

    async def run_stt(self, kind: str, fn: Callable[..., T], *args: Any) -> T:
        """Work on the STT threads, counted and timed as a transcription is (runtime.Engines')."""
        raise NotImplementedError

    async def _load_turn(self) -> None:
        path = self.cfg.stt.turn_model_path
        if path is None or not path.is_file():
            # Not an error for /ready: sessions asking for smart turns get VAD turns (set_mode says so).
            self.turn_error = f"no turn detector model at {path}" if path else "no turn detector model"
            log.info("turn.missing", path=str(path))
            return
        try:
            self.turn = await self.run_aux(SmartTurn, path, 1)
        except Exception as exc:  # noqa: BLE001 - recorded; the feature is off
            self.turn_error = f"{type(exc).__name__}: {exc}"
            log.error("turn.load_failed", error=self.turn_error)

    def turn_available(self) -> bool:
        """Whether semantic turn detection can be used."""
        return self.turn is not None

    async def turn_probability(self, audio: np.ndarray) -> float:
        """Probability that the caller finished, scored on the STT threads (it shares their core budget)."""
        turn = self.turn
        if turn is None:
            raise NotReady(self.turn_error or "turn detector is not loaded")
        # The same thread, queue-wait metric and in-flight count as a transcription: a score delays a partial
        # just as a final does.
        return await self.run_stt("turn", turn.probability, audio)
