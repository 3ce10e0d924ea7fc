"""Semantic turn detection in a call's listening: score the utterance at a short pause, end it if complete.

A mixin of voice.listen.Listener (kept apart for size); the decisions themselves are voice.endpoint's.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import structlog

from ..config import SttConfig
from ..errors import RequestId, ServerError
from ..session import Session
from ..tasks import TaskOwner
from ..vad import Segmenter, UtteranceEnd
from .endpoint import EndpointPolicy, Key, TurnSettings, turn_settings
from .ports import Answering, Engines

log = structlog.get_logger(__name__)


class TurnEnding:
    """Listener's smart-turn part: its attributes are the Listener's own."""

    session: Session
    engines: Engines
    cfg: SttConfig
    answering: Answering
    closed: bool
    _tasks: TaskOwner
    _segmenter: Segmenter | None
    _endpoint: EndpointPolicy
    _segmenting: bool
    _end_when_back: Key | None
    _guess: tuple[tuple[int, int], Any] | None
    _speaking: bool

    def _voice_activity(self, started: bool, at_ms: float, transcribed: bool = True) -> None:
        raise NotImplementedError

    def _queue_final(self, ev: UtteranceEnd | None, mode: str, rid: RequestId) -> None:
        raise NotImplementedError

    def turn_settings(self) -> TurnSettings:
        """The session's turn detection; "smart" only while the detector is loaded."""
        ts = turn_settings(self.session, self.cfg)
        return ts if not ts.smart or self.engines.turn_available() else replace(ts, mode="vad")

    def turn_echo(self) -> dict[str, Any]:
        """The effective turn settings, as mode_ready echoes them ("vad" when smart was asked without a detector)."""
        ts = self.turn_settings()
        return {"turn_detection": ts.mode, "turn_threshold": ts.threshold, "turn_short_ms": ts.short_ms,
                "turn_long_ms": ts.long_ms}

    def _maybe_score_turn(self, mode: str, rid: RequestId) -> None:
        """At a short pause (smart turns), ask the detector whether the caller finished."""
        seg = self._segmenter
        if seg is None or not self._endpoint.due(seg.in_speech, seg.silence_ms, key := seg.pending_final_key()):
            return
        task = self._tasks.spawn(self._score(seg.utterance_audio()))
        task.add_done_callback(lambda t: self._on_score(key, t, mode, rid))

    async def _score(self, audio: np.ndarray) -> float | None:
        try:
            return await self.engines.turn_probability(audio)
        except ServerError:
            return None  # unloaded meanwhile: the long silence ends the turn

    def _on_score(self, key: Key, task: asyncio.Task[float | None], mode: str, rid: RequestId) -> None:
        seg = self._segmenter
        if self.closed or seg is None or task.cancelled() or task.exception() is not None:
            return
        p = task.result()
        log.debug("turn.scored", session=self.session.id, probability=p)
        if p is not None and self._endpoint.verdict(key, p, seg.in_speech, seg.silence_ms, seg.pending_final_key()):
            if self._segmenting:
                self._end_when_back = key  # the speech loop ends it once the thread is done with the segmenter
            else:
                self._end_turn(key, mode, rid)
        elif self._guess is not None and self._guess[0] == key and not self._endpoint.keeps_guess(key):
            guess, self._guess = self._guess[1], None
            self.answering.drop_guess(guess)  # incomplete: the caller is expected to go on

    def _end_turn(self, key: Key, mode: str, rid: RequestId) -> None:
        """The detector judged the utterance complete: end it now, as a long silence would have."""
        self._end_when_back = None
        seg = self._segmenter
        if seg is None or not seg.in_speech or seg.silence_ms <= 0 or seg.pending_final_key() != key:
            return
        ev = seg.end_now()
        if self._speaking:
            self._voice_activity(False, ev.at_ms if ev is not None else seg.clock_ms, transcribed=ev is not None)
        if ev is not None:
            self._queue_final(ev, mode, rid)
