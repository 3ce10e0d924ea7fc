"""One cancellable turn: an answer's text -> tokens -> sentences -> speech, emitted as it is made."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..audio import encode_output
from ..errors import RequestId, ServerError
from ..text import SentenceSplitter, clean_for_speech
from .events import Speech, Token
from .pace import TICK_S, Pacer
from .ports import Engines, Sink, TokenSource

_turn_ids = itertools.count(1)
# Spoken after a last sentence with nothing to say, so the utterance still ends with a final chunk.
CLOSING_SILENCE = np.zeros(320, dtype=np.float32)
# The first piece may be a clause (cut at a comma once this many characters and words are in, when the
# sentence goes on for more than CLAUSE_TAIL_WORDS words after it): the first audio is what the caller waits
# for; later pieces are synthesized while earlier ones play. A short sentence is spoken whole (no choppy
# "Paris, | France.").
FIRST_CLAUSE_CHARS = 20
FIRST_CLAUSE_WORDS = 4
CLAUSE_TAIL_WORDS = 2


@dataclass(eq=False)
class Turn:
    """One answer in flight; cancelling it drops everything of it not yet sent.

    A held turn is a speculative answer, started before the end of the caller's utterance was
    confirmed: everything it would send (or remember) waits in `pending` until `release()`, and is
    dropped with it if the caller speaks again.
    """

    kind: str  # "voice" | "llm_request" | "tts_request" | "llm_tool_request" | "tool_result"
    request_id: RequestId
    id: int = field(default_factory=lambda: next(_turn_ids))
    cancelled: bool = False
    task: asyncio.Task[None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    held: bool = False
    failed: bool = False  # a held turn hit an error: its confirmation starts a fresh turn instead
    pending: list[Callable[[], None]] = field(default_factory=list)
    # How the answer is marked: the mode of its speech and of its answer, and the answer's flags.
    audio_mode: str = "full"
    response_mode: str = "llm"
    flags: dict[str, Any] = field(default_factory=dict)
    # A barge-in with rollback cancelled it: nothing of it enters the history.
    rollback: bool = False
    # The answer's text as generated so far (what the caller may have heard of it).
    parts: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        """Mark cancelled (synchronously: the writer checks it) and stop the task."""
        self.cancelled = True
        self.pending.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def emit(self, action: Callable[[], None]) -> None:
        """Do `action` now, or when the turn is released if it is held."""
        if self.held:
            self.pending.append(action)
        else:
            action()

    def release(self) -> None:
        """Stop holding: do everything that waited, in order."""
        self.held = False
        actions, self.pending = self.pending, []
        for action in actions:
            action()


class FixedAnswer:
    """An answer known in advance (a farewell), spoken through the same path as the LLM's."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.last_tokens = 0
        self.stats: dict[str, Any] = {}

    async def stream(self) -> AsyncIterator[str]:
        """The whole text at once."""
        yield self.text

    def cancel(self) -> None:
        """Nothing runs elsewhere to stop."""


async def synthesize(engines: Engines, text: str, encoding: str, rate: int) -> bytes:
    """`text` spoken and encoded for the wire (empty when the voice made no sound of it)."""
    return (await synthesize_timed(engines, text, encoding, rate))[0]


async def synthesize_timed(engines: Engines, text: str, encoding: str, rate: int,
                           due: float | None = None) -> tuple[bytes, float]:
    """`text` spoken and encoded for the wire, and how long it plays; `due`: when it is needed."""
    audio, sr = await (engines.synthesize(text) if due is None else engines.synthesize(text, due=due))
    if audio.size == 0:
        return b"", 0.0
    # Resampling a sentence takes a few ms: not on the loop.
    return await engines.run_aux(encode_output, audio, sr, encoding, rate), audio.size / sr


@dataclass
class Voice:
    """How a turn speaks: through which engines, to which sink, in which output format."""

    engines: Engines
    sink: Sink
    encoding: str
    rate: int
    # Starts a child of the call (the speaker), owned like every task of the call.
    spawn: Callable[[Any], asyncio.Task[Any]]
    # An error of this turn (not raised: a turn that fails still owes its requester one answer).
    on_error: Callable[[Turn, ServerError], None]
    # Paced: an answer is generated and synthesized at most this many seconds of audio ahead of its
    # playback (None: as fast as it comes); see pace.Pacer.
    pace_ahead_s: float | None = None


