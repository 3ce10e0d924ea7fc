"""One session's work: speech in -> utterances -> transcripts -> LLM turns -> spoken sentences out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from . import protocol as P
from . import toolgate
from .audio import StreamResampler, encode_output, mulaw_decode, normalize_input_format, pcm16_to_float32
from .config import ServerConfig
from .engines.stt import Transcript
from .errors import Busy, Cancelled, NotReady, PayloadTooLarge, ServerError, UnsupportedAudio
from .metrics import Metrics
from .runtime import Engines
from .session import Session
from .tasks import ErrorHandler, TaskOwner
from .text import SentenceSplitter, clean_for_speech
from .tools import Tool, farewell_from_result, tool_result_prompt
from .vad import Segmenter, SegmenterSettings, UtteranceEnd, UtteranceStart

log = structlog.get_logger(__name__)

# Frames with more samples than this are decoded and segmented on a thread, not on the loop.
INLINE_SAMPLES = 8000
AUDIO_QUEUE_FRAMES = 2000
_turn_ids = itertools.count(1)


def frame_samples(item: tuple[bytes, str, int]) -> int:
    """Samples in one queued (payload, format, rate) frame."""
    payload, fmt, _rate = item
    return len(payload) // (1 if fmt == "mulaw" else 2)


def frame_seconds(item: tuple[bytes, str, int]) -> float:
    """Seconds of audio in one queued (payload, format, rate) frame."""
    return frame_samples(item) / item[2]


class Outbox(Protocol):
    """Where a session's outgoing messages go (the server's per-connection writer)."""

    def send_control(self, msg: dict[str, Any]) -> None:
        """Replies that must not wait behind audio (acks, status, errors)."""

    def send_data(self, msg: dict[str, Any], turn: Turn | None = None) -> None:
        """Ordered data; dropped unsent if `turn` was cancelled meanwhile."""

    def send_audio(self, header: dict[str, Any], payload: bytes, turn: Turn) -> None:
        """A tts_audio header and its binary frame, sent back to back."""

    def discard_speech(self) -> int:
        """Drop queued audio and voice-turn data, keeping replies owed to requests; returns how many."""


@dataclass(eq=False)
class Turn:
    """One answer in flight; cancelling it drops everything of it not yet sent.

    A held turn is a speculative answer, started before the end of the caller's utterance was
    confirmed: everything it would send (or remember) waits in `pending` until `release()`, and is
    dropped with it if the caller speaks again.
    """

    id: int
    kind: str  # "voice" | "llm_request" | "tts_request"
    request_id: P.RequestId
    cancelled: bool = False
    task: asyncio.Task[None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    held: bool = False
    failed: bool = False  # a held turn hit an error: its confirmation starts a fresh turn instead
    pending: list[Callable[[], None]] = field(default_factory=list)
    # How the answer is marked on the wire: `mode` of its tts_audio headers and of its llm_response, and
    # AVA's top-level flags on that llm_response (`tool_result_final`, `tool_gateway_done`, `tool_path`).
    audio_mode: str = "full"
    response_mode: str = "llm"
    flags: dict[str, Any] = field(default_factory=dict)
    # A barge-in with rollback_assistant cancelled it: nothing of it enters the history.
    rollback: bool = False

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


class TokenSource(Protocol):
    """Where an answer's text comes from: an LLM pool job, or a text given in advance."""

    last_tokens: int
    stats: dict[str, Any]

    def stream(self) -> Any: ...

    def cancel(self) -> None: ...


