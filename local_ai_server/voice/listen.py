"""Listening: audio frames -> VAD segmentation -> partial and final transcripts, with an early guess.

The frames themselves (what is queued, decoding to 16 kHz, ended utterances) are voice.frames'.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import structlog

from ..audio import normalize_input_format
from ..config import SttConfig
from ..engines.stt import Transcript
from ..errors import Busy, NotReady, PayloadTooLarge, RequestId, ServerError, UnsupportedAudio
from ..metrics import Metrics
from ..session import Session
from ..tasks import TaskOwner
from ..vad import Segmenter, UtteranceEnd, UtteranceStart
from .endpoint import EndpointPolicy, Key, TurnSettings
from .events import Transcribed, VoiceActivity
from .frames import Final, Frame, FrameDecoder, segmenter_settings
from .listen_turn import TurnEnding
from .ports import Answering, Engines, Sink

__all__ = ["AUDIO_QUEUE_FRAMES", "INLINE_SAMPLES", "Answering", "Final", "Frame", "Listener", "segmenter_settings"]

log = structlog.get_logger(__name__)

# Frames with more samples than this are decoded and segmented on a thread, not on the loop.
INLINE_SAMPLES = 8000
AUDIO_QUEUE_FRAMES = 2000


class Listener(TurnEnding):
    """One call's ears: frames in order, utterances out, partials while speaking, finals in order."""

    def __init__(self, session: Session, engines: Engines, sink: Sink, cfg: SttConfig, metrics: Metrics,
                 tasks: TaskOwner, answering: Answering, speculate_answers: bool) -> None:
        self.session = session
        self.engines = engines
        self.sink = sink
        self.cfg = cfg
        self.metrics = metrics
        self.answering = answering
        self.speculate_answers = speculate_answers
        self.answers_stt = False  # a front answers the stt mode's finals through `answering` (Call.answer_stt_with)
        self._tasks = tasks
        self._frames: asyncio.Queue[Frame] = asyncio.Queue(AUDIO_QUEUE_FRAMES)
        self._queued_s = 0.0  # audio in _frames, bounded by cfg.max_queued_s
        self._finals: asyncio.Queue[Final] = asyncio.Queue()
        self._speech_task: asyncio.Task[None] | None = None
        self._finals_task: asyncio.Task[None] | None = None
        self._early: tuple[tuple[int, int], asyncio.Task[Transcript]] | None = None
        self._guess: tuple[tuple[int, int], Any] | None = None
        self._segmenter: Segmenter | None = None
        self._endpoint = EndpointPolicy(TurnSettings())
        self._segmenting = False  # a frame is being segmented on a thread: the segmenter is not ours to end
        self._end_when_back: Key | None = None  # a turn judged complete meanwhile
        self._decoder = FrameDecoder()
        self._utterance_no = 0
        self._partial_task: asyncio.Task[None] | None = None
        self._last_partial_text = ""
        self._last_partial_at_ms = 0.0
        self._audio_since_final = False
        self._stt_unavailable_sent = False
        self._speaking = False  # a VoiceActivity start was sent and its stop not yet
        self._transcribing = False  # a final is being transcribed (or handed on)
        self.closed = False

    # ------------------------------------------------------------------ intake

    def accept(self, payload: bytes, fmt: str | None, rate: int | None, request_id: RequestId, *,
               binary: bool = False) -> None:
        """Queue one inbound frame (decoded later, in the speech task); raises UnsupportedAudio or Busy."""
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
        if self._speech_task is None or self._speech_task.done():
            self._speech_task = self._tasks.spawn(self._speech_loop(), on_error=self._internal("segmentation"))
        if self._finals_task is None or self._finals_task.done():
            self._finals_task = self._tasks.spawn(self._finals_loop(), on_error=self._internal("transcription"))
        frame = Frame(payload, fmt_n, rate_n, s.mode, request_id)
        cap = self.cfg.max_queued_s
        # A frame is always taken into an empty queue (however long), so any frame size works; beyond
        # that, a client sending faster than the server segments has frames refused until it catches up.
        if self._queued_s > 0 and self._queued_s + frame.seconds > cap:
            self.metrics.audio_dropped.inc()
            raise Busy(f"more than {cap:g} s of audio waiting to be processed; frame dropped",
                       request_id=request_id)
        try:
            self._frames.put_nowait(frame)
        except asyncio.QueueFull:
            self.metrics.audio_dropped.inc()
            raise Busy("audio queue is full; frame dropped", request_id=request_id) from None
        self._queued_s += frame.seconds

    def _internal(self, what: str) -> Any:
        def handle(exc: BaseException) -> None:
            self.answering.error(exc if isinstance(exc, ServerError) else ServerError(f"internal error in {what}"))
        return handle

    def _dequeued(self, frame: Frame) -> None:
        # Clamped: float sums of many small frames must not leave a phantom remainder.
        self._queued_s = max(0.0, self._queued_s - frame.seconds) if not self._frames.empty() else 0.0

    def settings_changed(self) -> None:
        """set_mode changed the thresholds: apply them to the live segmenter."""
        self._endpoint.settings = ts = self.turn_settings()
        if self._segmenter is not None:
            self._segmenter.update(segmenter_settings(self.session, self.cfg, smart=ts.smart))

    # ------------------------------------------------------------------ segmentation

    def _segment(self, frame: Frame) -> list[Any]:
        assert self._segmenter is not None
        return self._segmenter.feed(self._decoder.decode(frame))

    async def _speech_loop(self) -> None:
        """Segment the stream; launch partials; queue finals; flush after the idle timeout."""
        idle_s = self.cfg.idle_ms / 1000.0
        # The flag, not only cancellation, ends the loop: before Python 3.12, wait_for can swallow a
        # cancellation that arrives just as the queue yields an item.
        while not self.closed:
            if not self.engines.stt_available():
                await self._drain_without_stt()
                continue
            if self._segmenter is None:
                self._endpoint.settings = ts = self.turn_settings()
                self._segmenter = Segmenter(self.engines.vad_stream(),
                                            segmenter_settings(self.session, self.cfg, smart=ts.smart))
            try:
                frame = await asyncio.wait_for(self._frames.get(),
                                               timeout=idle_s if self._audio_since_final else None)
            except asyncio.TimeoutError:
                self._on_idle()
                continue
            self._dequeued(frame)
            self._audio_since_final = True
            try:
                if frame.samples > INLINE_SAMPLES:
                    self._segmenting = True
                    try:
                        events = await self.engines.run_aux(self._segment, frame)
                    finally:
                        self._segmenting = False
                else:
                    events = self._segment(frame)
            except Exception:  # noqa: BLE001 - a frame we cannot decode is the client's error, not the call's end
                log.warning("audio.decode_failed", session=self.session.id, exc_info=True)
                self.answering.error(UnsupportedAudio("audio frame could not be decoded"))
                continue
            for ev in events:
                if isinstance(ev, UtteranceStart):
                    self._voice_activity(True, ev.at_ms)
                    self._utterance_no += 1
                    self._last_partial_text = ""
                    self._last_partial_at_ms = 0.0
                elif isinstance(ev, UtteranceEnd):
                    self._voice_activity(False, ev.at_ms)
                    if ev.reason == "max_length":
                        # Transcribe what was said, but tell the client its utterance hit the cap.
                        self.answering.error(PayloadTooLarge(
                            f"utterance longer than {self.cfg.max_utterance_s:g} s; it was cut there",
                            request_id=frame.request_id))
                    self._queue_final(ev, frame.mode, frame.request_id)
            if self._speaking and not self._segmenter.in_speech:
                self._voice_activity(False, self._segmenter.clock_ms, transcribed=False)
            if self._end_when_back is not None:
                self._end_turn(self._end_when_back, frame.mode, frame.request_id)
            self._drop_stale_guess()
            self._maybe_score_turn(frame.mode, frame.request_id)
            self._maybe_transcribe_early(frame.mode, frame.request_id)
            self._maybe_partial(frame.mode, frame.request_id)

    async def _drain_without_stt(self) -> None:
        frame = await self._frames.get()
        self._dequeued(frame)
        if not self._stt_unavailable_sent:
            self._stt_unavailable_sent = True
            self.sink.data(Transcribed("", True, frame.mode, frame.request_id, error="stt_unavailable"))

    def _queue_final(self, ev: UtteranceEnd | None, mode: str, rid: RequestId) -> None:
        self._audio_since_final = False
        self._utterance_no += 1  # invalidates partials still running for this utterance
        early = self._early[1] if ev is not None and self._early is not None and self._early[0] == ev.key else None
        self._early = None
        guess = None
        if self._guess is not None:
            key, guess = self._guess
            self._guess = None
            if ev is None or key != ev.key:
                self.answering.drop_guess(guess)
                guess = None
        self._finals.put_nowait(Final(ev, mode, rid, time.monotonic(), early, guess))

    def _on_idle(self) -> None:
        """No audio for the idle timeout: end the utterance in progress (or send an empty stt final)."""
        assert self._segmenter is not None
        ev = self._segmenter.flush()
        if self._speaking:
            self._voice_activity(False, ev.at_ms if ev is not None else self._segmenter.clock_ms,
                                 transcribed=ev is not None)
        mode = self.session.mode
        if ev is not None or mode == "stt":
            self._queue_final(ev, mode, None)
        self._audio_since_final = False

    def _voice_activity(self, started: bool, at_ms: float, transcribed: bool = True) -> None:
        """Tell the sink the caller started or stopped speaking (a start after a start closes a dropped one)."""
        if started and self._speaking:
            self.sink.data(VoiceActivity(False, int(at_ms), transcribed=False))
        self._speaking = started
        self.sink.data(VoiceActivity(started, int(at_ms), transcribed))

    # ------------------------------------------------------------------ early transcription and guesses

    def _drop_stale_guess(self) -> None:
        """The caller spoke again after a pause: the answer started at the pause was for other words."""
        seg = self._segmenter
        if self._guess is not None and seg is not None and seg.in_speech and seg.pending_final_key() != self._guess[0]:
            guess, self._guess = self._guess[1], None
            self.answering.drop_guess(guess)

    def _maybe_transcribe_early(self, mode: str, rid: RequestId) -> None:
        """Once the tail of silence is in, transcribe what the final will be while the silence window runs.

        If the caller stays silent, the final is ready (or nearly) when the utterance ends; if they speak
        again the result is dropped. Saves up to one transcription's time on every turn.
        """
        seg = self._segmenter
        spec_ms = self.cfg.speculate_ms
        if seg is None or not seg.in_speech or spec_ms <= 0 or not self.engines.stt_loaded():
            return
        if seg.silence_ms < max(spec_ms, seg.settings.tail_ms):
            return
        key = seg.pending_final_key()
        if self._early is not None and self._early[0] == key:
            return
        task = self._tasks.spawn(self.engines.transcribe(seg.pending_final_audio(), "final"))
        self._early = (key, task)
        if self.speculate_answers and self._answers(mode):
            task.add_done_callback(lambda t: self._on_early(key, t, mode, rid))

    def _on_early(self, key: tuple[int, int], task: asyncio.Task[Transcript], mode: str, rid: RequestId) -> None:
        """The early transcript is in while the caller is still silent: start answering it, held."""
        if self.closed or task.cancelled() or task.exception() is not None:
            return
        seg = self._segmenter
        if (self._early is None or self._early[0] != key or self._guess is not None or seg is None
                or not seg.in_speech or seg.pending_final_key() != key):
            return  # superseded: the caller spoke again, or the utterance already ended
        text = task.result().text.strip()
        if not text or self.session.mode != mode or not self._answers(mode) or not self._endpoint.keeps_guess(key):
            return
        guess = self.answering.guess(text, mode, rid)
        if guess is not None:
            self._guess = (key, guess)

    # ------------------------------------------------------------------ partials and finals

    def _maybe_partial(self, mode: str, rid: RequestId) -> None:
        seg = self._segmenter
        interval = self.cfg.partial_interval_ms
        if seg is None or not seg.in_speech or interval <= 0 or not self.engines.stt_loaded():
            return
        if seg.silence_ms > 0 or self.engines.stt_inflight > 0:
            return  # a pause may be the end: the STT thread is kept for the final (finals before partials)
        if self._partial_task is not None and not self._partial_task.done():
            return  # one partial at a time per session
        if not self._finals.empty():
            return
        if seg.speech_ms - self._last_partial_at_ms < interval:
            return
        self._last_partial_at_ms = seg.speech_ms
        self._partial_task = self._tasks.spawn(self._partial(seg.utterance_audio(), mode, rid, self._utterance_no))

    async def _partial(self, audio: np.ndarray, mode: str, rid: RequestId, utterance_no: int) -> None:
        try:
            result = await self.engines.transcribe(audio, "partial")
        except ServerError:
            return
        text = result.text.strip()
        # Drop it if the utterance ended meanwhile (its final is coming) or nothing changed.
        if utterance_no != self._utterance_no or not text or text == self._last_partial_text:
            return
        self._last_partial_text = text
        self.sink.data(Transcribed(text, False, mode, rid, confidence=result.confidence))

    async def _finals_loop(self) -> None:
        """Transcribe utterances in order and hand each final on."""
        while not self.closed:
            final = await self._finals.get()
            # A partial still running for this utterance is dropped when it completes (its utterance number
            # is stale), so partials never follow their final.
            self._transcribing = True
            try:
                await self._final(final)
            finally:
                self._transcribing = False

    @property
    def quiet(self) -> bool:
        """No utterance in progress: the caller is not speaking, nothing heard waits to be segmented or transcribed."""
        seg = self._segmenter
        return (self._frames.empty() and self._finals.empty() and not self._transcribing and not self._speaking
                and (seg is None or not seg.in_speech))

    async def _final(self, f: Final) -> None:
        if f.end is None:
            self.sink.data(Transcribed("", True, f.mode, f.request_id))
            return
        t0 = time.monotonic()
        try:
            result = None
            if f.early is not None:
                try:
                    result = await f.early
                except ServerError:
                    result = None
            if result is None:
                result = await self.engines.transcribe(f.end.audio, "final")
        except NotReady:
            self._drop(f.guess)
            self.sink.data(Transcribed("", True, f.mode, f.request_id, error="stt_unavailable"))
            return
        except Exception:  # noqa: BLE001 - one utterance lost, the call goes on
            self._drop(f.guess)
            log.exception("stt.failed", session=self.session.id)
            self.answering.error(ServerError("speech could not be transcribed"))
            return
        stt_ms = (time.monotonic() - t0) * 1000
        self.metrics.turn_seconds.labels("stt").observe(stt_ms / 1000)
        text = result.text.strip()
        log.info("stt.final", session=self.session.id, call_id=self.session.call_id, chars=len(text),
                 audio_s=round(result.audio_s, 2), stt_ms=round(stt_ms, 1), reason=f.end.reason,
                 speculative=f.early is not None, answer_started=f.guess is not None)
        if f.mode == "stt" or text:
            self.sink.data(Transcribed(text, True, f.mode, f.request_id, confidence=result.confidence))
        if not text or not self._answers(f.mode):
            self._drop(f.guess)
            return
        self.answering.heard(text, f.mode, f.request_id, f.ended_at, stt_ms, f.guess)

    def _answers(self, mode: str) -> bool:
        """Whether finals in `mode` are handed to `answering.heard` (and may be guessed early)."""
        return mode in ("full", "llm") or (mode == "stt" and self.answers_stt)

    def _drop(self, guess: Any) -> None:
        if guess is not None:
            self.answering.drop_guess(guess)

    # ------------------------------------------------------------------ reset

    def reset(self) -> None:
        """Forget buffered audio, the utterance in progress and any guess (stop_session, new call)."""
        while not self._frames.empty():
            self._dequeued(self._frames.get_nowait())
        if self._segmenter is not None:
            self._segmenter.reset()
        self._endpoint.reset()
        if self._guess is not None:
            self.answering.drop_guess(self._guess[1])
            self._guess = None
        self._early = None
        self._utterance_no += 1
        self._audio_since_final = False
        self._speaking = False  # the utterance in progress is forgotten unheard