async def run_answer(turn: Turn, job: TokenSource, voice: Voice | None, *, stream_tokens: bool,
                     sink: Sink) -> str:
    """Stream `job`'s answer: tokens to the sink if asked, sentences to the speaker as they complete.

    Returns the whole answer; cancellation (barge-in) stops the job and the speaker. `turn.parts` keeps
    what was generated, for the history of an interrupted answer. A spoken answer is paced: once its
    first sentence is written the rest is background work, urgent again only when its audio runs short.
    """
    sentences: asyncio.Queue[tuple[str, bool] | None] = asyncio.Queue()
    pacer = Pacer(job, voice.pace_ahead_s) if voice is not None else None
    speaker = voice.spawn(speak(turn, sentences, voice, pacer)) if voice is not None else None
    splitter = SentenceSplitter(first_clause_chars=FIRST_CLAUSE_CHARS, first_clause_words=FIRST_CLAUSE_WORDS,
                                clause_tail_words=CLAUSE_TAIL_WORDS)
    try:
        async with contextlib.aclosing(job.stream()) as stream:  # type: ignore[type-var]
            async for delta in stream:
                turn.timings.setdefault("llm_first_token", time.monotonic())
                turn.parts.append(delta)
                if stream_tokens:
                    token = Token(delta, job.last_tokens, turn.request_id)
                    turn.emit(functools.partial(sink.data, token, turn))
                if speaker is not None and pacer is not None:
                    for sentence in splitter.push(delta):
                        sentences.put_nowait((sentence, False))
                        pacer.written(sentence)
        if pacer is not None:
            pacer.finished = True
        if speaker is not None:
            rest = splitter.flush()
            for i, sentence in enumerate(rest):
                sentences.put_nowait((sentence, i == len(rest) - 1))
            sentences.put_nowait(None)
            await speaker
    except BaseException:
        job.cancel()
        if speaker is not None:
            speaker.cancel()
        raise
    return "".join(turn.parts).strip()


async def _next(sentences: asyncio.Queue[tuple[str, bool] | None], pacer: Pacer | None) -> tuple[str, bool] | None:
    """The next sentence to speak; while none comes, the answer's urgency follows its playback."""
    if pacer is None:
        return await sentences.get()
    while True:
        try:
            return await asyncio.wait_for(sentences.get(), TICK_S)
        except asyncio.TimeoutError:
            pacer.update()


async def speak(turn: Turn, sentences: asyncio.Queue[tuple[str, bool] | None], voice: Voice,
                pacer: Pacer | None = None) -> None:
    """Synthesize sentences as they arrive and emit each as the next chunk of one utterance."""
    utterance_id = uuid.uuid4().hex[:16]
    index = 0
    while True:
        item = await _next(sentences, pacer)
        if item is None:
            if index > 0 and not turn.timings.get("final_sent"):
                # The last sentence had nothing speakable: close the utterance with a short silence.
                payload = encode_output(CLOSING_SILENCE, 16000, voice.encoding, voice.rate)
                emit_speech(turn, voice, utterance_id, index, True, payload)
            return
        sentence, is_last = item
        words = clean_for_speech(sentence)
        if not words:
            if pacer is not None:
                pacer.sent(sentence, 0.0)
            continue
        due = None
        if pacer is not None and index > 0:
            # Synthesized no further ahead of playback than the pace allows, and queued for the TTS
            # threads by when it plays: a caller's first sentence (due now) goes before it.
            wait = pacer.synth_wait()
            if wait > 0:
                await asyncio.sleep(wait)
            due = pacer.due()
        try:
            payload, seconds = await synthesize_timed(voice.engines, words, voice.encoding, voice.rate, due)
        except ServerError as err:
            voice.on_error(turn, err)
            return
        if pacer is not None:
            pacer.sent(sentence, seconds)
        if not payload:
            continue
        emit_speech(turn, voice, utterance_id, index, is_last, payload, words)
        index += 1


def emit_speech(turn: Turn, voice: Voice, utterance_id: str, index: int, final: bool, payload: bytes,
                text: str = "") -> None:
    """One chunk of the turn's utterance (saying `text`) to the sink (when the turn is released, if held)."""
    if turn.cancelled:
        return
    if final:
        turn.timings["final_sent"] = 1.0
    chunk = Speech(payload, voice.encoding, voice.rate, utterance_id, index, final, turn.audio_mode,
                   turn.request_id, text)

    def send() -> None:
        # Stamped when it really goes out: a speculative turn's audio may have waited for the final.
        turn.timings.setdefault("first_audio", time.monotonic())
        voice.sink.data(chunk, turn)

    turn.emit(send)
