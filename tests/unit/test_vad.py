"""The streaming utterance Segmenter with a scripted VAD (the real model: component/test_vad_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

from local_ai_server.vad import (
    SAMPLE_RATE,
    WINDOW,
    WINDOW_MS,
    Event,
    Segmenter,
    SegmenterSettings,
    UtteranceEnd,
    UtteranceStart,
)

LOUD = 0.05  # int16-scale RMS ~1640: well above the default energy gate of 100
QUIET = 0.0005  # RMS ~16: below the energy gate
STEP = 1e-6  # per-window offset so each window's index can be read back from its samples
SPEECH, SILENCE = 0.9, 0.0


class ScriptedVad:
    """A VadStream whose probabilities come from a script, one per 512-sample window, in order."""

    def __init__(self, script: list[float]) -> None:
        self.script = script
        self.pos = 0

    def probs(self, windows: np.ndarray) -> np.ndarray:
        assert windows.ndim == 2 and windows.shape[1] == WINDOW
        n = windows.shape[0]
        out = [self.script[i] if i < len(self.script) else 0.0 for i in range(self.pos, self.pos + n)]
        self.pos += n
        return np.asarray(out, dtype=np.float32)


def pattern(*runs: tuple[float, int]) -> list[float]:
    """Probabilities from (probability, windows) runs."""
    return [p for p, n in runs for _ in range(n)]


def tagged_audio(n_windows: int, amp: float | list[float] = LOUD) -> np.ndarray:
    """n windows of constant samples; window i holds amp_i + i*STEP so it can be identified later."""
    amps = np.full(n_windows, amp, dtype=np.float64) if isinstance(amp, float) else np.asarray(amp)
    values = amps + np.arange(n_windows) * STEP
    return np.repeat(values.astype(np.float32), WINDOW)


def window_ids(audio: np.ndarray, amp: float = LOUD) -> list[int]:
    """The window indices an utterance's audio was cut from (whole windows only)."""
    firsts = audio[: audio.size // WINDOW * WINDOW].reshape(-1, WINDOW)[:, 0].astype(np.float64)
    return [round((v - amp) / STEP) for v in firsts.tolist()]


DEFAULT_SETTINGS = SegmenterSettings()


def run(script: list[float], settings: SegmenterSettings = DEFAULT_SETTINGS,
        audio: np.ndarray | None = None, chunk: int | None = None) -> tuple[list[Event], Segmenter]:
    """Feed scripted audio (all windows loud unless `audio` is given) and collect the events."""
    seg = Segmenter(ScriptedVad(script), settings)
    data = tagged_audio(len(script)) if audio is None else audio
    events: list[Event] = []
    step = chunk or data.size
    for i in range(0, data.size, step):
        events += seg.feed(data[i:i + step])
    return events, seg


def ends(events: list[Event]) -> list[UtteranceEnd]:
    return [e for e in events if isinstance(e, UtteranceEnd)]


def starts(events: list[Event]) -> list[UtteranceStart]:
    return [e for e in events if isinstance(e, UtteranceStart)]


# ---------------------------------------------------------------- scripted logic


def test_window_constants() -> None:
    assert (SAMPLE_RATE, WINDOW, WINDOW_MS) == (16000, 512, 32.0)


def test_utterance_with_preroll_and_tail() -> None:
    events, seg = run(pattern((SILENCE, 20), (SPEECH, 30), (SILENCE, 30)))
    assert [type(e) for e in events] == [UtteranceStart, UtteranceEnd]
    start, end = events
    assert isinstance(start, UtteranceStart) and isinstance(end, UtteranceEnd)
    # onset_ms=64 needs two speech windows: windows 20 and 21, so the start is at the end of window 21.
    assert start.at_ms == 22 * WINDOW_MS
    assert end.reason == "silence"
    # 500 ms of silence is 16 windows: the 16th silent window is window 65.
    assert end.at_ms == 66 * WINDOW_MS
    # Pre-roll keeps the 10 windows (320 ms) up to the onset, the tail keeps 6 windows (200 ms) of silence.
    assert window_ids(end.audio) == list(range(12, 56))
    assert end.audio.size == 44 * WINDOW and end.audio.dtype == np.float32
    assert end.speech_ms == 30 * WINDOW_MS
    assert not seg.in_speech


def test_single_speech_windows_never_open_an_utterance() -> None:
    events, seg = run(pattern((SILENCE, 3), (SPEECH, 1), (SILENCE, 2), (SPEECH, 1), (SILENCE, 3)) * 5)
    assert events == [] and not seg.in_speech


def test_onset_ms_sets_the_consecutive_speech_needed() -> None:
    settings = SegmenterSettings(onset_ms=96, min_speech_ms=0)
    events, _ = run(pattern((SILENCE, 5), (SPEECH, 2), (SILENCE, 5)), settings)
    assert events == []
    events, _ = run(pattern((SILENCE, 5), (SPEECH, 3), (SILENCE, 30)), settings)
    assert [type(e) for e in events] == [UtteranceStart, UtteranceEnd]
    assert events[0].at_ms == 8 * WINDOW_MS


def test_shorter_preroll_setting() -> None:
    events, _ = run(pattern((SILENCE, 20), (SPEECH, 10), (SILENCE, 30)), SegmenterSettings(preroll_ms=128))
    (end,) = ends(events)
    assert window_ids(end.audio)[0] == 18  # 4 windows kept: 18, 19 (silence) and the onset 20, 21


def test_utterance_ends_only_after_silence_ms() -> None:
    script = pattern((SILENCE, 5), (SPEECH, 10), (SILENCE, 20), (SPEECH, 10), (SILENCE, 40))
    short, _ = run(script)  # default 500 ms: the 640 ms gap splits the speech
    assert [e.reason for e in ends(short)] == ["silence", "silence"]
    long, _ = run(script, SegmenterSettings(silence_ms=1000))  # 1 s: one utterance
    (end,) = ends(long)
    assert end.speech_ms == 20 * WINDOW_MS
    assert end.at_ms == (5 + 10 + 20 + 10 + 32) * WINDOW_MS  # 1000 ms is 32 windows


def test_tail_ms_setting() -> None:
    events, _ = run(pattern((SILENCE, 20), (SPEECH, 10), (SILENCE, 30)), SegmenterSettings(tail_ms=0))
    (end,) = ends(events)
    assert window_ids(end.audio)[-1] == 29  # the last voiced window, nothing after it


def test_hysteresis_keeps_slightly_lower_probabilities_as_speech() -> None:
    events, seg = run(pattern((SILENCE, 5), (SPEECH, 5), (0.4, 40)))
    assert ends(events) == [] and seg.in_speech
    assert seg.speech_ms == 45 * WINDOW_MS
    events, seg = run(pattern((SILENCE, 5), (SPEECH, 5), (0.3, 40)))
    assert len(ends(events)) == 1 and not seg.in_speech


def test_blip_shorter_than_min_speech_is_dropped() -> None:
    blip = pattern((SILENCE, 5), (SPEECH, 3), (SILENCE, 30))  # 96 ms of speech < 120 ms
    events, seg = run(blip)
    assert len(starts(events)) == 1 and ends(events) == []
    assert not seg.in_speech
    events, _ = run(blip, SegmenterSettings(min_speech_ms=96))
    assert len(ends(events)) == 1


def test_segmenter_recovers_after_a_dropped_blip() -> None:
    events, _ = run(pattern((SILENCE, 5), (SPEECH, 3), (SILENCE, 20), (SPEECH, 10), (SILENCE, 20)))
    (end,) = ends(events)
    # The blip's utterance swallowed windows 5..23; the pre-roll refills from window 24 on.
    assert end.speech_ms == 10 * WINDOW_MS and window_ids(end.audio)[0] == 24


def test_max_utterance_forces_an_end() -> None:
    events, seg = run(pattern((SILENCE, 5), (SPEECH, 80)), SegmenterSettings(max_utterance_s=1.0))
    first, second = ends(events)
    assert (first.reason, second.reason) == ("max_length", "max_length")
    # 1000 ms is reached at 32 windows, pre-roll included.
    assert window_ids(first.audio) == list(range(32))
    assert first.at_ms == 32 * WINDOW_MS
    # Speech continues: a new utterance opens after a fresh onset.
    assert window_ids(second.audio) == list(range(32, 64))
    assert len(starts(events)) == 3 and seg.in_speech
    rest = seg.flush()
    assert rest is not None and rest.reason == "flush" and window_ids(rest.audio) == list(range(64, 85))


def test_flush_ends_utterance_in_progress_including_partial_window() -> None:
    script = pattern((SILENCE, 5), (SPEECH, 20))
    seg = Segmenter(ScriptedVad(script))
    audio = tagged_audio(len(script))
    events = seg.feed(np.concatenate([audio, np.full(100, LOUD, dtype=np.float32)]))
    assert starts(events) and not ends(events) and seg.in_speech
    end = seg.flush()
    assert end is not None and end.reason == "flush"
    assert end.audio.size == 25 * WINDOW + 100
    assert window_ids(end.audio) == list(range(25))
    assert end.speech_ms == 20 * WINDOW_MS
    assert not seg.in_speech
    assert seg.flush() is None


def test_flush_when_idle_returns_none_and_drops_pending() -> None:
    seg = Segmenter(ScriptedVad(pattern((SILENCE, 10))))
    assert seg.feed(tagged_audio(10)[:-100]) == []
    assert seg.flush() is None
    assert Segmenter(ScriptedVad([])).flush() is None


def test_flush_drops_an_utterance_below_min_speech() -> None:
    events, seg = run(pattern((SILENCE, 5), (SPEECH, 2)))
    assert starts(events) and seg.in_speech
    assert seg.flush() is None and not seg.in_speech


def test_energy_gate_blocks_quiet_speech() -> None:
    script = pattern((SILENCE, 5), (SPEECH, 30), (SILENCE, 30))
    quiet = tagged_audio(len(script), QUIET)
    events, seg = run(script, audio=quiet)
    assert events == [] and not seg.in_speech
    events, _ = run(script, SegmenterSettings(energy_threshold=0), audio=quiet)
    assert len(ends(events)) == 1


def test_energy_gate_turns_quiet_speech_into_silence_mid_utterance() -> None:
    script = pattern((SILENCE, 5), (SPEECH, 40))
    amps = [LOUD] * 15 + [QUIET] * 30
    events, _ = run(script, audio=tagged_audio(len(script), amps))
    (end,) = ends(events)
    assert end.reason == "silence" and end.speech_ms == 10 * WINDOW_MS


def test_reset_drops_the_utterance_in_progress() -> None:
    _, seg = run(pattern((SILENCE, 5), (SPEECH, 20)))
    assert seg.in_speech and seg.utterance_audio().size > 0
    seg.reset()
    assert not seg.in_speech and seg.flush() is None and seg.utterance_audio().size == 0


def test_update_changes_settings_mid_stream() -> None:
    seg = Segmenter(ScriptedVad(pattern((SILENCE, 5), (SPEECH, 10), (SILENCE, 40))))
    audio = tagged_audio(55)
    events = seg.feed(audio[: 15 * WINDOW])
    seg.update(SegmenterSettings(silence_ms=320))
    events += seg.feed(audio[15 * WINDOW:])
    (end,) = ends(events)
    assert end.at_ms == (15 + 10) * WINDOW_MS


def test_empty_and_sub_window_feeds_give_no_events() -> None:
    seg = Segmenter(ScriptedVad(pattern((SPEECH, 10))))
    assert seg.feed(np.zeros(0, dtype=np.float32)) == []
    assert seg.feed(np.full(WINDOW - 1, LOUD, dtype=np.float32)) == []


def _event_key(e: Event) -> tuple[object, ...]:
    if isinstance(e, UtteranceStart):
        return ("start", e.at_ms)
    return ("end", e.reason, e.at_ms, e.speech_ms, e.audio.tobytes())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_arbitrary_chunk_sizes_give_the_same_events(seed: int) -> None:
    script = pattern((SILENCE, 12), (SPEECH, 25), (SILENCE, 20), (SPEECH, 3), (SILENCE, 20), (SPEECH, 40),
                     (0.4, 10), (SILENCE, 25), (SPEECH, 8))
    settings = SegmenterSettings(max_utterance_s=1.2)
    audio = tagged_audio(len(script))
    whole, seg_whole = run(script, settings)
    rng = np.random.default_rng(seed)
    seg = Segmenter(ScriptedVad(script), settings)
    events: list[Event] = []
    i = 0
    while i < audio.size:
        n = int(rng.integers(1, 3 * WINDOW))
        events += seg.feed(audio[i:i + n])
        i += n
    assert {e.reason for e in ends(whole)} == {"silence", "max_length"}
    assert [_event_key(e) for e in events] == [_event_key(e) for e in whole]
    a, b = seg.flush(), seg_whole.flush()
    assert a is not None and b is not None and np.array_equal(a.audio, b.audio)


def test_one_sample_chunks_give_the_same_events() -> None:
    script = pattern((SILENCE, 12), (SPEECH, 20), (SILENCE, 20))
    whole, _ = run(script)
    tiny, _ = run(script, chunk=1)
    assert len(whole) == 2
    assert [_event_key(e) for e in tiny] == [_event_key(e) for e in whole]


def _feed_windows(seg: Segmenter, data: np.ndarray, start: int, stop: int) -> list[Event]:
    return seg.feed(data[start * WINDOW:stop * WINDOW])


def test_speculative_audio_equals_the_final_when_the_silence_holds() -> None:
    """Once the silence tail is in, pending_final_audio is exactly what the utterance ends with."""
    tail_windows = int(DEFAULT_SETTINGS.tail_ms / WINDOW_MS) + 1
    script = pattern((SILENCE, 5), (SPEECH, 30), (SILENCE, 40))
    data = tagged_audio(len(script))
    seg = Segmenter(ScriptedVad(script), DEFAULT_SETTINGS)
    assert not _feed_windows(seg, data, 0, 35 + tail_windows)[1:]  # only the start so far
    assert seg.in_speech and seg.silence_ms >= DEFAULT_SETTINGS.tail_ms
    key, audio = seg.pending_final_key(), seg.pending_final_audio()
    end = ends(_feed_windows(seg, data, 35 + tail_windows, len(script)))
    assert len(end) == 1 and end[0].key == key
    np.testing.assert_array_equal(end[0].audio, audio)


def test_speech_after_the_speculation_point_changes_the_key() -> None:
    """The caller spoke again: the early transcription must not be used (different key, more audio)."""
    script = pattern((SILENCE, 5), (SPEECH, 30), (SILENCE, 10), (SPEECH, 10), (SILENCE, 40))
    data = tagged_audio(len(script))
    seg = Segmenter(ScriptedVad(script), DEFAULT_SETTINGS)
    _feed_windows(seg, data, 0, 45)
    key, audio = seg.pending_final_key(), seg.pending_final_audio()
    end = ends(_feed_windows(seg, data, 45, len(script)))
    assert len(end) == 1 and end[0].key != key and end[0].audio.size > audio.size
