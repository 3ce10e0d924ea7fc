"""The voice core's events as AVA protocol v2 messages, queued on the connection's outbox."""

from __future__ import annotations

from typing import Any

from .. import protocol as P
from ..outbox import ConnectionOutbox
from ..session import Session
from ..voice.events import Answer, Event, Failure, Speech, Synthesized, Token, ToolCalls, Transcribed, VoiceActivity
from ..voice.turn import Turn


def render(event: Event, call_id: str) -> dict[str, Any]:
    """One event as its AVA message (a Speech as its tts_audio header: the audio follows it)."""
    if isinstance(event, Transcribed):
        return P.stt_result(event.text, call_id=call_id, mode=event.mode, is_final=event.final,
                            confidence=event.confidence, request_id=event.request_id, error=event.error)
    if isinstance(event, Token):
        return P.llm_token(event.delta, call_id=call_id, request_id=event.request_id, tokens=event.tokens)
    if isinstance(event, Answer):
        return P.llm_response(event.text, call_id=call_id, request_id=event.request_id, mode=event.mode,
                              flags=event.flags)
    if isinstance(event, Speech):
        return P.tts_audio(call_id=call_id, mode=event.mode, encoding=event.encoding,
                           sample_rate_hz=event.sample_rate_hz, byte_length=len(event.audio),
                           utterance_id=event.utterance_id, chunk_index=event.index, is_final=event.final,
                           request_id=event.request_id)
    if isinstance(event, Synthesized):
        return P.tts_response(event.text, event.audio, call_id=call_id, encoding=event.encoding,
                              sample_rate_hz=event.sample_rate_hz, request_id=event.request_id)
    if isinstance(event, ToolCalls):
        return P.llm_tool_response(call_id=call_id, request_id=event.request_id, text=event.text,
                                   tool_calls=event.calls, tool_path=event.path,
                                   structured_attempts=event.structured_attempts, server_gated=event.gated)
    if isinstance(event, Failure):
        err = event.error
        if err.call_id is None:
            err.call_id = call_id
        return P.error_message(err)
    raise TypeError(f"no AVA message for {type(event).__name__}")


class AvaSink:
    """A call's sink on an AVA connection: events rendered with the call's id at the time they are sent."""

    def __init__(self, outbox: ConnectionOutbox, session: Session) -> None:
        self.outbox = outbox
        self.session = session

    def control(self, event: Event) -> None:
        """Errors and acknowledgements overtake speech."""
        self.outbox.send_control(render(event, self.session.call_id))

    def data(self, event: Event, turn: Turn | None = None) -> None:
        """Ordered output; a Speech goes as its header and binary frame, back to back."""
        if isinstance(event, VoiceActivity):
            return  # AVA has no message for it: its clients learn of speech from stt_result
        msg = render(event, self.session.call_id)
        if isinstance(event, Speech) and turn is not None:
            self.outbox.send_audio(msg, event.audio, turn)
        else:
            self.outbox.send_data(msg, turn)

    def discard_speech(self) -> int:
        """Barge-in: drop queued audio and voice-turn output."""
        return self.outbox.discard_speech()
