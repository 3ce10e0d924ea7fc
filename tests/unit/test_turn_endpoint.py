"""Smart turn detection with a fake detector: the endpoint policy alone, then in a call's listening."""

from __future__ import annotations

import asyncio

from local_ai_server.voice.endpoint import EndpointPolicy, TurnSettings
from local_ai_server.voice.events import Answer, Transcribed, VoiceActivity

from .test_voice_call import Rig, tone

SMART = TurnSettings(mode="smart", threshold=0.5, short_ms=200, long_ms=1000)


def test_a_pause_is_scored_once_between_the_short_and_the_long_silence() -> None:
    p = EndpointPolicy(SMART)
    assert not p.due(True, 100, (1, 10))  # not yet a short pause
    assert p.due(True, 200, (1, 10))
    assert not p.due(True, 300, (1, 10))  # the same pause again
    assert p.due(True, 200, (1, 20))  # speech resumed: a new pause of a longer utterance
    assert not p.due(True, 1000, (1, 30))  # past the long cap the silence has ended it anyway
    assert not p.due(False, 300, (2, 5))  # no utterance in progress
    assert not EndpointPolicy(TurnSettings(mode="vad")).due(True, 200, (1, 10))


def test_a_score_ends_the_utterance_only_if_complete_and_still_current() -> None:
    p = EndpointPolicy(SMART)
    assert p.verdict((1, 10), 0.5, True, 250, (1, 10))  # at the threshold: complete
    assert not p.verdict((1, 10), 0.9, True, 0, (1, 10))  # speaking again
    assert not p.verdict((1, 10), 0.9, True, 250, (1, 20))  # for audio the caller has since added to
    assert not p.verdict((1, 10), 0.9, False, 250, (1, 10))  # the utterance already ended
    assert p.keeps_guess((1, 20))
    assert not p.verdict((1, 20), 0.49, True, 250, (1, 20))
    assert not p.keeps_guess((1, 20))  # incomplete: the answer guessed on this pause goes
    assert p.keeps_guess((1, 30))
    p.reset()
    assert p.keeps_guess((1, 20))


async def _speak(r: Rig, *chunks: bytes) -> None:
    for chunk in chunks:
        for i in range(0, len(chunk), 640):  # 20 ms frames
            r.call.accept_audio(chunk[i:i + 640], "pcm16le", 16000, None)
            await asyncio.sleep(0.001)


def _finals(r: Rig) -> list[Transcribed]:
    return [t for t in r.sink.of(Transcribed) if t.final]


async def _settle(r: Rig) -> None:
    """Let every frame be segmented and every score and transcription land."""
    await r.until(lambda: r.call.listener._frames.empty())
    for _ in range(20):
        await asyncio.sleep(0.005)


async def test_complete_ends_the_utterance_at_the_short_pause() -> None:
    r = Rig(LOCAL_TURN_DETECTION="smart", LOCAL_TURN_LONG_MS="3000", LOCAL_STT_SPECULATE_MS="0")
    r.engines.turn_p = [0.9]
    try:
        await _speak(r, tone(0.3, 0), tone(1.0), tone(0.6, 0))  # 600 ms of silence, far below the 3 s cap
        await r.until(lambda: r.sink.of(Answer))
        assert len(r.engines.scored) == 1 and len(_finals(r)) == 1
        stops = [v for v in r.sink.of(VoiceActivity) if not v.started]
        assert len(stops) == 1 and stops[0].transcribed
    finally:
        await r.call.close()


async def test_incomplete_waits_for_the_long_silence() -> None:
    r = Rig(LOCAL_TURN_DETECTION="smart", LOCAL_TURN_LONG_MS="1000", LOCAL_STT_SPECULATE_MS="0")
    r.engines.turn_p = [0.1]
    try:
        await _speak(r, tone(0.3, 0), tone(1.0), tone(0.6, 0))
        await _settle(r)
        assert len(r.engines.scored) == 1 and _finals(r) == []  # judged incomplete: still listening
        await _speak(r, tone(0.6, 0))  # 1.2 s of silence in all: past the long cap
        await r.until(lambda: r.sink.of(Answer))
        assert len(_finals(r)) == 1 and len(r.engines.scored) == 1
    finally:
        await r.call.close()


async def test_speech_resuming_after_an_incomplete_pause_is_one_utterance_scored_again() -> None:
    r = Rig(LOCAL_TURN_DETECTION="smart", LOCAL_TURN_LONG_MS="3000", LOCAL_STT_SPECULATE_MS="0")
    r.engines.turn_p = [0.1, 0.8]
    try:
        await _speak(r, tone(0.3, 0), tone(1.0), tone(0.6, 0), tone(0.8), tone(0.6, 0))
        await r.until(lambda: r.sink.of(Answer))
        assert len(_finals(r)) == 1 and len(r.engines.scored) == 2
        assert r.engines.scored[1] > r.engines.scored[0]  # the second score saw the whole utterance
    finally:
        await r.call.close()


