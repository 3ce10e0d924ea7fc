"""Wyoming (Home Assistant's voice protocol): events in, calls on the voice core and its engines, events out.

One connection may ask for a transcription, a synthesis (whole or streamed) and conversation turns;
its requests are served in the order they came, one at a time (as Wyoming peers do), while `describe`
and `ping` are answered at once. Unknown events are ignored, as every Wyoming peer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.handle import NotHandled
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from ..admission import FULL_MESSAGE
from ..audio import SUPPORTED_OUTPUT
from ..errors import InvalidField, ServerError
from ..hub import Hub
from ..session import Session
from ..tasks import TaskOwner
from ..voice.call import Call
from ..voice.events import Failure
from ..voice.ports import TokenSource
from ..voice.turn import FixedAnswer, Turn, Voice, run_answer
from .wyoming_audio import AudioIn, BadAudio
from .wyoming_render import WIDTH, HandleSink, Outbox, SpeechSink, error_event, info_event, transcript_events

log = structlog.get_logger(__name__)

# Requests a connection may have waiting behind the one being served; past it, `busy`.
MAX_QUEUED = 8
# The longest utterance taken for one transcription (a voice command is seconds; dictation, a minute).
MAX_AUDIO_S = 120.0
DEFAULT_SPEECH_RATE = 22050

Job = Callable[[], Awaitable[None]]


class TextStream:
    """The text of a streamed synthesis, as the client sends it: an answer's token source for the core."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self.closed = False
        self.last_tokens = 0
        self.stats: dict[str, Any] = {}
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()

    def push(self, text: str) -> bool:
        """Add text; False (and nothing added) once the stream is closed or would grow past `max_chars`."""
        if self.closed or self.chars + len(text) > self.max_chars:
            return False
        self.chars += len(text)
        self._queue.put_nowait(text)
        return True

    def close(self) -> None:
        """No more text: the last sentence may now be spoken."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[str]:
        """The text, piece by piece, until closed."""
        while (text := await self._queue.get()) is not None:
            yield text

    def cancel(self) -> None:
        """The synthesis was cancelled: nothing more will be read."""
        self.close()


class WyomingFront:
    """One Wyoming connection: every event parsed, each request served in order and answered once."""

    def __init__(self, hub: Hub, session: Session, out: Outbox, tasks: TaskOwner, remote: str | None = None) -> None:
        self.hub = hub
        self.session = session
        self.out = out
        self.remote = remote
        self.tasks = tasks
        self.handle_streaming = hub.cfg.wyoming_handle_streaming
        self.handle_sink = HandleSink(out, self.handle_streaming)
        self.call = Call(session, hub.engines, self.handle_sink, hub.cfg, hub.metrics, tasks)
        self.audio: AudioIn | None = None
        self.language: str | None = None
        self.text_stream: TextStream | None = None
        self._jobs: asyncio.Queue[tuple[str, Job]] = asyncio.Queue(MAX_QUEUED)
        self._serving = False  # a request is being served
        self.refused = False  # the box was full at this call's first request: the connection ends
        self._worker = tasks.spawn(self._serve_jobs(), name="wyoming-jobs")

    # ------------------------------------------------------------------ events in

    def on_event(self, event: Event) -> None:
        """Handle one event; nothing a client sends raises out of here."""
        try:
            self._dispatch(event)
        except BadAudio as err:
            self.out.send(error_event(str(err), "unsupported_audio"))
        except (KeyError, TypeError, ValueError, AttributeError):
            # A known event with a field of the wrong shape: said, and the connection goes on.
            log.info("wyoming.bad_event", session=self.session.id, type=event.type[:40])
            self.out.send(error_event(f"malformed {event.type[:40]} event", "invalid_event"))

    def _dispatch(self, event: Event) -> None:
        kind = event.type
        if self.refused or (_is_work(kind) and not self._admitted(kind)):
            return
        if Describe.is_type(kind):
            self.out.send(self._info())
        elif Ping.is_type(kind):
            self.out.send(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(kind):
            self.language = Transcribe.from_event(event).language
            self.audio = AudioIn(MAX_AUDIO_S)
        elif AudioStart.is_type(kind):
            if self.audio is None or self.audio.segments:
                self.audio = AudioIn(MAX_AUDIO_S)
        elif AudioChunk.is_type(kind):
            chunk = AudioChunk.from_event(event)
            if self.audio is None:
                self.audio = AudioIn(MAX_AUDIO_S)  # audio without audio-start, as the reference server takes it
            self.audio.add(chunk.audio or b"", chunk.rate, chunk.width, chunk.channels)
        elif AudioStop.is_type(kind):
            audio, self.audio = self.audio or AudioIn(MAX_AUDIO_S), None
            language, self.language = self.language, None
            self._queue("transcribe", lambda: self._transcribe(audio, language))
        elif SynthesizeStart.is_type(kind):
            self._start_stream()
        elif SynthesizeChunk.is_type(kind):
            self._stream_text(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(kind):
            if self.text_stream is not None:
                self.text_stream.close()
                self.text_stream = None
        elif Synthesize.is_type(kind):
            text = Synthesize.from_event(event).text
            if self.text_stream is None:  # inside a stream it repeats the streamed text, for older servers
                self._queue("synthesize", lambda: self._synthesize(text))
        elif Transcript.is_type(kind):
            text = Transcript.from_event(event).text
            self._queue("handle", lambda: self._handle(text))
        else:
            log.debug("wyoming.ignored", session=self.session.id, type=kind[:40])

    def _admitted(self, kind: str) -> bool:
        """Whether this connection's call has a place (taken at its first request); else refuse it, once."""
        if self.hub.admit(self.session.id, "wyoming"):
            return True
        self.refused = True
        # What the request's client reads: a conversation client waits for (not-)handled, the others an error.
        refusal = (NotHandled(text=FULL_MESSAGE).event() if Transcript.is_type(kind)
                   else error_event(FULL_MESSAGE, "busy"))
        self.out.send(refusal)
        return False

    def _queue(self, what: str, job: Job) -> None:
        try:
            self._jobs.put_nowait((what, job))
        except asyncio.QueueFull:
            msg = f"too many requests waiting on this connection (max {MAX_QUEUED})"
            if what == "handle":
                self.out.send(NotHandled(text=msg).event())
            else:
                self.out.send(error_event(msg, "busy"))

    def _start_stream(self) -> None:
        if self.text_stream is not None:
            self.out.send(error_event("a synthesis stream is already open on this connection", "invalid_state"))
            return
        stream = TextStream(self.hub.cfg.max_text_chars)
        self.text_stream = stream
        self._queue("synthesize-stream", lambda: self._synthesize_stream(stream))

    def _stream_text(self, text: str) -> None:
        stream = self.text_stream
        if stream is None:
            log.debug("wyoming.chunk_without_stream", session=self.session.id)
            return
        if not isinstance(text, str):
            raise TypeError("synthesize-chunk text must be a string")
        if not stream.push(text) and not stream.closed:
            self.out.send(error_event(f"streamed text longer than {stream.max_chars} characters: the rest is not "
                                      "spoken", "text_too_long"))

    # ------------------------------------------------------------------ requests, one at a time

    async def _serve_jobs(self) -> None:
        while True:
            what, job = await self._jobs.get()
            self._serving = True
            try:
                await job()
            except ServerError as err:
                self.out.send(error_event(err.message, err.code))
            except Exception:  # noqa: BLE001 - one failed request must not end the connection's others
                log.exception("wyoming.request_failed", session=self.session.id, request=what)
                self.out.send(error_event(f"internal error in {what}", "internal"))
            finally:
                self._serving = False
                self._jobs.task_done()

    def between_turns(self) -> bool:
        """Idle between requests (a draining server may close it): no audio or text stream open, none queued."""
        return (self.audio is None and self.text_stream is None and self._jobs.empty() and not self._serving
                and self.call.between_turns())

    async def end_of_input(self) -> None:
        """The client will send nothing more: end an open text stream, and serve what is queued."""
        if self.text_stream is not None:
            self.text_stream.close()
            self.text_stream = None
        await self._jobs.join()

    async def _transcribe(self, audio: AudioIn, language: str | None) -> None:
        engines = self.hub.engines
        text = ""
        if not audio.overflowed:  # an over-long utterance was refused (said when it happened)
            try:
                samples = await engines.run_aux(audio.to_16k_mono)
                text = (await engines.transcribe(samples, kind="final")).text if samples.size else ""
            except ServerError as err:
                self.call.metrics.errors.labels(err.code).inc()
                self.out.send(error_event(err.message, err.code))
        log.info("wyoming.transcribed", session=self.session.id, audio_s=round(audio.seconds, 2), chars=len(text))
        # Answered even after an error: Home Assistant waits for a transcript, not for an error.
        for ev in transcript_events(text, language or self.hub.cfg.stt.language):
            self.out.send(ev)

    def _speech_rate(self) -> int:
        tts = self.hub.engines.tts
        rate = tts.sample_rate if tts is not None else DEFAULT_SPEECH_RATE
        return rate if rate in SUPPORTED_OUTPUT["linear16"] else DEFAULT_SPEECH_RATE

    async def _speak(self, source: TokenSource, sink: SpeechSink, rate: int) -> None:
        """Speak `source`'s text sentence by sentence through the core's turn, as an answer is spoken."""
        turn = Turn(kind="tts_request", request_id=None)
        voice = Voice(self.hub.engines, sink, "linear16", rate, lambda coro: self.tasks.spawn(coro),
                      lambda _turn, err: sink.control(Failure(err)))
        try:
            await run_answer(turn, source, voice, stream_tokens=False, sink=sink)
        except ServerError as err:
            sink.control(Failure(err))

    async def _synthesize(self, text: str) -> None:
        rate = self._speech_rate()
        sink = SpeechSink(self.out, rate, per_sentence=False)
        self.out.send(AudioStart(rate=rate, width=WIDTH, channels=1).event())
        if len(text) > self.hub.cfg.max_text_chars:
            too_long = InvalidField(f"text longer than {self.hub.cfg.max_text_chars} characters")
            sink.control(Failure(too_long))
        else:
            await self._speak(FixedAnswer(text), sink, rate)
        # Closed even after an error: a client waiting for audio-stop stops waiting.
        self.out.send(AudioStop().event())

    async def _synthesize_stream(self, stream: TextStream) -> None:
        rate = self._speech_rate()
        await self._speak(stream, SpeechSink(self.out, rate, per_sentence=True), rate)
        self.out.send(SynthesizeStopped().event())

    async def _handle(self, text: str) -> None:
        sink = self.handle_sink
        sink.started = sink.answered = False
        if not isinstance(text, str) or not text.strip():
            self.out.send(NotHandled(text="nothing to answer: the transcript is empty").event())
            return
        if len(text) > self.hub.cfg.max_text_chars:
            self.out.send(NotHandled(text=f"text longer than {self.hub.cfg.max_text_chars} characters").event())
            return
        try:
            turn = self.call.start_turn(text, kind="llm_request", request_id=None, speak=False,
                                        stream_tokens=self.handle_streaming)
        except ServerError as err:
            self.out.send(NotHandled(text=err.message).event())
            return
        if turn.task is not None:
            await asyncio.wait([turn.task])  # its outcome reaches the sink: handled, or not-handled
        if not sink.answered:
            sink.control(Failure(ServerError("the answer was not completed")))

    # ------------------------------------------------------------------ describe, close

    def _info(self) -> Event:
        engines, cfg = self.hub.engines, self.hub.cfg
        tts = engines.tts
        return info_event(engines.model_status(), stt_language=cfg.stt.language,
                          tts_language=getattr(tts, "language", None) if tts is not None else None,
                          handle_streaming=self.handle_streaming)

    async def close(self) -> None:
        """The connection ended: cancel what it had in flight and wait for it."""
        if self.text_stream is not None:
            self.text_stream.close()
        self._worker.cancel()
        await self.call.close()


# Events that start (or carry) a request: the connection is a call from the first one on, and needs a place.
_WORK = (Transcribe, AudioStart, AudioChunk, AudioStop, SynthesizeStart, SynthesizeChunk, Synthesize, Transcript)


def _is_work(kind: str) -> bool:
    return any(cls.is_type(kind) for cls in _WORK)