class _FixedAnswer:
    """An answer known in advance (a farewell), spoken through the same path as the LLM's."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.last_tokens = 0
        self.stats: dict[str, Any] = {}

    async def stream(self) -> Any:
        yield self.text

    def cancel(self) -> None:
        """Nothing runs elsewhere to stop."""


@dataclass
class _SpecTurn:
    """A speculative answer and what it was started from; valid only if the final confirms all of it."""

    key: tuple[int, int]
    text: str
    mode: str
    turn: Turn
    history_len: int
    epoch: int


class SessionRunner:
    """Drives one session: its audio stream, its turns, its TTS requests."""

    def __init__(self, session: Session, engines: Engines, outbox: Outbox, cfg: ServerConfig,
                 metrics: Metrics, tasks: TaskOwner) -> None:
        self.session = session
        self.engines = engines
        self.out = outbox
        self.cfg = cfg
        self.metrics = metrics
        self.turns: set[Turn] = set()
        self.voice_turn: Turn | None = None
        # (raw payload, format, rate), session mode at arrival, request id
        self._audio_q: asyncio.Queue[tuple[tuple[bytes, str, int], str, P.RequestId]] = asyncio.Queue(
            AUDIO_QUEUE_FRAMES)
        self._queued_s = 0.0  # audio in _audio_q, bounded by cfg.stt.max_queued_s
        self._speech_task: asyncio.Task[None] | None = None
        # (utterance end, mode, request id, end time, speculative transcription of exactly that audio,
        # the answer started from it)
        self._finals_q: asyncio.Queue[
            tuple[UtteranceEnd | None, str, P.RequestId, float, asyncio.Task[Transcript] | None,
                  _SpecTurn | None]] = asyncio.Queue()
        self._spec: tuple[tuple[int, int], asyncio.Task[Transcript]] | None = None
        self._spec_turn: _SpecTurn | None = None
        self._finals_task: asyncio.Task[None] | None = None
        self._segmenter: Segmenter | None = None
        self._resampler: StreamResampler | None = None
        self._resampler_key: tuple[str, int] | None = None
        self._utterance_no = 0
        self._partial_task: asyncio.Task[None] | None = None
        self._last_partial_text = ""
        self._last_partial_at_ms = 0.0
        self._audio_since_final = False
        self._stt_unavailable_sent = False
        self._tasks = tasks
        self._closed = False

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Any, on_error: ErrorHandler | None = None) -> asyncio.Task[Any]:
        """Start work owned by this session's connection; a failure goes to `on_error`."""
        return self._tasks.spawn(coro, on_error=on_error)

    def _internal_error(self, what: str, request_id: P.RequestId = None) -> ErrorHandler:
        """An error handler that answers a failure nobody foresaw with `internal` (traceback: log only)."""
        def handle(exc: BaseException) -> None:
            self.error(exc if isinstance(exc, ServerError) else ServerError(f"internal error in {what}",
                                                                            request_id=request_id))
        return handle

    def error(self, err: ServerError) -> None:
        """Send the error envelope and count it."""
        if err.call_id is None:
            err.call_id = self.session.call_id
        self.metrics.errors.labels(err.code).inc()
        self.out.send_control(P.error_message(err))

    def segmenter_settings(self) -> SegmenterSettings:
        """The session's segmentation settings over the server defaults."""
        s, c = self.session, self.cfg.stt
        return SegmenterSettings(
            silence_ms=s.segment_silence_ms if s.segment_silence_ms is not None else c.silence_ms,
            energy_threshold=(s.segment_energy_threshold if s.segment_energy_threshold is not None
                              else c.energy_threshold),
            vad_threshold=c.vad_threshold,
            max_utterance_s=c.max_utterance_s,
        )

    def settings_changed(self) -> None:
        """set_mode changed the thresholds: apply them to the live segmenter."""
        if self._segmenter is not None:
            self._segmenter.update(self.segmenter_settings())

    # ------------------------------------------------------------------ audio in

    def accept_audio(self, payload: bytes, fmt: str | None, rate: int | None, request_id: P.RequestId,
                     *, binary: bool = False) -> None:
        """Queue one inbound audio frame (decoding happens in the speech task); raises UnsupportedAudio."""
        s = self.session
        if binary:
            fmt_n, rate_n = s.input_format, s.input_rate
        else:
            try:
                fmt_n = normalize_input_format(fmt, None)
                rate_n = rate if rate is not None else (8000 if fmt_n == "mulaw" else 16000)
                normalize_input_format(fmt_n, rate_n)
            except UnsupportedAudio as err:
                err.request_id = request_id
                raise
            # A JSON frame's format and rate become the session's defaults for later binary frames.
            s.input_format, s.input_rate = fmt_n, rate_n
        if fmt_n == "pcm16le" and len(payload) % 2:
            raise UnsupportedAudio("pcm16le audio must have an even number of bytes", request_id=request_id)
        if not payload:
            return
        mode = s.mode
        if self._speech_task is None or self._speech_task.done():
            self._speech_task = self._spawn(self._speech_loop(), self._internal_error("speech segmentation"))
        if self._finals_task is None or self._finals_task.done():
            self._finals_task = self._spawn(self._finals_loop(), self._internal_error("transcription"))
        item = (payload, fmt_n, rate_n)
        seconds = frame_seconds(item)
        cap = self.cfg.stt.max_queued_s
        # A frame is always taken into an empty queue (however long), so any frame size works; beyond
        # that, a client sending faster than the server segments has frames refused until it catches up.
        if self._queued_s > 0 and self._queued_s + seconds > cap:
            self.metrics.audio_dropped.inc()
            raise Busy(f"more than {cap:g} s of audio waiting to be processed; frame dropped",
                       request_id=request_id)
        try:
            # Decoding is deferred to the speech task, which runs it off the loop for big frames.
            self._audio_q.put_nowait((item, mode, request_id))
        except asyncio.QueueFull:
            self.metrics.audio_dropped.inc()
            raise Busy("audio queue is full; frame dropped", request_id=request_id) from None
        self._queued_s += seconds

    def _dequeued(self, item: tuple[bytes, str, int]) -> None:
        # Clamped: float sums of many small frames must not leave a phantom remainder.
        self._queued_s = max(0.0, self._queued_s - frame_seconds(item)) if not self._audio_q.empty() else 0.0

    def _decode(self, item: tuple[bytes, str, int]) -> np.ndarray:
        payload, fmt, rate = item
        pcm = mulaw_decode(payload) if fmt == "mulaw" else payload
        x = pcm16_to_float32(pcm)
        if rate == 16000:
            return x
        key = (fmt, rate)
        if self._resampler is None or self._resampler_key != key:
            self._resampler, self._resampler_key = StreamResampler(rate, 16000), key
        return self._resampler.process(x)

    def _process_frame(self, item: tuple[bytes, str, int]) -> list[Any]:
        assert self._segmenter is not None
        return self._segmenter.feed(self._decode(item))

    async def _speech_loop(self) -> None:
        """Segment the stream; launch partials; queue finals; flush after the idle timeout."""
        idle_s = self.cfg.stt.idle_ms / 1000.0
        # The flag, not only cancellation, ends the loop: before Python 3.12, wait_for can swallow a
        # cancellation that arrives just as the queue yields an item.
        while not self._closed:
            if self.engines.vad is None or self.engines.stt_state.state in ("missing", "failed"):
                await self._drain_without_stt()
                continue
            if self._segmenter is None:
                self._segmenter = Segmenter(self.engines.vad.stream(), self.segmenter_settings())
            try:
                item, mode, rid = await asyncio.wait_for(
                    self._audio_q.get(), timeout=idle_s if self._audio_since_final else None
                )
            except asyncio.TimeoutError:
                self._on_idle()
                continue
            self._dequeued(item)
            self._audio_since_final = True
            try:
                if frame_samples(item) > INLINE_SAMPLES:
                    events = await self.engines.run_aux(self._process_frame, item)
                else:
                    events = self._process_frame(item)
            except Exception:
                log.warning("audio.decode_failed", session=self.session.id, exc_info=True)
                self.error(UnsupportedAudio("audio frame could not be decoded"))
                continue
            for ev in events:
                if isinstance(ev, UtteranceStart):
                    self._utterance_no += 1
                    self._last_partial_text = ""
                    self._last_partial_at_ms = 0.0
                elif isinstance(ev, UtteranceEnd):
                    if ev.reason == "max_length":
                        # Transcribe what was said, but tell the client its utterance hit the cap.
                        self.error(PayloadTooLarge(
                            f"utterance longer than {self.cfg.stt.max_utterance_s:g} s; it was cut there",
                            request_id=rid))
                    self._queue_final(ev, mode, rid)
            self._drop_stale_spec_turn()
            self._maybe_speculate(mode, rid)
            self._maybe_partial(mode, rid)

    async def _drain_without_stt(self) -> None:
        item, mode, rid = await self._audio_q.get()
        self._dequeued(item)
        if not self._stt_unavailable_sent:
            self._stt_unavailable_sent = True
            self.out.send_data(P.stt_result("", call_id=self.session.call_id, mode=mode, is_final=True,
                                            request_id=rid, error="stt_unavailable"))

    def _queue_final(self, ev: UtteranceEnd | None, mode: str, rid: P.RequestId) -> None:
        self._audio_since_final = False
        self._utterance_no += 1  # invalidates partials still running for this utterance
        spec = None
        if ev is not None and self._spec is not None and self._spec[0] == ev.key:
            spec = self._spec[1]
        self._spec = None
        spec_turn, self._spec_turn = self._spec_turn, None
        if spec_turn is not None and (ev is None or spec_turn.key != ev.key):
            self._discard_spec_turn(spec_turn)
            spec_turn = None
        self._finals_q.put_nowait((ev, mode, rid, time.monotonic(), spec, spec_turn))

    def _drop_stale_spec_turn(self) -> None:
        """The caller spoke again after a pause: the answer started at the pause was for other words."""
        spec, seg = self._spec_turn, self._segmenter
        if spec is not None and seg is not None and seg.in_speech and seg.pending_final_key() != spec.key:
            self._spec_turn = None
            self._discard_spec_turn(spec)

    def _discard_spec_turn(self, spec: _SpecTurn) -> None:
        if not spec.turn.cancelled:
            spec.turn.cancel()
        self.metrics.speculative_turns.labels("discarded").inc()

    def _on_spec_transcript(self, key: tuple[int, int], task: asyncio.Task[Transcript], mode: str,
                            rid: P.RequestId) -> None:
        """The speculative final is in while the caller is still silent: start answering it, held."""
        if self._closed or task.cancelled() or task.exception() is not None:
            return
        seg = self._segmenter
        if (self._spec is None or self._spec[0] != key or self._spec_turn is not None or seg is None
                or not seg.in_speech or seg.pending_final_key() != key):
            return  # superseded: the caller spoke again, or the utterance already ended
        text = task.result().text.strip()
        s = self.session
        if not text or s.mode != mode or mode not in ("full", "llm"):
            return
        snap = self.engines.pool.snapshot()
        if snap["state"] != "ready" or snap["busy"] >= snap["workers"] or snap["queued"]:
            return  # a guess must never make another caller's answer wait for a worker
        turn = self.start_turn(text, kind="voice", request_id=rid, speak=(mode == "full"), stream_tokens=False,
                               held=True)
        turn.timings["speculated"] = turn.timings["start"]
        self._spec_turn = _SpecTurn(key=key, text=text, mode=mode, turn=turn, history_len=len(s.history),
                                    epoch=s.history_epoch)
        self.metrics.speculative_turns.labels("started").inc()

    def _confirm_spec_turn(self, spec: _SpecTurn | None, text: str, mode: str, ended_at: float,
                           stt_ms: float) -> bool:
        """The final is what the speculative answer was started from: let it speak. False if it cannot."""
        if spec is None:
            return False
        s, turn = self.session, spec.turn
        if (turn.cancelled or turn.failed or spec.text != text or spec.mode != mode
                or spec.history_len != len(s.history) or spec.epoch != s.history_epoch):
            self._discard_spec_turn(spec)
            return False
        if self.voice_turn is not None and self.voice_turn is not turn and not self.voice_turn.cancelled:
            self.voice_turn.cancel()  # the caller spoke again: the previous answer stops, as for any final
        self.voice_turn = turn
        turn.timings.update(utterance_end=ended_at, stt_ms=stt_ms)
        self.metrics.speculative_turns.labels("confirmed").inc()
        turn.release()
        return True

    def _maybe_speculate(self, mode: str, rid: P.RequestId) -> None:
        """Once the tail of silence is in, transcribe what the final will be while the silence window runs.

        If the caller stays silent, the final is ready (or nearly) when the utterance ends; if they speak
        again the result is dropped. Saves up to one transcription's time on every turn.
        """
        seg = self._segmenter
        spec_ms = self.cfg.stt.speculate_ms
        if seg is None or not seg.in_speech or spec_ms <= 0 or self.engines.stt is None:
            return
        if seg.silence_ms < max(spec_ms, seg.settings.tail_ms):
            return
        key = seg.pending_final_key()
        if self._spec is not None and self._spec[0] == key:
            return
        task = self._spawn(self.engines.transcribe(seg.pending_final_audio(), "final"))
        self._spec = (key, task)
        if self.cfg.llm.speculate and mode in ("full", "llm"):
            task.add_done_callback(lambda t: self._on_spec_transcript(key, t, mode, rid))

    def _on_idle(self) -> None:
        """No audio for LOCAL_STT_IDLE_MS: end the utterance in progress (or send an empty stt final)."""
        assert self._segmenter is not None
        ev = self._segmenter.flush()
        mode = self.session.mode
        if ev is not None or mode == "stt":
            self._queue_final(ev, mode, None)
        self._audio_since_final = False

    def _maybe_partial(self, mode: str, rid: P.RequestId) -> None:
        seg = self._segmenter
        interval = self.cfg.stt.partial_interval_ms
        if seg is None or not seg.in_speech or interval <= 0 or self.engines.stt is None:
            return
        if seg.silence_ms > 0 or self.engines.stt_inflight > 0:
            return  # a pause may be the end: the STT thread is kept for the final (finals before partials)
        if self._partial_task is not None and not self._partial_task.done():
            return  # one partial at a time per session
        if not self._finals_q.empty():
            return
        if seg.speech_ms - self._last_partial_at_ms < interval:
            return
        self._last_partial_at_ms = seg.speech_ms
        audio = seg.utterance_audio()
        self._partial_task = self._spawn(self._partial(audio, mode, rid, self._utterance_no))

    async def _partial(self, audio: np.ndarray, mode: str, rid: P.RequestId, utterance_no: int) -> None:
        try:
            result = await self.engines.transcribe(audio, "partial")
        except ServerError:
            return
        text = result.text.strip()
        # Drop it if the utterance ended meanwhile (its final is coming) or nothing changed.
        if utterance_no != self._utterance_no or not text or text == self._last_partial_text:
            return
        self._last_partial_text = text
        self.out.send_data(P.stt_result(text, call_id=self.session.call_id, mode=mode, is_final=False,
                                        confidence=result.confidence, request_id=rid))

    async def _finals_loop(self) -> None:
        """Transcribe utterances in order and act on each final."""
        while not self._closed:
            ev, mode, rid, ended_at, spec, spec_turn = await self._finals_q.get()
            # A partial still running for this utterance is dropped when it completes (its utterance number
            # is stale), so partials never follow their final.
            if ev is None:
                self.out.send_data(P.stt_result("", call_id=self.session.call_id, mode=mode, is_final=True,
                                                request_id=rid))
                continue
            t0 = time.monotonic()
            try:
                result = None
                if spec is not None:
                    try:
                        result = await spec
                    except ServerError:
                        result = None
                if result is None:
                    result = await self.engines.transcribe(ev.audio, "final")
            except NotReady:
                if spec_turn is not None:
                    self._discard_spec_turn(spec_turn)
                self.out.send_data(P.stt_result("", call_id=self.session.call_id, mode=mode, is_final=True,
                                                request_id=rid, error="stt_unavailable"))
                continue
            except Exception:
                if spec_turn is not None:
                    self._discard_spec_turn(spec_turn)
                log.exception("stt.failed", session=self.session.id)
                self.error(ServerError("speech could not be transcribed", request_id=None))
                continue
            stt_ms = (time.monotonic() - t0) * 1000
            self.metrics.turn_seconds.labels("stt").observe(stt_ms / 1000)
            text = result.text.strip()
            log.info("stt.final", session=self.session.id, call_id=self.session.call_id, chars=len(text),
                     audio_s=round(result.audio_s, 2), stt_ms=round(stt_ms, 1), reason=ev.reason,
                     speculative=spec is not None, answer_started=spec_turn is not None)
            if mode == "stt" or text:
                self.out.send_data(P.stt_result(text, call_id=self.session.call_id, mode=mode, is_final=True,
                                                confidence=result.confidence, request_id=rid))
            if not text or mode not in ("full", "llm"):
                if spec_turn is not None:
                    self._discard_spec_turn(spec_turn)
                continue
            if not self._confirm_spec_turn(spec_turn, text, mode, ended_at, stt_ms):
                self.start_turn(text, kind="voice", request_id=rid, speak=(mode == "full"), stream_tokens=False,
                                timings={"utterance_end": ended_at, "stt_ms": stt_ms})

    # ------------------------------------------------------------------ turns

    def start_turn(
        self,
        text: str,
        *,
        kind: str,
        request_id: P.RequestId,
        speak: bool,
        stream_tokens: bool,
        context: tuple[tuple[str, str], ...] | None = None,
        timings: dict[str, float] | None = None,
        held: bool = False,
        answer: str | None = None,
        remember: str | None = None,
        mark: dict[str, Any] | None = None,
    ) -> Turn:
        """Start an answer; a new voice turn cancels the voice turn still in flight (the caller spoke again).

        A `held` (speculative) voice turn sends nothing and cancels nothing until it is confirmed.
        `answer` is spoken as it is, without the LLM (a farewell); `remember` is what the history keeps
        of `text`; `mark` sets the Turn's wire markings (audio_mode, response_mode, flags).
        """
        if kind == "voice" and not held and self.voice_turn is not None and not self.voice_turn.cancelled:
            self.voice_turn.cancel()
        elif kind != "voice":
            self._check_inflight(request_id)
        turn = Turn(id=next(_turn_ids), kind=kind, request_id=request_id, timings=dict(timings or {}), held=held,
                    **(mark or {}))
        turn.timings.setdefault("start", time.monotonic())
        self._run(turn, self._run_turn(turn, text, speak, stream_tokens, context, answer, remember),
                  lambda exc: self._turn_error(turn, _as_server_error(exc, "the answer")))
        if kind == "voice" and not held:
            self.voice_turn = turn
        return turn

    def _run(self, turn: Turn, coro: Any, on_error: ErrorHandler) -> Turn:
        """Run a turn's work as a task of this session; the turn is in flight until that task ends."""
        turn.task = self._spawn(coro, on_error)
        self.turns.add(turn)
        turn.task.add_done_callback(lambda _t: self.turns.discard(turn))
        return turn

    def _turn_error(self, turn: Turn, err: ServerError) -> None:
        """An error of a turn: to the client, or, for a speculative turn, a reason not to confirm it."""
        if turn.held:
            turn.failed = True
            return
        err.request_id = turn.request_id
        self.error(err)

    async def _run_turn(self, turn: Turn, text: str, speak: bool, stream_tokens: bool,
                        context: tuple[tuple[str, str], ...] | None, fixed: str | None = None,
                        remember: str | None = None) -> None:
        s = self.session
        call_id = s.call_id
        messages = s.messages_for(text, self.engines.default_prompt, context)
        epoch = s.history_epoch
        remembered = text if remember is None else remember
        log.info("llm.request", session=s.id, call_id=call_id, kind=turn.kind, turn=turn.id,
                 messages=len(messages), history=len(s.history), context=context is not None,
                 system_prompt_chars=len(messages[0][1]) if messages[0][0] == "system" else 0,
                 interrupted=s.interrupted, fixed=fixed is not None)
        enc, rate, _fb = s.output_format()
        tools = self.call_tools() if turn.kind == "voice" and speak and fixed is None else ()
        try:
            if tools:
                # As AVA's server does: a tool the caller's words call for is decided before speaking.
                gated = await toolgate.gate(self.engines.pool, self.engines.sampling(), user_text=text,
                                            tools=tools, policy=s.tool_policy, messages=messages)
                if gated is not None:
                    self._send_gated(turn, gated, text, epoch)
                    return
                turn.flags["tool_gateway_done"] = True
            job: TokenSource = (_FixedAnswer(fixed) if fixed is not None
                                else self.engines.pool.submit(messages, self.engines.sampling()))
        except ServerError as err:
            self._turn_error(turn, err)
            return
        sentences: asyncio.Queue[tuple[str, bool] | None] = asyncio.Queue()
        speaker = self._spawn(self._speak(turn, sentences, enc, rate)) if speak else None
        # The first piece may be a clause (cut at a comma once 20 characters are in): the first audio is
        # what the caller waits for, later pieces are synthesized while earlier ones play.
        splitter = SentenceSplitter(first_clause_chars=20)
        parts: list[str] = []
        try:
            async with contextlib.aclosing(job.stream()) as stream:
                async for delta in stream:
                    if "llm_first_token" not in turn.timings:
                        turn.timings["llm_first_token"] = time.monotonic()
                    parts.append(delta)
                    if stream_tokens:
                        token = P.llm_token(delta, call_id=call_id, request_id=turn.request_id, tokens=job.last_tokens)
                        turn.emit(functools.partial(self.out.send_data, token, turn))
                    if speaker is not None:
                        for sentence in splitter.push(delta):
                            sentences.put_nowait((sentence, False))
            if speaker is not None:
                rest = splitter.flush()
                for i, sentence in enumerate(rest):
                    sentences.put_nowait((sentence, i == len(rest) - 1))
                sentences.put_nowait(None)
                await speaker
            answer = "".join(parts).strip()
            response = P.llm_response(answer, call_id=call_id, request_id=turn.request_id, mode=turn.response_mode,
                                      flags=turn.flags)

            def finish() -> None:
                self.out.send_data(response, turn)
                if context is None:
                    s.add_turn(remembered, answer, epoch)
                s.interrupted = False  # the answer after an interruption has been given
                self._log_turn(turn, job.stats, len(answer))

            turn.emit(finish)
        except asyncio.CancelledError:
            job.cancel()
            if speaker is not None:
                speaker.cancel()
            # The requester was answered `cancelled` by cancel_all, which is what cancels a turn.
            if context is None and parts and not turn.held and not turn.rollback:
                # The caller heard (part of) this answer: keep it so the conversation stays coherent,
                # unless the history was reset meanwhile (new call, stop_session) or the client asked
                # for it to be rolled back.
                s.add_turn(remembered, "".join(parts).strip(), epoch)
            raise
        except ServerError as err:
            if speaker is not None:
                speaker.cancel()
            if err.code == "cancelled":
                return
            self._turn_error(turn, err)

    async def _speak(self, turn: Turn, sentences: asyncio.Queue[tuple[str, bool] | None], enc: str,
                     rate: int) -> None:
        """Synthesize sentences as they arrive and send each as the next audio chunk."""
        utterance_id = uuid.uuid4().hex[:16]
        index = 0
        while True:
            item = await sentences.get()
            if item is None:
                if index > 0 and not turn.timings.get("final_sent"):
                    # The last sentence had nothing speakable: close the utterance with a short silence.
                    payload = encode_output(np.zeros(320, dtype=np.float32), 16000, enc, rate)
                    self._send_chunk(turn, utterance_id, index, True, payload, enc, rate)
                return
            sentence, is_last = item
            speech = clean_for_speech(sentence)
            if not speech:
                continue
            try:
                payload = await self._synthesize(speech, enc, rate)
            except ServerError as err:
                self._turn_error(turn, err)
                return
            if not payload:
                continue
            self._send_chunk(turn, utterance_id, index, is_last, payload, enc, rate)
            index += 1

    def _send_chunk(self, turn: Turn, utterance_id: str, index: int, is_final: bool, payload: bytes, enc: str,
                    rate: int) -> None:
        if turn.cancelled:
            return
        if is_final:
            turn.timings["final_sent"] = 1.0
        header = P.tts_audio(call_id=self.session.call_id, mode=turn.audio_mode, encoding=enc, sample_rate_hz=rate,
                             byte_length=len(payload), utterance_id=utterance_id, chunk_index=index,
                             is_final=is_final, request_id=turn.request_id)

        def send() -> None:
            # Stamped when it really goes out: a speculative turn's audio may have waited for the final.
            turn.timings.setdefault("first_audio", time.monotonic())
            self.out.send_audio(header, payload, turn)

        turn.emit(send)

    async def _synthesize(self, text: str, enc: str, rate: int) -> bytes:
        audio, sr = await self.engines.synthesize(text)
        if audio.size == 0:
            return b""
        # Resampling a sentence takes a few ms: not on the loop.
        return await self.engines.run_aux(encode_output, audio, sr, enc, rate)

    def _log_turn(self, turn: Turn, stats: dict[str, Any], chars: int) -> None:
        t = turn.timings
        base = t.get("utterance_end", t["start"])
        done = time.monotonic()

        def ms(key: str) -> float | None:
            return round((t[key] - base) * 1000, 1) if key in t else None

        # A speculative answer's first token may come before the end of the utterance: negative here.
        first_token, first_audio = ms("llm_first_token"), ms("first_audio")
        total = round((done - base) * 1000, 1)
        if first_token is not None:
            self.metrics.turn_seconds.labels("llm_first_token").observe(max(0.0, first_token) / 1000)
        if first_audio is not None:
            self.metrics.turn_seconds.labels("first_audio").observe(first_audio / 1000)
        self.metrics.turn_seconds.labels("total").observe(total / 1000)
        log.info("turn.done", session=self.session.id, call_id=self.session.call_id, kind=turn.kind,
                 stt_ms=round(t["stt_ms"], 1) if "stt_ms" in t else None, llm_first_token_ms=first_token,
                 first_audio_ms=first_audio, total_ms=total, tokens=stats.get("tokens"),
                 decode_tok_s=stats.get("decode_tok_s"), chars=chars, speculative="speculated" in t)

    # ------------------------------------------------------------------ tools

    def call_tools(self) -> tuple[Tool, ...]:
        """The tools this call may use (tool_context's tools, narrowed to its allowed names)."""
        return toolgate.usable_tools(self.session.tools, self.session.allowed_tools)

    def _send_gated(self, turn: Turn, gated: toolgate.ToolDecision, text: str, epoch: int) -> None:
        """A voice turn that became a tool call: llm_tool_response (server_gated), nothing spoken."""
        s = self.session
        msg = P.llm_tool_response(call_id=s.call_id, request_id=None, text=gated.answer,
                                  tool_calls=[c.wire() for c in gated.calls], tool_path=gated.path,
                                  structured_attempts=gated.structured_attempts, server_gated=True)

        def send() -> None:
            self.out.send_data(msg, turn)
            s.add_turn(text, gated.answer or f"(I used the tool {gated.calls[0].name}.)", epoch)
            log.info("turn.tool_call", session=s.id, call_id=s.call_id, tools=[c.name for c in gated.calls],
                     tool_path=gated.path)

        turn.emit(send)

    def start_tool_request(self, req: P.LlmToolRequest) -> Turn:
        """llm_tool_request: find the tool calls of an answer; answered by llm_tool_response."""
        self._check_inflight(req.request_id)
        turn = Turn(id=next(_turn_ids), kind="llm_tool_request", request_id=req.request_id)
        return self._run(turn, self._tool_request(turn, req),
                         lambda exc: self._turn_error(turn, _as_server_error(exc, "the tool search")))

    async def _tool_request(self, turn: Turn, req: P.LlmToolRequest) -> None:
        s = self.session
        tools = req.tools if req.tools is not None else s.tools
        names = req.allowed_tools if req.allowed_tools is not None else s.allowed_tools
        usable = toolgate.usable_tools(tools, names)
        question = req.latest_user_text or req.text
        try:
            found = await toolgate.find_tool_calls(
                self.engines.pool, self.engines.sampling(), text=req.text, latest_user_text=req.latest_user_text,
                tools=usable, policy=req.tool_policy or s.tool_policy, choice=req.tool_choice,
                messages=s.messages_for(question, self.engines.default_prompt))
        except ServerError as err:
            if err.code != "cancelled":  # answered by the cancel itself
                self._turn_error(turn, err)
            return
        log.info("tool_request.done", session=s.id, call_id=s.call_id, tools=[c.name for c in found.calls],
                 tool_path=found.path)
        text = found.answer if found.path == "parser" else req.text
        self.out.send_data(P.llm_tool_response(
            call_id=s.call_id, request_id=req.request_id, text=text, tool_calls=[c.wire() for c in found.calls],
            tool_path=found.path, structured_attempts=found.structured_attempts), turn)

    def start_tool_result(self, req: P.ToolResult) -> Turn:
        """tool_result: the answer the tool's result calls for, spoken in every mode (as AVA's server does).

        A successful hangup needs no LLM: its farewell is spoken as the tool gave it.
        """
        s = self.session
        if req.output_encoding is not None or req.output_sample_rate_hz is not None:
            s.output_encoding, s.output_sample_rate_hz, _fb = s.output_format(req.output_encoding,
                                                                             req.output_sample_rate_hz)
        terminal = req.tool_name == toolgate.HANGUP and not req.is_error
        flags = {"tool_result_final": True, "tool_gateway_done": True,
                 "tool_path": "terminal_farewell" if terminal else "none"}
        mark = {"audio_mode": "tool_result", "response_mode": "tool_result", "flags": flags}
        remember = f"(The tool {req.tool_name} {'failed' if req.is_error else 'returned'}.)"
        if terminal:
            return self.start_turn("", kind="tool_result", request_id=req.request_id, speak=True,
                                   stream_tokens=False, answer=farewell_from_result(req.result), remember=remember,
                                   mark=mark)
        return self.start_turn(tool_result_prompt(req.tool_name, req.result, req.is_error), kind="tool_result",
                               request_id=req.request_id, speak=True, stream_tokens=False, remember=remember,
                               mark=mark)

    # ------------------------------------------------------------------ tts requests

    def start_tts(self, req: P.TtsRequest) -> Turn:
        """Answer a tts_request in the background; a barge-in cancels it like an answer."""
        self._check_inflight(req.request_id)
        turn = Turn(id=next(_turn_ids), kind="tts_request", request_id=req.request_id)
        return self._run(turn, self._tts_request(turn, req), lambda exc: self._tts_failed(turn, req, exc))

    async def _tts_request(self, turn: Turn, req: P.TtsRequest) -> None:
        """Synthesize a whole text and answer with one tts_response."""
        enc, rate, _fb = self.session.output_format(req.output_encoding, req.output_sample_rate_hz)
        try:
            # Text with nothing a voice can say (symbols only) is answered with no audio.
            speech = clean_for_speech(req.text)
            payload = await self._synthesize(speech, enc, rate) if speech else b""
        except ServerError as err:
            self._tts_failed(turn, req, err)
            return
        self.out.send_data(P.tts_response(req.text, payload, call_id=self.session.call_id, encoding=enc,
                                          sample_rate_hz=rate, request_id=req.request_id), turn)

    def _tts_failed(self, turn: Turn, req: P.TtsRequest, exc: BaseException) -> None:
        """A tts_request that failed: the error, and an empty tts_response.

        AVA clients wait for a tts_response matched by text: an empty one (what AVA's own server sends
        when synthesis fails) ends their wait at once instead of after their timeout.
        """
        err = _as_server_error(exc, "speech synthesis")
        err.request_id = req.request_id
        self.error(err)
        enc, rate, _fb = self.session.output_format(req.output_encoding, req.output_sample_rate_hz)
        self.out.send_data(P.tts_response(req.text, b"", call_id=self.session.call_id, encoding=enc,
                                          sample_rate_hz=rate, request_id=req.request_id), turn)

    def _check_inflight(self, request_id: P.RequestId) -> None:
        """One connection may not queue unbounded work: past the cap, requests get `busy`."""
        explicit = sum(1 for t in self.turns if t.kind != "voice" and not t.cancelled)
        if explicit >= self.cfg.max_inflight_requests:
            raise Busy(f"too many requests in flight on this connection (max {self.cfg.max_inflight_requests})",
                       request_id=request_id)

    def _report_cancelled(self, turn: Turn) -> None:
        """Tell the requester of an explicit request that it will get no reply (voice turns have none)."""
        if turn.kind != "voice":
            self.error(Cancelled(f"{turn.kind} cancelled", request_id=turn.request_id))

    # ------------------------------------------------------------------ cancellation

    def cancel_all(self, rollback: bool = False) -> int:
        """Cancel every turn in flight (barge-in); returns how many were cancelled.

        Each explicit request cancelled here is answered `cancelled` now: a task cancelled before it
        first ran never reaches its own handlers, and its requester would wait forever. With `rollback`
        (AVA's rollback_assistant), the interrupted exchange leaves no trace in the history: a turn cut
        off here records nothing, and if none was running, the answer the caller was still hearing
        (generated, being played out) is forgotten.
        """
        n = 0
        cut_answer = False
        for turn in list(self.turns):
            if turn.cancelled or (turn.task is not None and turn.task.done()):
                continue  # answered already (its reply may still wait in the outbox)
            turn.rollback = rollback
            cut_answer = cut_answer or (turn.kind in ("voice", "tool_result") and not turn.held)
            turn.cancel()
            self._report_cancelled(turn)
            n += 1
        # An answer already complete may still wait in the outbox for a slow reader: none of its audio may
        # follow the ack either.
        self.out.discard_speech()
        if rollback:
            if cut_answer:
                self.session.interrupted = True
            else:
                self.session.rollback()
        return n

    def stop_speech(self) -> None:
        """Forget buffered audio and the utterance in progress (stop_session, new call)."""
        while not self._audio_q.empty():
            self._dequeued(self._audio_q.get_nowait()[0])
        if self._segmenter is not None:
            self._segmenter.reset()
        if self._spec_turn is not None:
            self._discard_spec_turn(self._spec_turn)
            self._spec_turn = None
        self._spec = None
        self._utterance_no += 1
        self._audio_since_final = False

    async def close(self) -> None:
        """The connection closed: cancel everything this session had in flight."""
        self._closed = True
        self.cancel_all()
        await self._tasks.aclose()


def _as_server_error(exc: BaseException, what: str) -> ServerError:
    """A failure as the error a client may see: ours as it is, anything else as `internal`."""
    return exc if isinstance(exc, ServerError) else ServerError(f"internal error in {what}")
