"""Pacing a spoken answer by its playback: its LLM job's urgency, and synthesis no further ahead than the pace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from local_ai_server.engines.llm import SamplingParams
from local_ai_server.priority import BACKGROUND, HELD, REFILL, URGENT
from local_ai_server.voice.events import Speech
from local_ai_server.voice.pace import CHARS_PER_S, Pacer

from .test_voice_call import FakeJob, Rig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class LevelJob:
    def __init__(self) -> None:
        self.levels: list[int] = []

    def set_priority(self, level: int) -> None:
        self.levels.append(level)


def test_an_answer_is_urgent_until_its_first_sentence_then_follows_its_lead() -> None:
    clock, job = Clock(), LevelJob()
    pacer = Pacer(job, 4.0, clock)
    pacer.update()
    assert job.levels == [] and pacer.level == URGENT  # nothing written yet: the caller waits
    pacer.written("x" * int(2 * CHARS_PER_S))  # two seconds of speech written
    assert job.levels == [BACKGROUND]
    pacer.sent("x" * int(2 * CHARS_PER_S), 2.0)  # ... and sent: two seconds of audio ahead
    assert job.levels == [BACKGROUND] and pacer.ahead() == 2.0
    pacer.written("y" * int(3 * CHARS_PER_S))  # five seconds ahead: past the pace
    assert job.levels == [BACKGROUND, HELD]
    pacer.sent("y" * int(3 * CHARS_PER_S), 3.0)
    assert pacer.due() == 105.0 and pacer.synth_wait() == 1.0  # the next one waits for playback
    clock.now += 2.0  # three seconds left
    pacer.update()
    assert job.levels == [BACKGROUND, HELD, BACKGROUND]
    clock.now += 2.0  # one second left: about to run out
    pacer.update()
    assert job.levels == [BACKGROUND, HELD, BACKGROUND, REFILL] and pacer.synth_wait() == 0.0
    pacer.finished = True
    clock.now += 5.0
    pacer.update()
    assert job.levels[-1] == REFILL  # the LLM is done with it: nothing more to tell


def test_an_unpaced_answer_is_never_held() -> None:
    job = LevelJob()
    pacer = Pacer(job, None, Clock())
    pacer.written("z" * 1000)
    assert job.levels == [BACKGROUND] and pacer.synth_wait() == 0.0


class RecordingJob(FakeJob):
    """A fake generation that records the urgency it is given, and how much it had yielded then."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces, 0.01, None)
        self.yielded = 0
        self.levels: list[tuple[int, int]] = []

    async def stream(self) -> AsyncIterator[str]:
        async for piece in super().stream():
            self.yielded += 1
            yield piece

    def set_priority(self, level: int) -> None:
        self.levels.append((level, self.yielded))


async def test_a_spoken_answer_is_background_after_its_first_sentence_and_held_when_far_ahead() -> None:
    rig = Rig(LOCAL_PACE_AHEAD_S="1.0")
    jobs: list[RecordingJob] = []
    synthesized: list[str] = []

    def submit(messages: list[tuple[str, str]], sampling: SamplingParams) -> RecordingJob:
        jobs.append(RecordingJob(["One two three. ", "Four five six. ", "Seven eight. ", "Nine ten."]))
        return jobs[-1]

    async def synthesize(text: str, due: float | None = None) -> tuple[np.ndarray, int]:
        synthesized.append(text)
        await asyncio.sleep(0)
        return np.full(8000, 0.1, dtype=np.float32), 16000  # half a second each

    rig.engines.pool.submit = submit  # type: ignore[method-assign]
    rig.engines.synthesize = synthesize  # type: ignore[method-assign]
    try:
        turn = rig.call.start_turn("Hi", kind="voice", request_id=None, speak=True, stream_tokens=False)
        await rig.finish(turn)
    finally:
        await rig.call.close()
    (job,) = jobs
    assert [s.text for s in rig.sink.of(Speech)] == synthesized == [
        "One two three.", "Four five six.", "Seven eight.", "Nine ten."]
    levels = [level for level, _ in job.levels]
    assert job.levels[0][1] >= 1  # urgent until its first sentence was written
    assert levels[0] in (BACKGROUND, REFILL) and HELD in levels and URGENT not in levels  # 1 s pace


async def test_fifo_scheduling_does_not_hold_an_answer() -> None:
    rig = Rig(LOCAL_SCHEDULING="fifo", LOCAL_PACE_AHEAD_S="0.1")
    jobs: list[RecordingJob] = []

    def submit(messages: list[tuple[str, str]], sampling: SamplingParams) -> RecordingJob:
        jobs.append(RecordingJob(["A long first sentence here. ", "And a second one. ", "Third."]))
        return jobs[-1]

    rig.engines.pool.submit = submit  # type: ignore[method-assign]
    try:
        turn = rig.call.start_turn("Hi", kind="voice", request_id=None, speak=True, stream_tokens=False)
        await rig.finish(turn)
    finally:
        await rig.call.close()
    assert HELD not in [level for level, _ in jobs[0].levels]
    assert len(rig.sink.of(Speech)) == 3
