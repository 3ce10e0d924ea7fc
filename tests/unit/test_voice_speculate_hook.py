"""The core's early answers handed to a front that answers the stt mode's finals itself (Call.answer_stt_with)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from local_ai_server.errors import RequestId
from local_ai_server.voice.events import Answer, Failure, Speech, Token, Transcribed
from local_ai_server.voice.guess import Guess
from local_ai_server.voice.turn import Turn

from .test_voice_call import Rig, tone


class FakeFront:
    """A front that starts held turns on guesses and, on the final, opens its response then confirms."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.guesses: list[str] = []
        self.finals: list[tuple[str, Guess | None]] = []
        self.opened: list[int] = []  # where in the sink's events the front opened a response (its response.created)
        rig.call.answer_stt_with(self)

    def guess(self, text: str, request_id: RequestId) -> Turn | None:
        self.guesses.append(text)
        return self.rig.call.start_turn(text, kind="realtime", request_id=f"early_{len(self.guesses)}", speak=True,
                                        stream_tokens=True, remember=text, held=True)

    def heard(self, text: str, request_id: RequestId, guess: Guess | None) -> None:
        self.finals.append((text, guess))
        if guess is not None:
            self.opened.append(len(self.rig.sink.events))
            self.rig.call.confirm(guess)
        else:
            self.rig.call.start_turn(text, kind="realtime", request_id="fresh", speak=True, stream_tokens=True)


@pytest.fixture
async def stt_rig() -> AsyncIterator[tuple[Rig, FakeFront]]:
    r = Rig()
    r.session.mode = "stt"
    front = FakeFront(r)
    yield r, front
    await r.call.close()


async def test_a_confirmed_guess_runs_the_front_hook_once_then_its_buffered_events_in_order(
        stt_rig: tuple[Rig, FakeFront]) -> None:
    rig, front = stt_rig
    text = "What is the capital of France?"
    guess = rig.call.guess(text, "stt", None)
    assert guess is not None and guess.turn.held
    await rig.until(lambda: guess.turn.task is not None and guess.turn.task.done())
    assert rig.sink.events == []  # the whole answer waited, unsent
    rig.call.heard(text, "stt", None, 0.0, 1.0, guess)
    assert len(front.finals) == 1 and front.finals[0][1] is guess
    kinds = [type(e) for e, _ in rig.sink.events]
    assert front.opened == [0]  # opened before anything of the turn went out
    assert kinds[-1] is Answer and Token in kinds and Speech in kinds
    tokens = [e.delta for e, _ in rig.sink.events if isinstance(e, Token)]
    assert "".join(tokens).strip() == rig.engines.pool.answer  # generated order, kept
    assert all(t is guess.turn for _e, t in rig.sink.events)
    assert len(rig.engines.pool.jobs) == 1
    assert rig.session.history[-1] == ("assistant", rig.engines.pool.answer)
    assert guess.turn.timings["stt_ms"] == 1.0 and "speculated" in guess.turn.timings


async def test_a_guess_for_other_words_is_dropped_without_an_event(stt_rig: tuple[Rig, FakeFront]) -> None:
    rig, front = stt_rig
    rig.engines.pool.delay = 0.01
    guess = rig.call.guess("I would like to book a table", "stt", None)
    assert guess is not None
    rig.call.heard("I would like to book a table for two", "stt", None, 0.0, 1.0, guess)
    assert front.finals == [("I would like to book a table for two", None)]  # the front answers afresh
    await rig.until(lambda: rig.sink.of(Answer))
    await asyncio.sleep(0.05)
    assert guess.turn.cancelled
    assert all(t is not guess.turn for _e, t in rig.sink.events)
    assert front.opened == []
    assert [u for u, _ in rig.session.history if u == "user"] == ["user"]


async def test_a_held_turn_cancelled_by_a_barge_in_sends_no_cancelled_error(stt_rig: tuple[Rig, FakeFront]) -> None:
    rig, _front = stt_rig
    rig.engines.pool.delay = 0.01
    guess = rig.call.guess("Hello there", "stt", None)
    assert guess is not None
    rig.call.cancel_all()
    await asyncio.sleep(0.05)
    assert guess.turn.cancelled and not rig.sink.of(Failure)  # nothing of it was ever sent: no requester waits
    assert rig.sink.events == []


async def test_without_a_front_stt_finals_start_no_guess_and_no_answer() -> None:
    r = Rig(LOCAL_STT_SPECULATE_MS="200")
    r.session.mode = "stt"
    try:
        for chunk in (tone(0.3, 0), tone(1.0), tone(1.0, 0)):
            for i in range(0, len(chunk), 640):
                r.call.accept_audio(chunk[i:i + 640], "pcm16le", 16000, None)
                await asyncio.sleep(0.001)
        await r.until(lambda: [t for t in r.sink.of(Transcribed) if t.final])
        await asyncio.sleep(0.05)
        assert not r.engines.pool.jobs and not r.sink.of(Answer)
    finally:
        await r.call.close()


async def test_speech_in_stt_mode_is_guessed_early_and_confirmed_after_its_final() -> None:
    r = Rig(LOCAL_STT_SPECULATE_MS="200")
    r.session.mode = "stt"
    front = FakeFront(r)
    try:
        for chunk in (tone(0.3, 0), tone(1.0), tone(1.0, 0)):
            for i in range(0, len(chunk), 640):
                r.call.accept_audio(chunk[i:i + 640], "pcm16le", 16000, None)
                await asyncio.sleep(0.001)
        await r.until(lambda: r.sink.of(Answer))
        await asyncio.sleep(0.05)
        assert front.guesses == [r.engines.heard]
        assert len(front.finals) == 1 and front.finals[0][1] is not None  # the guess was handed over, valid
        kinds = [type(e) for e, _ in r.sink.events]
        final = next(i for i, (e, _t) in enumerate(r.sink.events) if isinstance(e, Transcribed) and e.final)
        assert final < front.opened[0] <= kinds.index(Token) < kinds.index(Answer)
        assert all(t is front.finals[0][1].turn for _e, t in r.sink.events[front.opened[0]:])
        assert r.engines.transcribed == 1 and len(r.engines.pool.jobs) == 1 and len(r.sink.of(Answer)) == 1
    finally:
        await r.call.close()
