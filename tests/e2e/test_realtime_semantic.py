"""Realtime `semantic_vad` end to end: the OpenAI SDK against the real server and its turn detector."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from local_ai_server.audio import float32_to_pcm16, resample

from .conftest import silence
from .test_realtime import Events, rt, session, stream  # noqa: F401 - the fixtures this module uses

pytestmark = pytest.mark.e2e


async def test_semantic_vad_keeps_a_mid_sentence_pause_in_one_turn(
        session: tuple[AsyncRealtimeConnection, Events], speak: Callable[[str], np.ndarray]) -> None:  # noqa: F811
    conn, ev = session
    await conn.session.update(session=cast(Any, {
        "type": "realtime", "instructions": "Answer in one short sentence.",
        "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}))
    td = (await ev.type("session.updated")).session.audio.input.turn_detection
    assert td.type == "semantic_vad" and td.eagerness == "high"
    # 600 ms of silence mid-sentence: server_vad's 500 ms default would have cut the question there.
    audio = np.concatenate([silence(0.3), speak("What is the weather like in"), silence(0.6),
                            speak("Paris today?"), silence(1.5)])
    await stream(conn, float32_to_pcm16(resample(audio, 16000, 24000)))
    done = await ev.type("response.done")
    assert done.response.status == "completed"
    heard = ev.of("conversation.item.input_audio_transcription.completed")
    assert len(heard) == 1, [h.transcript for h in heard]
    assert "weather" in heard[0].transcript.lower() and "today" in heard[0].transcript.lower()
    assert len(ev.of("input_audio_buffer.committed")) == 1
