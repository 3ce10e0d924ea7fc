"""bench/peers_report.py against wyoming-bench's recorded output, and bench/peers_table.py's ratios and goals."""

from __future__ import annotations

import sys

import pytest

from tests.paths import FIXTURES, REPO

sys.path.append(str(REPO / "bench"))  # the bench scripts import each other by module name (appended: shadows nothing)

from peers_report import Report, parse_report  # noqa: E402
from peers_table import ALONE, WITH_LLM, build_rows, markdown  # noqa: E402

pytestmark = pytest.mark.unit

RECORDED = FIXTURES / "wyoming_bench"  # real runs of wyoming-bench 2026.10.0 by bench/peers.py
OURS, SHIPPED, BEAM1, PIPER = 55851, 48225, 44315, 55239


def load(name: str) -> Report:
    return parse_report((RECORDED / name).read_text(encoding="utf-8"))


def test_stt_report_gives_every_server_its_figures() -> None:
    rep = load("stt.txt")
    assert (rep.version, rep.task, rep.rounds, rep.warmup) == ("2026.10.0", "stt", 3, 1)
    assert [(s.port, s.program) for s in rep.servers.values()] == [
        (OURS, "local-ai-server"), (SHIPPED, "faster-whisper"), (BEAM1, "faster-whisper")]
    ours = rep.by_port(OURS)
    assert ours is not None and ours.label == "127.0.0.1:55851 (local-ai-server)"
    m = ours.modes["non_streaming"]
    assert (m.ok, m.fail) == (12, 0)
    assert m.total_ms is not None and m.ttft_ms is not None and m.rtf is not None
    assert (m.total_ms.min, m.total_ms.mean, m.total_ms.median, m.total_ms.p95, m.total_ms.max) == (
        154.1, 346.5, 295.2, 696.3, 788.1)
    assert m.ttft_ms.mean == 346.4 and m.rtf.max == 0.07
    assert m.audio_s == 7.08 and m.audio_bytes is None
    assert (m.sub, m.ins, m.dels, m.ref_words) == (15, 0, 0, 237)
    assert m.wer == pytest.approx(0.063) and m.wer_exact == pytest.approx(15 / 237)
    assert m.cer == pytest.approx(0.034) and m.sar == pytest.approx(0.25)
    theirs = rep.by_port(SHIPPED)
    assert theirs is not None
    t = theirs.modes["non_streaming"]
    assert t.ttft_ms is None  # the reference sends no transcript-chunk: no TTFT row
    assert t.total_ms is not None and t.total_ms.mean == 1343.3
    assert t.wer_exact == pytest.approx(9 / 237)
    assert rep.by_port(1) is None


def test_stt_summary_rows_are_parsed_by_column() -> None:
    rep = load("stt.txt")
    rows = rep.summary["non_streaming"]
    assert list(rows) == ["127.0.0.1:44315 (faster-whisper)", "127.0.0.1:48225 (faster-whisper)",
                          "127.0.0.1:55851 (local-ai-server)"]
    ours = rows["127.0.0.1:55851 (local-ai-server)"]
    assert ours["WER"] == pytest.approx(0.063) and ours["Total_mean"] == 346.5 and ours["TTFT_p95"] == 696.2
    assert rows["127.0.0.1:44315 (faster-whisper)"]["TTFT_p95"] is None  # printed n/a


def test_a_skipped_mode_is_a_note_on_its_server_and_n_a_in_the_summary() -> None:
    rep = load("stt-both-modes.txt")  # an earlier real run: both modes, one reference server
    ours, theirs = rep.by_port(10410), rep.by_port(10310)
    assert ours is not None and theirs is not None
    assert set(ours.modes) == {"non_streaming", "streaming"} and set(theirs.modes) == {"non_streaming"}
    assert len(theirs.notes) == 1 and "NOT SUPPORTED by 127.0.0.1:10310" in theirs.notes[0]
    assert ours.notes == [] and rep.notes == theirs.notes
    row = rep.summary["streaming"]["127.0.0.1:10310 (faster-whisper)"]
    assert row["ok"] == 0 and row["WER"] is None and row["Total_mean"] is None


def test_tts_report_has_both_modes_audio_and_normalised_rtf() -> None:
    rep = load("tts.txt")
    assert (rep.task, rep.rounds) == ("tts", 3)
    piper = rep.by_port(PIPER)
    assert piper is not None and piper.program == "piper"
    s = piper.modes["streaming"]
    assert s.ttft_ms is not None and s.total_ms is not None
    assert (s.ttft_ms.mean, s.total_ms.mean, s.audio_s, s.audio_bytes) == (249.7, 738.5, 9.85, 434560.0)
    assert s.wer is None and s.wer_exact is None
    assert rep.summary["non_streaming"]["127.0.0.1:55851 (local-ai-server)"]["RTF_norm"] == 0.19
    assert rep.summary["streaming"]["127.0.0.1:55239 (piper)"]["audio_dur"] == 9.85
    as_json = rep.as_dict()
    assert as_json["servers"]["127.0.0.1:55239 (piper)"]["modes"]["streaming"]["ttft_ms"]["p95"] == 459.5


def test_rows_are_ours_over_theirs_with_the_goals() -> None:
    stt, tts, tts_bg = load("stt.txt"), load("tts.txt"), load("tts-ours-only.txt")
    rows = build_rows(stt, tts, None, tts_bg, ours_port=OURS, whisper={"fw": SHIPPED, "fw1": BEAM1},
                      piper=("piper", PIPER))
    by = {(r.metric, r.run, r.theirs_name): r for r in rows}
    latency = by[("STT audio-stop -> transcript, mean", ALONE, "fw")]
    assert (latency.ours, latency.theirs) == (346.5, 1343.3)
    assert latency.ratio == pytest.approx(346.5 / 1343.3)
    assert latency.met is False  # faster, but not at equal WER (15 errors against 9)
    assert by[("STT WER (pooled, wyoming-bench normalisation)", ALONE, "fw1")].ratio == pytest.approx(15 / 9)
    assert not [r for r in rows if r.metric.startswith("STT") and r.run == WITH_LLM]  # no STT second run given
    first = by[("TTS first audio, streaming, mean", ALONE, "piper")]
    assert first.ratio == pytest.approx(542.0 / 249.7) and first.goal == "<= 0.5" and first.met is False
    loaded = by[("TTS first audio, streaming, mean", WITH_LLM, "piper")]
    assert loaded.ours == 469.2 and loaded.theirs == 249.7  # theirs always from the first run
    rtf = by[("TTS RTF, non-streaming (mean total / mean audio)", ALONE, "piper")]
    assert rtf.ours == pytest.approx(1.8386 / 9.65) and rtf.goal == "" and rtf.met is None
    table = markdown(rows)
    assert table.splitlines()[0] == "| metric | ours | theirs | ratio ours/theirs | goal | met |"
    assert "| 346.5 ms | 1343.3 ms | 0.26 | <= 1.0 at equal WER | NO |" in table


def test_unreadable_output_gives_an_empty_report_not_an_error() -> None:
    rep = parse_report("Traceback (most recent call last):\n  File x\nConnectionRefusedError: [Errno 111]\n")
    assert rep.servers == {} and rep.summary == {} and rep.version is None
    rows = build_rows(rep, rep, None, None, ours_port=1, whisper={"fw": 2}, piper=("piper", 3))
    assert all(r.ours is None and r.theirs is None and r.ratio is None and r.met is None for r in rows)
