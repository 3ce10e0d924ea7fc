"""Critical path first through the real server: another caller's answer overtakes a spoken answer's tail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .conftest import Client, connect, silence, start_server

# A long spoken answer: its tail (everything after the first sentence) is what the other caller overtakes.
ENV = {"LOCAL_LLM_MAX_TOKENS": "400", "LOCAL_LLM_TEMPERATURE": "0", "LOCAL_SCHEDULING": "priority"}
STORY = "Tell me a long story about a dragon who learns to bake bread."


async def test_a_new_answer_overtakes_another_call_s_spoken_tail(models_dir: Path, tmp_path: Path,
                                                                 speak: Callable[[str], np.ndarray]) -> None:
    srv = start_server(tmp_path, models_dir, env=ENV)
    clients: list[Client] = []
    try:
        a, b = clients = [await connect(srv), await connect(srv)]
        await a.request({"type": "set_mode", "mode": "full", "call_id": "a"}, "mode_ready")
        await a.stream(np.concatenate([silence(0.3), speak(STORY), silence(1.0)]), frame_ms=40, as_json=True,
                       extra={"call_id": "a"})
        await a.wait_for(lambda m: m.get("type") == "tts_audio", timeout=90)  # its first sentence is out
        answer = await b.request({"type": "llm_request", "text": "What is the capital of France?",
                                  "request_id": "b", "call_id": "b"}, "llm_response", timeout=90)
        assert answer["text"].strip()
        # Served while the long answer was still being made: it did not wait for its tail. First come, first
        # served, it waits for all 400 tokens of it, most of which has been synthesized and sent to the first
        # caller by then (45 s of speech in a run with LOCAL_SCHEDULING=fifo); here that caller has its first
        # sentences only (the answer is paced: LOCAL_PACE_AHEAD_S, 5 s, ahead of its playback).
        sent_s = sum(h["byte_length"] for h in a.got.json("tts_audio")) / 8000  # mu-law, 8 kHz: a byte a sample
        assert not a.got.json("llm_response") and sent_s < 10.0, f"{sent_s:.1f} s of its speech sent already"
        await a.send({"type": "barge_in", "request_id": "stop"})
        await a.wait_type("barge_in_ack")
    finally:
        for c in clients:
            await c.close()
        assert srv.stop() == 0, srv.logs()[-2000:]
