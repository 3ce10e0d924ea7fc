"""Pacing an answer by its playback: how far its audio reaches ahead, and how urgently its tail is needed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..priority import BACKGROUND, HELD, REFILL, URGENT

# Speech rate assumed for text not yet synthesized (Piper's voices speak ~15-19 characters a second).
CHARS_PER_S = 15.0
# Below this much audio still to play (sent or written), the caller would soon hear silence: the tail
# becomes urgent again (REFILL), ahead of other answers' tails but after any caller's first sentence.
REFILL_S = 1.5
# How often a paced answer is looked at while nothing else happens to it.
TICK_S = 0.25


class Pacer:
    """One answer's lead over its playback; sets its LLM job's urgency (priority.URGENT .. HELD).

    Until the first sentence is written the answer is URGENT (a caller waits in silence). After that it
    is BACKGROUND, REFILL when its lead runs short, and HELD when the lead passes `ahead_s` (None: never
    held), so that a barge-in wastes at most that much generated and synthesized speech.
    """

    def __init__(self, job: Any, ahead_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.job = job
        self.ahead_s = ahead_s
        self.clock = clock
        self.first_written = False
        self.audio_end = 0.0  # when the audio sent so far will have played (clock time)
        self.text_chars = 0  # written, not yet synthesized
        self.level = URGENT
        self.finished = False  # the LLM is done with this answer: nothing left to pace

    def ahead(self) -> float:
        """Seconds of audio sent and not yet played."""
        return max(0.0, self.audio_end - self.clock())

    def lead(self) -> float:
        """Seconds of speech ready ahead of playback: audio sent, plus text written but not yet spoken."""
        return self.ahead() + self.text_chars / CHARS_PER_S

    def written(self, sentence: str) -> None:
        """The LLM completed `sentence` (queued for synthesis)."""
        self.text_chars += len(sentence)
        self.first_written = True
        self.update()

    def sent(self, sentence: str, seconds: float) -> None:
        """`sentence` went out as `seconds` of audio, played after what was sent before it."""
        self.text_chars = max(0, self.text_chars - len(sentence))
        self.audio_end = max(self.audio_end, self.clock()) + seconds
        self.update()

    def due(self) -> float:
        """When the next sentence's audio is needed (clock time): when what was sent has played."""
        return max(self.audio_end, self.clock())

    def synth_wait(self) -> float:
        """Seconds to wait before synthesizing the next sentence, to stay within `ahead_s` of playback."""
        if self.ahead_s is None:
            return 0.0
        return max(0.0, self.ahead() - self.ahead_s)

    def update(self) -> None:
        """Tell the job how urgently more of the answer is needed now."""
        if self.finished or not self.first_written:
            return
        lead = self.lead()
        if self.ahead_s is not None and lead > self.ahead_s:
            level = HELD
        elif lead < REFILL_S:
            level = REFILL
        else:
            level = BACKGROUND
        if level != self.level:
            self.level = level
            set_priority = getattr(self.job, "set_priority", None)
            if set_priority is not None:
                set_priority(level)
