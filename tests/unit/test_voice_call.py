"""The call core with fake engines: turns, barge-in, rollback, early answers, failures, disconnect; no models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from local_ai_server.config import ServerConfig, from_env
from local_ai_server.engines.llm import SamplingParams
from local_ai_server.engines.stt import Transcript
from local_ai_server.errors import NotReady
from local_ai_server.metrics import Metrics
from local_ai_server.session import INTERRUPTED_NOTE, Session
from local_ai_server.tasks import TaskOwner
from local_ai_server.voice.call import Call
from local_ai_server.voice.events import Answer, Event, Failure, Speech, Synthesized, Token, Transcribed
from local_ai_server.voice.turn import Turn

BOUND_S = 10.0  # a safety bound for waits, never a timing assertion


class FakeJob:
    """An LLM generation: fixed pieces, one per `delay`, optionally failing after them."""

    def __init__(self, pieces: list[str], delay: float, fail: BaseException | None) -> None:
        self.pieces, self.delay, self.fail = pieces, delay, fail
        self.last_tokens = 1
        self.stats: dict[str, Any] = {"tokens": len(pieces), "prompt_tokens": 42, "cached_tokens": 30}
        self.cancelled = False
        self.done = False

    async def stream(self) -> AsyncIterator[str]:
        for piece in self.pieces:
            await asyncio.sleep(self.delay)
            yield piece
        if self.fail is not None:
            raise self.fail
        self.done = True

    def cancel(self) -> None:
        self.cancelled = True


class FakePool:
    """Answers every chat with `answer`, word by word; records what it was asked."""

    def __init__(self) -> None:
        self.answer = "Paris is the capital. It is in France."
        self.delay = 0.0
        self.fail: BaseException | None = None
        self.asked: list[list[tuple[str, str]]] = []
        self.jobs: list[FakeJob] = []
        self.busy = 0

    def submit(self, messages: list[tuple[str, str]], sampling: SamplingParams) -> FakeJob:
        self.asked.append(list(messages))
        words = self.answer.split(" ")
        job = FakeJob([w + " " for w in words[:-1]] + [words[-1]], self.delay, self.fail)
        self.jobs.append(job)
        return job

    def snapshot(self) -> dict[str, Any]:
        return {"state": "ready", "workers": 1, "busy": self.busy, "queued": 0}


class EnergyVad:
    """A VAD that calls any window louder than -40 dBFS speech."""

    def probs(self, windows: np.ndarray) -> np.ndarray:
        return (np.sqrt((windows ** 2).mean(axis=1)) > 0.01).astype(np.float32)


class FakeEngines:
    """Engines that answer at once (or after `stt_delay`), with every failure switchable."""

    def __init__(self) -> None:
        self.pool = FakePool()
        self.default_prompt = "You are a test."
        self.stt_inflight = 0
        self.heard = "What is the capital of France?"
        self.stt_delay = 0.0
        self.tts_fail: BaseException | None = None
        self.transcribed = 0  # final transcriptions (partials not counted)
        self.turn_p: list[float] | None = None  # the turn detector's answers in order (None: no detector)
        self.scored: list[float] = []  # seconds of audio each turn score was asked for

    def stt_available(self) -> bool:
        return True

    def stt_loaded(self) -> bool:
        return True

    def vad_stream(self) -> EnergyVad:
        return EnergyVad()

    async def transcribe(self, audio: np.ndarray, kind: str = "final") -> Transcript:
        await asyncio.sleep(self.stt_delay)
        self.transcribed += kind == "final"
        return Transcript(self.heard, 0.9, len(audio) / 16000)

    async def synthesize(self, text: str, due: float | None = None) -> tuple[np.ndarray, int]:
        await asyncio.sleep(0)
        if self.tts_fail is not None:
            raise self.tts_fail
        return np.full(1600, 0.1, dtype=np.float32), 16000

    async def run_aux(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=64, temperature=0.0, top_p=1.0, repeat_penalty=1.0)

    def turn_available(self) -> bool:
        return self.turn_p is not None

    async def turn_probability(self, audio: np.ndarray) -> float:
        await asyncio.sleep(0)
        if self.turn_p is None:
            raise NotReady("no turn detector")
        self.scored.append(len(audio) / 16000)
        return self.turn_p[min(len(self.scored), len(self.turn_p)) - 1]


class RecordingSink:
    """Every event the call emits, in order, with the turn it belongs to."""

    def __init__(self) -> None:
        self.events: list[tuple[Event, Turn | None]] = []
        self.discarded = 0

    def control(self, event: Event) -> None:
        self.events.append((event, None))

    def data(self, event: Event, turn: Turn | None = None) -> None:
        self.events.append((event, turn))

    def discard_speech(self) -> int:
        self.discarded += 1
        return 0

    def of(self, kind: type) -> list[Any]:
        return [e for e, _t in self.events if isinstance(e, kind)]


def config(**env: str) -> ServerConfig:
    return from_env({"LOCAL_STT_PARTIAL_MS": "0", **env}, models_dir=Path("/nonexistent"))


class Rig:
    """A call on fake engines, and what it emitted."""

    def __init__(self, **env: str) -> None:
        self.engines = FakeEngines()
        self.sink = RecordingSink()
        self.session = Session(id=1, call_id="c1")
        self.tasks = TaskOwner("test")
        self.call = Call(self.session, self.engines, self.sink, config(**env), Metrics(), self.tasks)

    async def until(self, predicate: Any) -> None:
        async def wait() -> None:
            while not predicate():
                await asyncio.sleep(0.005)
        await asyncio.wait_for(wait(), BOUND_S)

    async def finish(self, turn: Turn) -> None:
        assert turn.task is not None
        await asyncio.wait_for(asyncio.shield(turn.task), BOUND_S)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.call.close()


def tone(seconds: float, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    x = amplitude * np.sin(2 * np.pi * 220 * t) if amplitude else np.zeros_like(t)
    return (x * 32767).astype("<i2").tobytes()


async def test_an_llm_request_streams_tokens_then_one_answer_and_is_remembered(rig: Rig) -> None:
    turn = rig.call.start_turn("What is the capital of France?", kind="llm_request", request_id="r1",
                               speak=False, stream_tokens=True)
    await rig.finish(turn)
    tokens, (answer,) = rig.sink.of(Token), rig.sink.of(Answer)
    assert "".join(t.delta for t in tokens).strip() == answer.text == rig.engines.pool.answer
    assert all(t.request_id == "r1" for t in tokens) and answer.request_id == "r1"
    assert [type(e) for e, _ in rig.sink.events][-1] is Answer
    assert rig.session.history[-2:] == [("user", "What is the capital of France?"), ("assistant", answer.text)]
    assert not rig.sink.of(Speech)


async def test_an_answer_tells_its_token_counts_and_its_exchange_is_keyed_by_its_request(rig: Rig) -> None:
    turn = rig.call.start_turn("Hi", kind="llm_request", request_id="r7", speak=True, stream_tokens=True)
    await rig.finish(turn)
    (answer,) = rig.sink.of(Answer)
    words = len(rig.engines.pool.answer.split(" "))
    assert answer.usage == {"output_tokens": words, "input_tokens": 42, "cached_tokens": 30}
    assert rig.session.history_keys == ["r7", "r7"]
    assert rig.session.edit_message("r7", "assistant", "Paris.") and rig.session.history[-1] == ("assistant", "Paris.")
    # Each chunk of speech says which sentence it is.
    assert [s.text for s in rig.sink.of(Speech)] == ["Paris is the capital.", "It is in France."]


async def test_a_cancelled_answer_is_remembered_under_its_request_id(rig: Rig) -> None:
    rig.engines.pool.answer = "One. Two. Three. Four. Five. Six."
    rig.engines.pool.delay = 0.02
    turn = rig.call.start_turn("Count", kind="llm_request", request_id="r8", speak=False, stream_tokens=True)
    await rig.until(lambda: len(rig.sink.of(Token)) >= 2)
    rig.call.cancel_all()
    assert turn.task is not None
    await asyncio.gather(turn.task, return_exceptions=True)
    assert rig.session.history_keys == ["r8", "r8"] and rig.session.history[-1][1].startswith("One.")


async def test_a_voice_turn_speaks_sentence_by_sentence_and_ends_its_utterance(rig: Rig) -> None:
    turn = rig.call.start_turn("Hi", kind="voice", request_id=None, speak=True, stream_tokens=False)
    await rig.finish(turn)
    speech = rig.sink.of(Speech)
    assert len(speech) == 2  # two sentences, two chunks
    assert [s.index for s in speech] == [0, 1] and [s.final for s in speech] == [False, True]
    assert len({s.utterance_id for s in speech}) == 1
    kinds = [type(e) for e, _ in rig.sink.events]
    assert kinds.index(Answer) > max(i for i, k in enumerate(kinds) if k is Speech)


async def test_barge_in_stops_the_answer_and_nothing_of_it_follows(rig: Rig) -> None:
    rig.engines.pool.answer = "One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten."
    rig.engines.pool.delay = 0.02
    turn = rig.call.start_turn("Count", kind="voice", request_id=None, speak=True, stream_tokens=False)
    await rig.until(lambda: rig.sink.of(Speech))
    assert rig.call.cancel_all() == 1
    mark = len(rig.sink.events)
    await asyncio.sleep(0.2)  # long enough for several more pieces, had the job gone on
    assert rig.sink.events[mark:] == []
    assert turn.cancelled and turn.task is not None and turn.task.done()
    assert rig.engines.pool.jobs[0].cancelled and not rig.engines.pool.jobs[0].done
    assert rig.sink.discarded == 1
    # What the caller heard of it stays in the history (no rollback asked).
    assert rig.session.history[-2][1] == "Count" and rig.session.history[-1][1].startswith("One.")


async def test_a_cancelled_request_is_answered_cancelled_exactly_once(rig: Rig) -> None:
    rig.engines.pool.delay = 0.05
    rig.call.start_turn("Hi", kind="llm_request", request_id="r9", speak=False, stream_tokens=False)
    assert rig.call.cancel_all() == 1
    await asyncio.sleep(0.2)
    failures = [f.error for f in rig.sink.of(Failure)]
    assert [(e.code, e.request_id) for e in failures] == [("cancelled", "r9")]
    assert not rig.sink.of(Answer)


async def test_rollback_of_an_interrupted_answer_leaves_no_trace_and_warns_the_next_prompt(rig: Rig) -> None:
    rig.engines.pool.answer = "One. Two. Three. Four. Five. Six."
    rig.engines.pool.delay = 0.02
    rig.call.start_turn("Count", kind="voice", request_id=None, speak=True, stream_tokens=False)
    await rig.until(lambda: rig.sink.of(Speech))
    rig.call.cancel_all(rollback=True)
    await asyncio.sleep(0.05)
    assert rig.session.history == [] and rig.session.interrupted
    rig.engines.pool.delay = 0.0
    await rig.finish(rig.call.start_turn("Hello", kind="voice", request_id=None, speak=False, stream_tokens=False))
    system = rig.engines.pool.asked[-1][0][1]
    assert INTERRUPTED_NOTE in system and not rig.session.interrupted
    assert [m for m in rig.engines.pool.asked[-1] if m[0] != "system"] == [("user", "Hello")]


async def test_rollback_after_the_answer_was_generated_forgets_that_exchange(rig: Rig) -> None:
    await rig.finish(rig.call.start_turn("First", kind="voice", request_id=None, speak=False, stream_tokens=False))
    await rig.finish(rig.call.start_turn("Second", kind="voice", request_id=None, speak=False, stream_tokens=False))
    rig.call.cancel_all(rollback=True)
    assert [m for m in rig.session.history if m[0] == "user"] == [("user", "First")]


async def test_an_early_answer_waits_for_the_final_then_speaks_in_order(rig: Rig) -> None:
    guess = rig.call.guess("What is the capital of France?", "full", None)
    assert guess is not None and guess.turn.held
    await rig.until(lambda: guess.turn.task is not None and guess.turn.task.done())
    assert rig.sink.events == []  # everything of it waited
    rig.sink.data(Transcribed("What is the capital of France?", True, "full"))  # what listening sends first
    rig.call.heard("What is the capital of France?", "full", None, 0.0, 1.0, guess)
    kinds = [type(e) for e, _ in rig.sink.events]
    assert kinds[0] is Transcribed and Speech in kinds and kinds[-1] is Answer
    assert len(rig.engines.pool.jobs) == 1  # the final did not start a second generation
    assert rig.session.history[-1] == ("assistant", rig.engines.pool.answer)


async def test_an_early_answer_to_other_words_is_dropped_unheard(rig: Rig) -> None:
    rig.engines.pool.delay = 0.01
    guess = rig.call.guess("I would like to book a table", "full", None)
    assert guess is not None
    rig.call.heard("I would like to book a table for two", "full", None, 0.0, 1.0, guess)
    await rig.until(lambda: rig.sink.of(Answer))
    await asyncio.sleep(0.05)
    assert guess.turn.cancelled
    assert all(t is not guess.turn for _e, t in rig.sink.events)
    assert rig.engines.pool.asked[-1][-1] == ("user", "I would like to book a table for two")
    assert [u for u, _ in rig.session.history if u == "user"] == ["user"]


async def test_no_guess_when_the_llm_has_no_free_worker(rig: Rig) -> None:
    rig.engines.pool.busy = 1
    assert rig.call.guess("Hello", "full", None) is None
    assert rig.engines.pool.jobs == []


async def test_a_crashed_llm_is_one_error_for_its_request_and_the_call_goes_on(rig: Rig) -> None:
    rig.engines.pool.fail = RuntimeError("worker exploded at /secret/path")
    turn = rig.call.start_turn("Hi", kind="llm_request", request_id="r1", speak=False, stream_tokens=True)
    assert turn.task is not None
    await asyncio.wait_for(asyncio.wait([turn.task]), BOUND_S)
    (failure,) = rig.sink.of(Failure)
    assert failure.error.code == "internal" and failure.error.request_id == "r1"
    assert "/secret" not in failure.error.message and not rig.sink.of(Answer)
    rig.engines.pool.fail = None
    await rig.finish(rig.call.start_turn("Again", kind="llm_request", request_id="r2", speak=False,
                                         stream_tokens=False))
    assert [a.request_id for a in rig.sink.of(Answer)] == ["r2"]


async def test_a_failed_tts_request_gets_the_error_and_an_empty_answer(rig: Rig) -> None:
    rig.engines.tts_fail = NotReady("TTS is not ready")
    await rig.finish(rig.call.speak_text("Hello there.", request_id="t1"))
    (failure,) = rig.sink.of(Failure)
    (done,) = rig.sink.of(Synthesized)
    assert failure.error.code == "not_ready" and failure.error.request_id == "t1"
    assert done.audio == b"" and done.text == "Hello there." and done.request_id == "t1"


async def test_a_tts_request_is_one_synthesized_answer(rig: Rig) -> None:
    await rig.finish(rig.call.speak_text("Hello there.", request_id="t2", encoding="mulaw", rate=8000))
    (done,) = rig.sink.of(Synthesized)
    assert done.encoding == "mulaw" and done.sample_rate_hz == 8000 and len(done.audio) == 800


async def test_disconnect_cancels_everything_and_leaves_no_task() -> None:
    r = Rig()
    r.engines.pool.answer = " ".join(["word"] * 200)
    r.engines.pool.delay = 0.02
    turn = r.call.start_turn("Talk", kind="voice", request_id=None, speak=True, stream_tokens=False)
    request = r.call.speak_text("Hello.", request_id="t")
    await r.until(lambda: len(r.engines.pool.jobs[0].pieces) and r.sink.events)
    await r.call.close()
    assert len(r.tasks) == 0
    assert turn.task is not None and turn.task.done() and request.task is not None and request.task.done()
    assert r.engines.pool.jobs[0].cancelled


async def test_speech_in_is_transcribed_then_answered_in_order() -> None:
    r = Rig(LOCAL_STT_SPECULATE_MS="0")
    try:
        for chunk in (tone(0.3, 0), tone(1.0), tone(1.0, 0)):
            for i in range(0, len(chunk), 640):  # 20 ms frames
                r.call.accept_audio(chunk[i:i + 640], "pcm16le", 16000, None)
                await asyncio.sleep(0)
        await r.until(lambda: r.sink.of(Answer))
        finals = [t for t in r.sink.of(Transcribed) if t.final]
        assert [f.text for f in finals] == [r.engines.heard]
        kinds = [type(e) for e, _ in r.sink.events]
        assert kinds.index(Transcribed) < kinds.index(Speech) < kinds.index(Answer)
        assert r.engines.pool.asked[0][-1] == ("user", r.engines.heard)
    finally:
        await r.call.close()


async def test_an_early_transcription_answers_the_same_utterance_once() -> None:
    r = Rig(LOCAL_STT_SPECULATE_MS="200")
    try:
        for chunk in (tone(0.3, 0), tone(1.0), tone(1.0, 0)):
            for i in range(0, len(chunk), 640):
                r.call.accept_audio(chunk[i:i + 640], "pcm16le", 16000, None)
                await asyncio.sleep(0.001)
        await r.until(lambda: r.sink.of(Answer))
        await asyncio.sleep(0.05)
        assert r.engines.transcribed == 1  # the final reused the early transcription
        assert len(r.engines.pool.jobs) == 1 and len(r.sink.of(Answer)) == 1
    finally:
        await r.call.close()
