"""bench/peers.py's judgement: ours / theirs for each figure, the goals, the markdown table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from peers_report import ModeResult, Report

ALONE = "ours alone"
WITH_LLM = "ours with an LLM generating"


@dataclass
class Row:
    """One figure: ours against theirs, and whether the goal is met (None: no goal, or no figure)."""

    metric: str
    run: str  # ALONE or WITH_LLM (theirs always ran alone: the reference servers have no LLM to share)
    theirs_name: str
    unit: str  # "ms", "wer" or "x"
    ours: float | None
    theirs: float | None
    ratio: float | None
    goal: str
    met: bool | None


def mode_of(report: Report | None, port: int, mode: str) -> ModeResult | None:
    """A server's figures in one mode, None where it did not run (or failed every measurement)."""
    server = report.by_port(port) if report is not None else None
    m = server.modes.get(mode) if server is not None else None
    return m if m is not None and m.ok > 0 else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None:
        return None
    if theirs == 0:
        return 1.0 if ours == 0 else None
    return ours / theirs


def stt_latency(m: ModeResult) -> float | None:
    # wyoming-bench's Total: from sending `transcribe` to the `transcript`. The audio goes out as fast as
    # the socket takes it (no chunk delay), so this is the wait after `audio-stop` plus a few ms of sending.
    return m.total_ms.mean if m.total_ms else None


def stt_wer(m: ModeResult) -> float | None:
    return m.wer_exact


def tts_ttft(m: ModeResult) -> float | None:
    return m.ttft_ms.mean if m.ttft_ms else None


def tts_total(m: ModeResult) -> float | None:
    return m.total_ms.mean if m.total_ms else None


def tts_rtf(m: ModeResult) -> float | None:
    # Mean total time over mean audio length: the printed RTF has two decimals, too coarse for a ratio.
    if m.total_ms is None or m.total_ms.mean is None or not m.audio_s:
        return None
    return m.total_ms.mean / 1000.0 / m.audio_s


Getter = Callable[[ModeResult], "float | None"]


def _pair(get: Getter, ours: ModeResult | None, theirs: ModeResult | None) -> tuple[float | None, float | None]:
    return (get(ours) if ours else None), (get(theirs) if theirs else None)


def build_rows(stt: Report | None, tts: Report | None, stt_bg: Report | None, tts_bg: Report | None, *,
               ours_port: int, whisper: dict[str, int], piper: tuple[str, int]) -> list[Row]:
    """Every figure of the table. `whisper`: reference name -> port (as shipped, beam 1); `piper`: (name, port)."""
    rows: list[Row] = []
    runs = ((ALONE, stt, tts), (WITH_LLM, stt_bg, tts_bg))
    for name, port in whisper.items():
        theirs = mode_of(stt, port, "non_streaming")
        for run, stt_run, _ in runs:
            if stt_run is None:
                continue
            ours = mode_of(stt_run, ours_port, "non_streaming")
            o, t = _pair(stt_latency, ours, theirs)
            ow, tw = _pair(stt_wer, ours, theirs)
            r = ratio(o, t)
            # "At equal WER": faster only counts if it transcribes at least as well.
            met = None if r is None or ow is None or tw is None else (r <= 1.0 and ow <= tw)
            rows.append(Row("STT audio-stop -> transcript, mean", run, name, "ms", o, t, r,
                            "<= 1.0 at equal WER", met))
            rows.append(Row("STT WER (pooled, wyoming-bench normalisation)", run, name, "wer", ow, tw,
                            ratio(ow, tw), "ours <= theirs", None if ow is None or tw is None else ow <= tw))
    piper_name, piper_port = piper
    for mode in ("non_streaming", "streaming"):
        theirs = mode_of(tts, piper_port, mode)
        label = mode.replace("_", "-")
        for metric, get, unit in ((f"TTS first audio, {label}, mean", tts_ttft, "ms"),
                                  (f"TTS total, {label}, mean", tts_total, "ms"),
                                  (f"TTS RTF, {label} (mean total / mean audio)", tts_rtf, "x")):
            for run, _, tts_run in runs:
                if tts_run is None:
                    continue
                o, t = _pair(get, mode_of(tts_run, ours_port, mode), theirs)
                r = ratio(o, t)
                goal, met = "", None
                if get is tts_ttft and mode == "streaming":
                    goal, met = "<= 0.5", (None if r is None else r <= 0.5)
                rows.append(Row(metric, run, piper_name, unit, o, t, r, goal, met))
    return rows


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "wer":
        return f"{value * 100:.2f} %"
    return f"{value:.3f}"


def markdown(rows: list[Row]) -> str:
    """The table: metric, ours, theirs, ratio ours/theirs, goal, met."""
    lines = ["| metric | ours | theirs | ratio ours/theirs | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        metric = f"{r.metric} (vs {r.theirs_name}; {r.run})"
        met = "" if not r.goal else ("n/a" if r.met is None else ("yes" if r.met else "NO"))
        ratio_s = "n/a" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {metric} | {_fmt(r.ours, r.unit)} | {_fmt(r.theirs, r.unit)} | {ratio_s} | {r.goal} | "
                     f"{met} |")
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
