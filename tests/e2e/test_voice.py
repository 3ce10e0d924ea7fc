"""The voice paths end to end: real speech streamed in real time to the real server with real models."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest

from local_ai_server.audio import is_silent, mulaw_decode, pcm16_to_float32
from tests.paths import REPO

from .conftest import Client, ServerProc, silence

ROOT = REPO
SENTENCE = "I would like to book a table for two people at seven tonight."


def normalise(text: str) -> str:
    """Lower-case, no punctuation, single spaces: what WER is computed on."""
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", text.lower())).strip()


def wer(ref: str, hyp: str) -> float:
    return float(jiwer.wer(normalise(ref), normalise(hyp)))


def audio_pairs(client: Client) -> list[tuple[dict[str, Any], bytes]]:
    """(tts_audio header, binary frame) pairs; asserts every binary frame had its header right before."""
    pairs = []
    items = client.got.items
    for i, (kind, value) in enumerate(items):
        if kind == "binary":
            assert i > 0 and items[i - 1][0] == "json" and items[i - 1][1]["type"] == "tts_audio", \
                "binary frame without a tts_audio header right before it"
            pairs.append((items[i - 1][1], value))
    return pairs


async def test_stt_mode_partials_then_final(client_factory: Callable[..., Any], server: ServerProc,
                                            speak: Callable[[str], np.ndarray]) -> None:
    c = await client_factory()
    ready = await c.request({"type": "set_mode", "mode": "stt", "call_id": "stt-1"}, "mode_ready")
    assert ready["mode"] == "stt" and ready["call_id"] == "stt-1"
    speech = np.concatenate([silence(0.3), speak(SENTENCE), silence(1.2)])
    await c.stream(speech, frame_ms=20)
    final = await c.wait_for(lambda m: m.get("type") == "stt_result" and m.get("is_final") is True, timeout=30)
    assert final["call_id"] == "stt-1" and final["mode"] == "stt"
    assert final["is_partial"] is False and final["stt_backend"] == "faster_whisper"
    assert wer(SENTENCE, final["text"]) <= 0.1, final["text"]
    results = c.got.json("stt_result")
    partials = results[: results.index(final)]
    assert partials, "no partial transcript arrived before the final"
    for p in partials:
        assert p["is_partial"] is True and p["is_final"] is False and p["text"]
    # Partials are only sent when the text changed.
    texts = [p["text"] for p in partials]
    assert all(a != b for a, b in itertools.pairwise(texts))
    # The final was transcribed during the end-of-utterance silence (speculative STT), not after it.
    finals = [e for e in server.log_events() if e.get("event") == "stt.final" and e.get("call_id") == "stt-1"]
    assert finals and finals[-1]["speculative"] is True


async def test_stt_mode_json_audio_at_8k_mulaw(client_factory: Callable[..., Any],
                                               speak: Callable[[str], np.ndarray]) -> None:
    """Telephony input: G.711 mu-law at 8 kHz in JSON frames is resampled and transcribed."""
    import base64

    from local_ai_server.audio import float32_to_pcm16, mulaw_encode, resample

    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "stt", "call_id": "mulaw-in"}, "mode_ready")
    speech = resample(np.concatenate([silence(0.3), speak(SENTENCE), silence(1.2)]), 16000, 8000)
    ulaw = mulaw_encode(float32_to_pcm16(speech))
    for i in range(0, len(ulaw), 2560):  # 320 ms frames, as AVA sends
        await c.send({"type": "audio", "data": base64.b64encode(ulaw[i:i + 2560]).decode(), "rate": 8000,
                      "format": "mulaw", "call_id": "mulaw-in"})
    final = await c.wait_for(lambda m: m.get("type") == "stt_result" and m.get("is_final") is True, timeout=30)
    assert wer(SENTENCE, final["text"]) <= 0.2, final["text"]


@pytest.mark.parametrize("fmt", [("linear16", 16000), (None, None)], ids=["linear16-16k", "mulaw-default"])
async def test_full_mode_turn(client_factory: Callable[..., Any], speak: Callable[[str], np.ndarray],
                              fmt: tuple[str | None, int | None]) -> None:
    encoding, rate = fmt
    c = await client_factory()
    msg: dict[str, Any] = {"type": "set_mode", "mode": "full", "call_id": f"full-{encoding}"}
    if encoding:
        msg.update(output_encoding=encoding, output_sample_rate_hz=rate)
    ready = await c.request(msg, "mode_ready")
    # The format in effect, never null: mulaw/8000 unless the client asked for another.
    assert ready["output_encoding"] == (encoding or "mulaw") and ready["output_sample_rate_hz"] == (rate or 8000)
    question = "What is the capital of France?"
    await c.stream(np.concatenate([silence(0.3), speak(question), silence(1.0)]), frame_ms=40, as_json=True,
                   extra={"call_id": f"full-{encoding}"})
    response = await c.wait_type("llm_response", timeout=60)
    assert response["text"].strip(), "empty LLM answer"
    assert response["call_id"] == f"full-{encoding}"

    final = next(m for m in c.got.json("stt_result") if m["is_final"])
    assert wer(question, final["text"]) <= 0.1, final["text"]
    pairs = audio_pairs(c)
    assert pairs, "no audio was sent"
    want_enc, want_rate = (encoding, rate) if encoding and rate else ("mulaw", 8000)
    utterances = {h["utterance_id"] for h, _ in pairs}
    assert len(utterances) == 1
    total_s = 0.0
    for i, (header, payload) in enumerate(pairs):
        assert header["encoding"] == want_enc and header["sample_rate_hz"] == want_rate
        assert header["byte_length"] == len(payload)
        assert header["chunk_index"] == i
        assert header["is_final"] is (i == len(pairs) - 1)
        assert header["call_id"] == f"full-{encoding}" and header["mode"] == "full"
        pcm = mulaw_decode(payload) if want_enc == "mulaw" else payload
        total_s += len(pcm) / 2 / want_rate
    samples = pcm16_to_float32(b"".join(mulaw_decode(p) if want_enc == "mulaw" else p for _, p in pairs))
    assert not is_silent(samples), "the answer's audio is silent"
    # Plausible length: Piper speaks 8-25 characters per second.
    chars = len(response["text"])
    assert chars / 25 <= total_s <= chars / 6 + 1.0, (chars, total_s)
    # Order: stt final, then the first audio frame, and the llm_response only after it.
    kinds = [(k, v.get("type") if k == "json" else "binary") for k, v in c.got.items]
    first_binary = next(i for i, (k, _) in enumerate(kinds) if k == "binary")
    final_index = next(i for i, (k, v) in enumerate(c.got.items) if k == "json" and v is final)
    response_index = next(i for i, (k, v) in enumerate(c.got.items) if k == "json" and v is response)
    assert final_index < first_binary < response_index


async def test_a_turn_reports_the_wait_of_each_stage(client_factory: Callable[..., Any], server: ServerProc,
                                                    speak: Callable[[str], np.ndarray]) -> None:
    """las_queue_wait_seconds{stage}: a full turn waits for an STT thread, an LLM worker and a TTS thread (the
    time queued there is what bench/capacity.py reads back under load); each wait is counted once it ends."""
    def waits() -> dict[str, tuple[float, float]]:
        return {s: (server.metric("las_queue_wait_seconds_count", f'stage="{s}"'),
                    server.metric("las_queue_wait_seconds_sum", f'stage="{s}"')) for s in ("stt", "llm", "tts")}

    before = waits()
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "waits"}, "mode_ready")
    await c.stream(np.concatenate([silence(0.3), speak("What is the capital of France?"), silence(1.0)]),
                   frame_ms=20)
    await c.wait_type("llm_response", timeout=60)
    assert c.got.binaries(), "no audio was spoken"
    after = waits()
    for stage in ("stt", "llm", "tts"):
        assert after[stage][0] >= before[stage][0] + 1, (stage, before, after)
        assert after[stage][1] >= before[stage][1], (stage, before, after)


async def test_barge_in_stops_the_answer(client_factory: Callable[..., Any],
                                         speak: Callable[[str], np.ndarray]) -> None:
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "barge",
                     "output_encoding": "linear16", "output_sample_rate_hz": 16000}, "mode_ready")
    await c.stream(np.concatenate([silence(0.3), speak("Tell me a long story about a dragon and a knight."),
                                   silence(1.0)]), frame_ms=20)
    await c.wait_for(lambda m: m.get("type") == "tts_audio", timeout=60)
    ack = await c.request({"type": "barge_in", "call_id": "barge", "request_id": "b-1"}, "barge_in_ack")
    assert ack == {"type": "barge_in_ack", "status": "ok", "call_id": "barge", "request_id": "b-1"}
    ack_index = next(i for i, (k, v) in enumerate(c.got.items) if k == "json" and v is ack)
    before = [v for k, v in c.got.items[:ack_index] if k == "json"]
    assert not [m for m in before if m["type"] == "llm_response"], "answer finished before the barge-in: no test"
    # Give a still-running answer every chance to leak audio, then prove the connection still works.
    status = await c.request({"type": "status"}, "status_response")
    assert status["status"] == "ok"
    after = c.got.items[ack_index + 1:]
    assert not [1 for k, _ in after if k == "binary"], "audio of the cancelled answer arrived after the ack"
    assert not [v for k, v in after if k == "json" and v.get("type") in ("tts_audio", "llm_response")]


def answer_events(server: ServerProc, call_id: str) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e.get("event") == "turn.done" and e.get("call_id") == call_id]


async def test_answer_starts_at_the_pause_and_speaks_after_the_final(
        client_factory: Callable[..., Any], server: ServerProc, speak: Callable[[str], np.ndarray]) -> None:
    """The answer is generated from the speculative final during the end-of-utterance window, but nothing
    of it reaches the caller before the stt final: order stays stt final -> audio -> llm_response. The
    end-of-utterance silence is 1100 ms, so the early transcription (started 200 ms into it) is in before the
    final however slow or busy the CPU."""
    confirmed = server.metric("las_speculative_turns_total", 'outcome="confirmed"')
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "spec-1", "segment_silence_ms": 1100},
                    "mode_ready")
    await c.stream(np.concatenate([silence(0.3), speak("What is the capital of France?"), silence(1.6)]),
                   frame_ms=20)
    response = await c.wait_type("llm_response", timeout=60)
    assert response["text"].strip()
    kinds = [k if k == "binary" else v["type"] for k, v in c.got.items]
    final_index = next(i for i, (k, v) in enumerate(c.got.items)
                       if k == "json" and v["type"] == "stt_result" and v["is_final"])
    assert "tts_audio" not in kinds[:final_index] and "binary" not in kinds[:final_index]
    assert final_index < kinds.index("binary") < kinds.index("llm_response")
    assert kinds.count("llm_response") == 1
    assert server.metric("las_speculative_turns_total", 'outcome="confirmed"') == confirmed + 1
    (done,) = answer_events(server, "spec-1")
    assert done["speculative"] is True and done["first_audio_ms"] is not None


async def test_speaking_again_after_a_pause_discards_the_early_answer(
        client_factory: Callable[..., Any], server: ServerProc, speak: Callable[[str], np.ndarray]) -> None:
    """A 700 ms pause mid-sentence, with the silence that ends an utterance set to 1100 ms: long enough to
    start an answer to the first half (its transcription has 500 ms, however slow the CPU), too short to
    end the utterance. The caller goes on, so that answer is dropped unheard and the whole sentence is
    answered."""
    started = server.metric("las_speculative_turns_total", 'outcome="started"')
    discarded = server.metric("las_speculative_turns_total", 'outcome="discarded"')
    c = await client_factory()
    await c.request({"type": "set_mode", "mode": "full", "call_id": "spec-2", "segment_silence_ms": 1100},
                    "mode_ready")
    first, second = "I would like to book a table.", "For two people at seven tonight, please."
    half = speak(first)
    voiced = np.nonzero(np.abs(half) > 0.02)[0]
    half = half[: voiced[-1] + 1]  # Piper's own trailing silence would make the pause longer
    await c.stream(np.concatenate([silence(0.3), half, silence(0.7), speak(second), silence(1.6)]),
                   frame_ms=20)
    await c.wait_type("llm_response", timeout=60)
    finals = [m for m in c.got.json("stt_result") if m["is_final"]]
    text = finals[0]["text"].lower()
    assert len(finals) == 1 and ("seven" in text or "7" in text) and "table" in text
    assert server.metric("las_speculative_turns_total", 'outcome="started"') >= started + 1
    assert server.metric("las_speculative_turns_total", 'outcome="discarded"') >= discarded + 1
    # One answer reached the caller, after the one final, as one utterance of audio.
    assert len(c.got.json("llm_response")) == 1
    items = c.got.items
    final_index = next(i for i, (k, v) in enumerate(items) if k == "json" and v is finals[0])
    assert not [1 for k, v in items[:final_index] if k == "binary" or v.get("type") == "tts_audio"]
    assert len({h["utterance_id"] for h, _ in audio_pairs(c)}) == 1
    assert len(answer_events(server, "spec-2")) == 1


def test_voice_turn_script_talks_to_the_server(server: ServerProc, tmp_path: Path) -> None:
    """scripts/voice_turn.py, the operator's first check, really completes a turn and writes the answer."""
    out = tmp_path / "answer.wav"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "voice_turn.py"), "--url", server.url,
                           "--text", "What is the capital of France?", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Whisper tiny hears "France" as "friends" on some CPUs: the words around it are what is checked.
    assert "heard:    'What is the capital of" in proc.stdout and "answered:" in proc.stdout
    with wave.open(str(out)) as w:
        assert w.getframerate() == 16000 and w.getnframes() > 16000 * 0.5
