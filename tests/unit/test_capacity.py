"""bench/capacity.py's pure parts: the callers' schedule, the playback clock, a step's verdict, the scrapes."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.paths import REPO

sys.path.append(str(REPO / "bench"))  # the bench scripts import each other by module name (appended: shadows nothing)
from caller import GAP_S, PAUSE_S, audio_chunks, audio_seconds, plan_callers, playback  # noqa: E402
from capacity_report import (  # noqa: E402
    calls_per_box,
    server_figures,
    step_passes,
    summarize_step,
    turn_stages,
)
from procs import split_cores  # noqa: E402
from stats import histogram_buckets, sample_labels  # noqa: E402

SENTENCES = [f"sentence {i}" for i in range(16)]


# ---------------------------------------------------------------- the callers' schedule


def test_the_schedule_is_fixed_by_the_seed_and_differs_between_callers() -> None:
    a = plan_callers(4, 7, SENTENCES, turns=5, spread_s=4.0)
    assert a == plan_callers(4, 7, SENTENCES, turns=5, spread_s=4.0)  # reproducible
    assert a != plan_callers(4, 8, SENTENCES, turns=5, spread_s=4.0)  # another seed, another schedule
    assert [p.index for p in a] == [0, 1, 2, 3]
    assert len({p.sentences for p in a}) == 4 and len({p.offset_s for p in a}) == 4
    assert len({p.seed for p in a}) == 4  # each line has its own noise
    for p in a:
        assert 0.0 <= p.offset_s < 4.0
        assert len(p.sentences) == len(p.pauses_s) == 5
        assert len(set(p.sentences)) == 5  # no sentence twice before all were said
        assert set(p.sentences) <= set(SENTENCES)
        assert all(PAUSE_S[0] <= s <= PAUSE_S[1] for s in p.pauses_s)


def test_a_caller_keeps_its_schedule_whatever_the_step_size() -> None:
    """Caller i of a step is planned from (seed, n, i): a bigger step is not a prefix of a smaller one's
    schedule, but the same step is the same on both backends."""
    local, remote = plan_callers(8, 1, SENTENCES, 3, 4.0), plan_callers(8, 1, SENTENCES, 3, 4.0)
    assert local == remote
    assert plan_callers(2, 1, SENTENCES, 3, 4.0)[0] != local[0]


def test_more_turns_than_sentences_cycle_through_them_and_no_spread_starts_at_once() -> None:
    (p,) = plan_callers(1, 3, SENTENCES[:3], turns=7, spread_s=0.0)
    assert p.offset_s == 0.0
    assert p.sentences[:3] == p.sentences[3:6] and p.sentences[6] == p.sentences[0]
    assert sorted(p.sentences[:3]) == sorted(SENTENCES[:3])
    with pytest.raises(ValueError):
        plan_callers(1, 3, [], turns=1, spread_s=0.0)


# ---------------------------------------------------------------- the playback clock


def test_audio_seconds_per_encoding() -> None:
    assert audio_seconds(8000, "mulaw", 8000) == 1.0
    assert audio_seconds(32000, "linear16", 16000) == 1.0
    assert audio_seconds(100, "mulaw", 0) == 0.0


def test_chunks_play_back_to_back_and_a_late_one_is_a_gap() -> None:
    # Arrives at 10, plays 2 s; the second is there before the first ends (no gap); the third comes late.
    end, gaps = playback([(10.0, 2.0), (11.0, 1.5), (15.0, 1.0)])
    assert end == 16.0
    assert gaps == [pytest.approx(1.5)]
    assert playback([]) == (None, [])
    # A chunk just after the previous one ended is not heard as a gap.
    assert playback([(0.0, 1.0), (1.0 + GAP_S / 2, 1.0)])[1] == []


def test_audio_chunks_take_their_format_from_the_header_before_them() -> None:
    items: list[tuple[float, str, Any]] = [
        (1.0, "json", {"type": "stt_result", "is_final": True, "text": "hi"}),
        (2.0, "json", {"type": "tts_audio", "encoding": "mulaw", "sample_rate_hz": 8000}),
        (2.1, "bin", 4000),
        (3.0, "json", {"type": "tts_audio", "encoding": "linear16", "sample_rate_hz": 16000}),
        (3.1, "bin", 64000),
        (3.2, "json", {"type": "llm_response", "text": "hello"}),
    ]
    assert audio_chunks(items) == [(2.1, 0.5), (3.1, 2.0)]


# ---------------------------------------------------------------- a step and the verdict


def turn(v2fa: float | None, failure: str | None = None) -> dict[str, Any]:
    t: dict[str, Any] = {"failure": failure, "v2fa_ms": v2fa}
    if failure is None:
        t.update(answer_done_ms=2000.0, answer_audio_s=3.0, gaps=0, gap_s=0.0)
    return t


def step(n: int, v2fas: list[float], failures: int = 0) -> dict[str, Any]:
    callers = [{"turns": [turn(v) for v in v2fas] + [turn(None, "no_answer")] * failures, "done": True,
                "late_frames": 0, "max_late_ms": 5.0}]
    s = summarize_step(n, callers)
    s["passed"] = step_passes(s)
    return s


def test_a_step_passes_only_without_failures_and_within_the_p95_goal() -> None:
    assert step_passes(step(1, [800.0, 900.0, 1000.0]))
    assert not step_passes(step(2, [800.0, 900.0, 1000.0], failures=1))  # one failed turn fails the step
    assert not step_passes(step(4, [800.0, 900.0, 2500.0]))  # p95 over 1500 ms
    assert not step_passes(summarize_step(8, []))  # nothing measured is no pass


def test_summarize_counts_failures_by_kind_and_flags_a_late_client() -> None:
    callers: list[dict[str, Any]] = [
        {"turns": [turn(700.0), turn(None, "no_final")], "done": True, "late_frames": 3, "max_late_ms": 150.0},
               {"turns": [turn(900.0, "error:busy")], "done": True, "late_frames": 0, "max_late_ms": 2.0},
               {"turns": [turn(800.0)]}]  # still in its call when the step was cut short
    s = summarize_step(3, callers, timed_out=True)
    assert s["turns"] == 4 and s["turns_ok"] == 2 and s["failed"] == 3
    assert s["failures"] == {"no_final": 1, "error:busy": 1, "step_timeout": 1}
    assert s["v2fa_ms"]["n"] == 3  # a turn whose audio came but which failed later still has its first audio
    assert s["client_limited"] is True and s["client_late_frames"] == 3


def test_calls_per_box_is_the_last_step_before_the_first_failure() -> None:
    steps = [step(1, [700.0]), step(2, [800.0]), step(4, [900.0], failures=1), step(8, [900.0])]
    v = calls_per_box(steps)
    assert v["calls_per_box"] == 2 and v["first_failing_step"] == 4
    assert v["passed_above_failure"] == [8]  # listed, not counted
    assert calls_per_box([step(1, [2000.0])])["calls_per_box"] == 0
    assert calls_per_box([step(1, [700.0]), step(2, [700.0])]) == {
        "calls_per_box": 2, "first_failing_step": None, "passed_above_failure": [],
        "goal": "first-audio p95 <= 1500 ms and no failed turn"}


# ---------------------------------------------------------------- what the server counted


def scrape(wait_stt: list[float], errors: float) -> dict[str, float]:
    """A /metrics scrape (parse_metrics' keys) with STT waits in buckets 0.01 / 0.1 / +Inf."""
    les = ["0.01", "0.1", "+Inf"]
    out = {f'las_queue_wait_seconds_bucket{{le="{le}",stage="stt"}}': c for le, c in zip(les, wait_stt)}
    out['las_queue_wait_seconds_count{stage="stt"}'] = wait_stt[-1]
    out['las_queue_wait_seconds_sum{stage="stt"}'] = 0.05 * wait_stt[-1]
    out['las_queue_wait_seconds_bucket{le="0.01",stage="llm"}'] = 5.0
    out['las_errors_total{code="busy"}'] = errors
    return out


def test_labelled_histogram_buckets_and_labels_are_read_from_a_scrape() -> None:
    assert sample_labels('x_bucket{le="0.1",stage="stt"}') == ("x_bucket", {"le": "0.1", "stage": "stt"})
    assert sample_labels("plain") == ("plain", {})
    s = scrape([1.0, 3.0, 4.0], 0.0)
    assert histogram_buckets(s, "las_queue_wait_seconds", {"stage": "stt"}) == [
        (0.01, 1.0), (0.1, 3.0), (float("inf"), 4.0)]
    assert histogram_buckets(s, "las_queue_wait_seconds", {"stage": "tts"}) == []


def test_server_figures_are_the_difference_between_two_scrapes() -> None:
    before, after = scrape([1.0, 1.0, 1.0], 1.0), scrape([1.0, 5.0, 5.0], 3.0)
    f = server_figures(before, after, "local")
    stt = f["queue_wait"]["stt"]
    assert stt["count"] == 4 and stt["mean_ms"] == 50.0
    assert 10.0 <= stt["p50_ms"] <= stt["p95_ms"] <= 100.0  # all four new waits fell in (10, 100] ms
    assert f["queue_wait"]["llm"]["count"] == 0 and f["queue_wait"]["llm"]["p95_ms"] is None
    assert f["errors"] == {"busy": 2.0} and f["audio_frames_dropped"] == 0


def test_turn_stages_keep_the_steps_own_voice_turns() -> None:
    events = [{"event": "turn.done", "kind": "voice", "call_id": "cap-local-n2-0", "stt_ms": 0.0,
               "llm_first_token_ms": -20.0, "first_audio_ms": 300.0, "speculative": True},
              {"event": "turn.done", "kind": "voice", "call_id": "cap-local-n1-0", "first_audio_ms": 900.0},
              {"event": "turn.done", "kind": "llm_request", "call_id": "cap-local-n2-1", "first_audio_ms": 1.0}]
    s = turn_stages(events, "cap-local-n2-")
    assert s["turns"] == 1 and s["speculative"] == 1 and s["first_audio_ms"]["p50"] == 300.0


# ---------------------------------------------------------------- CPU


def test_cores_are_split_by_process_group_and_the_rest_is_outside_load() -> None:
    before = {1: 10.0, 2: 5.0, 3: 0.0, 4: 1.0}
    after = {1: 12.0, 2: 9.0, 3: 1.0, 4: 1.5, 5: 0.5}  # pid 5 started during the window
    cores = split_cores(before, after, {"server_main": {1}, "llm_workers": {2, 5}, "client": {3}}, 10.0, 4.0)
    assert cores == {"server_main": 0.5, "llm_workers": 1.125, "client": 0.25, "other_own": 0.125,
                     "outside": 0.5}
    assert split_cores({}, {}, {"a": set()}, None, 0.0) == {"a": None, "other_own": None, "outside": None}