async def test_vad_mode_and_a_missing_detector_end_on_silence_alone() -> None:
    for env, turn_p in (({}, [0.0]), ({"LOCAL_TURN_DETECTION": "smart"}, None)):
        r = Rig(LOCAL_STT_SPECULATE_MS="0", LOCAL_TURN_LONG_MS="3000", **env)
        r.engines.turn_p = turn_p
        try:
            # 600 ms > the 500 ms VAD silence: ended although the (never asked) detector would say incomplete.
            await _speak(r, tone(0.3, 0), tone(1.0), tone(0.6, 0))
            await r.until(lambda rig=r: rig.sink.of(Answer))
            assert r.engines.scored == [] and len(_finals(r)) == 1
        finally:
            await r.call.close()


async def test_the_early_answer_is_kept_when_complete() -> None:
    r = Rig(LOCAL_TURN_DETECTION="smart", LOCAL_TURN_LONG_MS="3000", LOCAL_STT_SPECULATE_MS="100")
    r.engines.turn_p = [0.9]
    r.engines.pool.delay = 0.001
    try:
        await _speak(r, tone(0.3, 0), tone(1.0), tone(0.6, 0))
        await r.until(lambda: r.sink.of(Answer))
        await _settle(r)
        assert r.engines.transcribed == 1  # the final is the early transcription
        assert len(r.engines.pool.jobs) == 1 and not r.engines.pool.jobs[0].cancelled
        assert len(r.sink.of(Answer)) == 1
    finally:
        await r.call.close()


async def test_the_early_answer_is_dropped_when_incomplete() -> None:
    r = Rig(LOCAL_TURN_DETECTION="smart", LOCAL_TURN_LONG_MS="1000", LOCAL_TURN_SHORT_MS="300",
            LOCAL_STT_SPECULATE_MS="100")
    r.engines.turn_p = [0.1]
    r.engines.pool.delay = 0.05  # still generating when the verdict comes
    try:
        await _speak(r, tone(0.3, 0), tone(1.0), tone(0.5, 0))
        await _settle(r)
        assert len(r.engines.scored) == 1 and _finals(r) == []
        assert r.engines.pool.jobs and all(j.cancelled for j in r.engines.pool.jobs)  # the guess went unheard
        assert r.sink.of(Answer) == []
        await _speak(r, tone(0.7, 0))  # the long silence ends it: answered afresh, once
        await r.until(lambda: r.sink.of(Answer))
        assert len(_finals(r)) == 1 and len(r.sink.of(Answer)) == 1
        assert not r.engines.pool.jobs[-1].cancelled
    finally:
        await r.call.close()


def test_set_mode_carries_the_turn_settings_and_refuses_bad_ones() -> None:
    import pytest

    from local_ai_server.errors import InvalidField
    from local_ai_server.protocol import SetMode, parse_object

    msg = parse_object({"type": "set_mode", "turn_detection": "Smart", "turn_threshold": 0.6,
                        "turn_short_ms": 250, "turn_long_ms": 1200})
    assert isinstance(msg, SetMode)
    assert (msg.turn_detection, msg.turn_threshold, msg.turn_short_ms, msg.turn_long_ms) == ("smart", 0.6, 250, 1200)
    for bad in ({"turn_detection": "semantic"}, {"turn_threshold": 2}, {"turn_threshold": "0.5"},
                {"turn_short_ms": 10}):
        with pytest.raises(InvalidField):
            parse_object({"type": "set_mode", **bad})


def test_server_defaults_come_from_the_environment() -> None:
    from pathlib import Path

    import pytest

    from local_ai_server.config import ConfigError, from_env
    from local_ai_server.session import Session
    from local_ai_server.voice.endpoint import turn_settings

    cfg = from_env({"LOCAL_TURN_DETECTION": "smart", "LOCAL_TURN_THRESHOLD": "0.6", "LOCAL_TURN_SHORT_MS": "250",
                    "LOCAL_TURN_LONG_MS": "1500"}, models_dir=Path("/m"))
    assert turn_settings(Session(id=1), cfg.stt) == TurnSettings("smart", 0.6, 250, 1500)
    assert turn_settings(Session(id=1, turn_detection="vad", turn_long_ms=900), cfg.stt) == TurnSettings(
        "vad", 0.6, 250, 900)
    # Installs from before the detector have no "turn" in selected.json: the registry's path is used.
    assert cfg.stt.turn_model_path == Path("/m/turn/smart-turn-v3.2-cpu.onnx")
    assert from_env({}, models_dir=Path("/m")).stt.turn_detection == "vad"
    with pytest.raises(ConfigError):
        from_env({"LOCAL_TURN_DETECTION": "semantic"}, models_dir=Path("/m"))
