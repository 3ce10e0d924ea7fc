"""Smart turn detection end to end: the real server with the real turn detector, over AVA's protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .conftest import Client, silence

QUESTION = ("What is the weather like in", "Paris today?")  # said with a 600 ms pause in the middle


async def _finals(c: Client, call_id: str, speech: np.ndarray) -> list[str]:
    """Stream `speech` in real time (stt mode) and return the final transcripts it gave."""
    await c.stream(speech, frame_ms=20, extra={"call_id": call_id})
    # The stream ends with 1.5 s of silence: past every silence cap, so every utterance has ended.
    await c.wait_for(lambda m: m.get("type") == "stt_result" and m.get("is_final") is True
                     and "today" in m.get("text", "").lower(), timeout=60)
    return [m["text"] for m in c.got.json("stt_result") if m["is_final"] and m["text"].strip()]


async def test_a_mid_sentence_pause_is_one_utterance_with_smart_turns_and_two_with_vad(
        client_factory: Callable[..., Any], speak: Callable[[str], np.ndarray]) -> None:
    first, rest = QUESTION
    speech = np.concatenate([silence(0.3), speak(first), silence(0.6), speak(rest), silence(1.5)])

    vad = await client_factory()
    ready = await vad.request({"type": "set_mode", "mode": "stt", "call_id": "vad-1", "turn_detection": "vad",
                               "segment_silence_ms": 500}, "mode_ready")
    assert ready["turn_detection"] == "vad"
    assert len(await _finals(vad, "vad-1", speech)) == 2  # the pause ended the first half on its own

    smart = await client_factory()
    ready = await smart.request({"type": "set_mode", "mode": "stt", "call_id": "smart-1",
                                 "turn_detection": "smart", "segment_silence_ms": 500}, "mode_ready")
    # "smart" echoed back means the server loaded the detector (without it, sessions get "vad").
    assert ready["turn_detection"] == "smart" and ready["turn_short_ms"] == 200 and ready["turn_long_ms"] == 1000
    finals = await _finals(smart, "smart-1", speech)
    assert len(finals) == 1, finals  # judged incomplete at the pause: kept listening
    assert "weather" in finals[0].lower() and "today" in finals[0].lower()  # both halves, one final


async def test_a_full_mode_turn_is_answered_with_smart_turns(
        client_factory: Callable[..., Any], speak: Callable[[str], np.ndarray]) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "smart-2", "turn_detection": "smart",
                     "turn_long_ms": 3000}, "mode_ready")
    # 1.2 s of silence after a finished question: below the 3 s cap, so only the detector can end it.
    await c.stream(np.concatenate([silence(0.3), speak("What is the capital of France?"), silence(1.2)]),
                   frame_ms=20, extra={"call_id": "smart-2"})
    response = await c.wait_type("llm_response", timeout=60)
    assert response["text"].strip()
    finals = [m for m in c.got.json("stt_result") if m["is_final"]]
    assert len(finals) == 1 and "france" in finals[0]["text"].lower()
    assert c.got.binaries(), "no audio was sent"
