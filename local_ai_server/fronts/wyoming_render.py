"""The voice core's events as Wyoming events: the `info` reply, and the sinks of handle and speech turns."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)

from ..voice.events import Answer, Failure, Speech, Token
from ..voice.events import Event as CoreEvent
from ..voice.turn import Turn

# Samples per audio-chunk event, as the reference servers send them (wyoming-piper: 1024).
SAMPLES_PER_CHUNK = 1024
WIDTH = 2  # every audio we send is 16-bit mono PCM
# This project has no public home page yet: an empty URL rather than a made-up one.
US = Attribution(name="local-ai-server", url="")


class Outbox(Protocol):
    """Where a connection's events wait to be written."""

    def send(self, event: Event, turn: Turn | None = None) -> None:
        """Queue `event`; dropped unsent if `turn` is cancelled before it is written."""


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def info_event(models: dict[str, Any], *, stt_language: str, tts_language: str | None,
               handle_streaming: bool) -> Event:
    """What `describe` is answered with: the models loaded now, as Home Assistant lists them."""
    ours = _version("local-ai-server")
    stt, llm, tts = models["stt"], models["llm"], models["tts"]
    asr = AsrProgram(
        name="local-ai-server", description="faster-whisper speech-to-text (local-ai-server)",
        attribution=Attribution(name="SYSTRAN faster-whisper", url="https://github.com/SYSTRAN/faster-whisper"),
        installed=True, version=ours, supports_transcript_streaming=True,
        models=[AsrModel(name=stt["display"] or "none", description="Whisper (CTranslate2)",
                         attribution=Attribution(name="OpenAI Whisper", url="https://github.com/openai/whisper"),
                         installed=bool(stt["loaded"]), version=_version("faster-whisper"),
                         languages=[stt_language])] if stt["display"] else [])
    voice_lang = tts_language or "en_US"
    speech = TtsProgram(
        name="local-ai-server", description="Piper text-to-speech (local-ai-server)",
        attribution=Attribution(name="Piper", url="https://github.com/OHF-Voice/piper1-gpl"),
        installed=True, version=ours, supports_synthesize_streaming=True,
        voices=[TtsVoice(name=tts["display"], description="Piper voice",
                         attribution=Attribution(name="rhasspy", url="https://github.com/rhasspy/piper-voices"),
                         installed=bool(tts["loaded"]), version=_version("piper-tts"),
                         languages=[voice_lang])] if tts["display"] else [])
    handle = HandleProgram(
        name="local-ai-server", description="A local LLM (llama.cpp) as a conversation agent",
        attribution=Attribution(name="llama.cpp", url="https://github.com/ggml-org/llama.cpp"),
        installed=True, version=ours, supports_handled_streaming=handle_streaming,
        models=[HandleModel(name=llm["display"], description="GGUF chat model", attribution=US,
                            installed=bool(llm["loaded"]), version=None, languages=[stt_language])]
        if llm["display"] else [])
    return Info(asr=[asr], tts=[speech], handle=[handle]).event()


def transcript_events(text: str, language: str | None) -> list[Event]:
    """A finished transcription, streamed as Wyoming asks: start, the text as a chunk, the whole, stop."""
    events = [TranscriptStart(language=language).event()]
    if text:
        events.append(TranscriptChunk(text=text).event())
    events += [Transcript(text=text, language=language).event(), TranscriptStop().event()]
    return events


def error_event(message: str, code: str) -> Event:
    """An `error` event: what went wrong, in words a client may show."""
    return Error(text=message, code=code).event()


def audio_events(pcm: bytes, rate: int) -> list[Event]:
    """PCM16 mono bytes as audio-chunk events of SAMPLES_PER_CHUNK samples."""
    step = SAMPLES_PER_CHUNK * WIDTH
    return [AudioChunk(rate=rate, width=WIDTH, channels=1, audio=pcm[i:i + step]).event()
            for i in range(0, len(pcm), step)]


class HandleSink:
    """A conversation turn's events as `handled` (or `not-handled`), streamed when the client may take it."""

    def __init__(self, out: Outbox, streaming: bool) -> None:
        self.out = out
        self.streaming = streaming
        self.started = False
        self.answered = False

    def control(self, event: CoreEvent) -> None:
        """An error: the turn is not handled (the core also reports cancellations here)."""
        if isinstance(event, Failure) and not self.answered:
            self.answered = True
            self.out.send(NotHandled(text=event.error.message).event())
            if self.started:
                self.out.send(HandledStop().event())

    def data(self, event: CoreEvent, turn: Turn | None = None) -> None:
        """Tokens as handled-chunk events, the answer as `handled`."""
        if isinstance(event, Token) and self.streaming:
            if not self.started:
                self.started = True
                self.out.send(HandledStart().event(), turn)
            self.out.send(HandledChunk(text=event.delta).event(), turn)
        elif isinstance(event, Answer) and not self.answered:
            self.answered = True
            self.out.send(Handled(text=event.text).event(), turn)
            if self.started:
                self.out.send(HandledStop().event(), turn)

    def discard_speech(self) -> int:
        """Nothing of a conversation turn is speech."""
        return 0


class SpeechSink:
    """A synthesis turn's speech as audio events: one audio-start/stop around all of it, or one per sentence."""

    def __init__(self, out: Outbox, rate: int, per_sentence: bool) -> None:
        self.out = out
        self.rate = rate
        self.per_sentence = per_sentence
        self.failed: str | None = None

    def control(self, event: CoreEvent) -> None:
        """An error synthesizing: said once, as an `error` event."""
        if isinstance(event, Failure) and self.failed is None:
            self.failed = event.error.code
            self.out.send(error_event(event.error.message, event.error.code))

    def data(self, event: CoreEvent, turn: Turn | None = None) -> None:
        """One sentence of speech."""
        if not isinstance(event, Speech):
            return
        if self.per_sentence:
            self.out.send(AudioStart(rate=self.rate, width=WIDTH, channels=1).event(), turn)
        for chunk in audio_events(event.audio, self.rate):
            self.out.send(chunk, turn)
        if self.per_sentence:
            self.out.send(AudioStop().event(), turn)

    def discard_speech(self) -> int:
        """A synthesis is never interrupted by the caller's voice on this protocol."""
        return 0
