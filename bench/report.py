"""The benchmark's report: goals, judgement, the table, the notes, the machine block, JSON."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from procs import CLEAN_EXTERNAL_CORES  # noqa: E402

GOALS: dict[str, tuple[str, float]] = {
    "v2fa_p50_ms": ("<=", 1000),
    "v2fa_p95_ms": ("<=", 1500),
    "server_p50_ms": ("<=", 600),
    "loop_lag_p99_ms": ("<", 10),
    "loop_lag_p99_ms_reload": ("<", 10),
    "status_p99_ms_under_llm": ("<", 50),
    "llm_tok_s_ratio_vs_bare": (">=", 0.95),
    "stt_sessions_realtime_max": (">=", 20),
    "port_open_s": ("<", 2),
    "ready_s": ("<", 10),
    "rss_mb_per_idle_connection": ("<", 1),
}


def machine_info(status: dict[str, Any] | None, quick: bool) -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    try:
        llama_version: str | None = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama_version = None
    models: dict[str, Any] | None = None
    if status:
        m = status.get("models", {})
        found: dict[str, Any] = {
            k: {"display": v.get("display"), "path": v.get("path"), "state": v.get("state")}
            for k, v in m.items() if isinstance(v, dict)}
        if "llm" in m:
            found["llm"]["config"] = m["llm"].get("config")
        found["tier"] = status.get("tier")
        models = found
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram, "python": platform.python_version(),
        "platform": platform.platform(), "llama_cpp_python": llama_version, "models": models,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": quick,
        "loadavg_at_start": list(os.getloadavg()),
    }


ALL_KEYS = ("v2fa_p50_ms", "v2fa_p95_ms", "v2fa_samples", "stt_ms", "llm_first_token_ms", "first_audio_ms",
            "endpoint_delay_ms", "server_p50_ms", "loop_lag_p99_ms", "loop_lag_p99_ms_reload",
            "status_p99_ms_under_llm", "status_p50_ms_idle", "llm_tok_s_server", "llm_tok_s_bare",
            "llm_tok_s_ratio_vs_bare", "stt_sessions_realtime_max", "stt_ms_alone", "stt_ms_with_llm",
            "tts_ms_alone", "tts_ms_with_llm", "port_open_s", "ready_s", "rss_mb_idle", "rss_mb_llm_workers",
            "rss_mb_per_idle_connection")


def lag_value(lag: dict[str, Any]) -> float | None:
    """The reported loop-lag p99: its bucket's upper bound (past the last bucket: its lower bound)."""
    if lag.get("upper_inf"):
        return lag.get("lower_ms")
    return lag.get("upper_ms")


def judge(res: dict[str, Any]) -> dict[str, Any]:
    """Each goal, the measured value and whether it is met (None when not measured)."""
    out = {}
    for key, (op, goal) in GOALS.items():
        value = res.get(key)
        met: bool | None
        if value is None:
            met = None
        elif op == "<=":
            met = value <= goal
        elif op == "<":
            met = value < goal
            if key.startswith("loop_lag"):
                # Bucket upper bound: a p99 in the bucket (5, 10] ms is below 10 ms unless exactly 10.
                met = value <= goal
        else:
            met = value >= goal
        out[key] = {"goal": f"{op} {goal:g}", "value": value, "met": met}
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def render_table(res: dict[str, Any]) -> str:
    d = res["details"]
    goals = res["goals"]
    v = d.get("v2fa", {})
    rows: list[tuple[str, Any, Any, Any, Any, str]] = []

    def row(name: str, value: Any, s: dict[str, Any] | None = None, key: str | None = None,
            unit: str = "") -> None:
        g = goals.get(key or name)
        goal = g["goal"] if g else ""
        met = "" if not g else ("yes" if g["met"] else ("n/a" if g["met"] is None else "NO"))
        rows.append((name + (f" [{unit}]" if unit else ""), value, (s or {}).get("p50"), (s or {}).get("p95"),
                     (s or {}).get("n"), f"{goal} {met}".strip()))

    row("v2fa_p50_ms", res.get("v2fa_p50_ms"), v.get("v2fa"))
    row("v2fa_p95_ms", res.get("v2fa_p95_ms"), v.get("v2fa"))
    row("  stt_ms (stt.final)", res.get("stt_ms"), v.get("stt_ms"))
    row("  llm_first_token_ms", res.get("llm_first_token_ms"), v.get("llm_first_token_ms"))
    row("    = stt done -> 1st token", (v.get("llm_ttft_after_stt_ms") or {}).get("p50"),
        v.get("llm_ttft_after_stt_ms"))
    row("    + 1st token -> 1st audio", (v.get("first_token_to_first_audio_ms") or {}).get("p50"),
        v.get("first_token_to_first_audio_ms"))
    row("  first_audio_ms", res.get("first_audio_ms"), v.get("first_audio_ms"))
    row("  endpoint_delay_ms (est.)", res.get("endpoint_delay_ms"), v.get("endpoint_delay_ms"))
    row("server_p50_ms", res.get("server_p50_ms"), v.get("first_audio_ms"))
    lag = d.get("loop_lag_under_llm", {})
    row("loop_lag_p99_ms", res.get("loop_lag_p99_ms"), {"n": lag.get("samples")}, unit="bucket bound")
    rlag = d.get("loop_lag_reload", {}).get("lag", {})
    row("loop_lag_p99_ms_reload", res.get("loop_lag_p99_ms_reload"), {"n": rlag.get("samples")},
        unit="bucket bound")
    row("status_p99_ms_under_llm", res.get("status_p99_ms_under_llm"), d.get("status_under_llm_ms"))
    row("status_p50_ms_idle", res.get("status_p50_ms_idle"), d.get("status_idle_ms"))
    dr = d.get("decode_rate", {})
    row("llm_tok_s_server", res.get("llm_tok_s_server"), {"n": len(dr.get("server_runs", []))})
    row("llm_tok_s_bare", res.get("llm_tok_s_bare"), {"n": len(dr.get("bare_runs", []))})
    row("llm_tok_s_ratio_vs_bare", res.get("llm_tok_s_ratio_vs_bare"))
    ss = d.get("stt_sessions", {})
    row("stt_sessions_realtime_max",
        res.get("stt_sessions_realtime_max") if "skipped" not in ss else "skipped")
    row("stt_ms_alone", res.get("stt_ms_alone"), d.get("stt_alone", {}).get("stt_ms"))
    row("stt_ms_with_llm", res.get("stt_ms_with_llm"), d.get("stt_with_llm", {}).get("stt_ms"))
    row("tts_ms_alone", res.get("tts_ms_alone"), d.get("tts_alone", {}).get("tts_ms"))
    row("tts_ms_with_llm", res.get("tts_ms_with_llm"), d.get("tts_with_llm", {}).get("tts_ms"))
    row("port_open_s", res.get("port_open_s"))
    row("ready_s", res.get("ready_s"))
    row("rss_mb_idle", res.get("rss_mb_idle"))
    row("rss_mb_llm_workers", ", ".join(_fmt(x) for x in res.get("rss_mb_llm_workers") or []) or None)
    row("rss_mb_per_idle_connection", res.get("rss_mb_per_idle_connection"))

    head = ("figure", "value", "p50", "p95", "n", "goal / met")
    cells = [head] + [(r[0], _fmt(r[1], 3 if isinstance(r[1], float) and abs(r[1]) < 10 else 1), _fmt(r[2]),
                       _fmt(r[3]), _fmt(r[4]), r[5]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = []
    m = res.get("machine", {})
    lines.append(f"local-ai-server benchmark ({'quick' if res.get('quick') else 'full'}) - {m.get('date')}")
    lines.append(f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, Python "
                 f"{m.get('python')}, llama-cpp-python {m.get('llama_cpp_python')}, load avg at start "
                 f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start') or [])}")
    models = m.get("models") or {}
    lines.append("models: " + ", ".join(f"{k}={(val or {}).get('display')}" for k, val in models.items()
                                        if isinstance(val, dict)))
    lines.append("")
    for i, c in enumerate(cells):
        lines.append("  ".join(str(x).ljust(widths[j]) if j == 0 else str(x).rjust(widths[j]) if j < 5
                               else str(x) for j, x in enumerate(c)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    if res.get("errors"):
        lines.append("phases that failed (their figures are missing):")
        for e in res["errors"]:
            lines.append(f"  - {e}")
    lines.append("notes:")
    for n in res.get("notes", []):
        lines.append(f"  - {n}")
    return "\n".join(lines)


def add_notes(res: dict[str, Any]) -> None:
    d = res["details"]
    notes = res["notes"]
    lag = d.get("loop_lag_under_llm", {})
    rlag = d.get("loop_lag_reload", {}).get("lag", {})
    notes.append(
        "loop_lag_p99_ms* come from the server's las_event_loop_lag_seconds histogram (buckets 1, 2, 5, "
        "10, 20, 50 ms ...; one observation per 50 ms): the value is the upper bound of the bucket holding "
        f"the p99, so it is coarse. Under LLM: p99 in ({_fmt(lag.get('lower_ms'))}, "
        f"{_fmt(lag.get('upper_ms'))}] ms, "
        f"interpolated {_fmt(lag.get('interp_ms'), 2)} ms, worst bucket {_fmt(lag.get('max_bucket_ms'))} ms, "
        f"{lag.get('samples')} samples. During reload_llm: p99 in ({_fmt(rlag.get('lower_ms'))}, "
        f"{_fmt(rlag.get('upper_ms'))}] ms, {rlag.get('samples')} samples.")
    notes.append("loop_lag_p99_ms and status_p99_ms_under_llm share one window: the status probe ran while "
                 "long streamed llm_requests ran back to back on another connection.")
    v = d.get("v2fa", {})
    notes.append("v2fa: client clock, from the send of the last 20 ms frame holding speech (Piper audio with "
                 "leading/trailing silence trimmed) to the first binary frame; stt_ms/llm_first_token_ms/"
                 "first_audio_ms are server log figures from its end-of-utterance decision; "
                 "endpoint_delay_ms = client v2fa - server first_audio_ms per paired turn "
                 f"({v.get('endpoint_delay_pairs')} pairs; "
                 "it includes the 500 ms segment silence the server waits for).")
    dr = d.get("decode_rate", {})
    notes.append(f"decode rates: median of {dr.get('pairs')} bare/server pairs, alternating which goes "
                 "first (the ratio is "
                 f"the median of the per-pair ratios), first {dr.get('token_cap')} tokens of the "
                 f"same prompt (temperature 0), n_threads={dr.get('threads')}, GOMP_SPINCOUNT=1000 for both; "
                 "server rate from llm_token arrival times at the client, bare from chunk times in-process.")
    if "skipped" in d.get("stt_sessions", {}):
        notes.append("stt_sessions_realtime_max: skipped in --quick (null).")
    else:
        notes.append("stt_sessions_realtime_max: sessions start staggered over 2 s, each streams "
                     "real-time speech; a level passes when every final arrives <= 1.5 s after the end of "
                     "its speech, no error, and las_audio_frames_dropped_total does not move. The client "
                     "runs on the same cores as the server.")
    ext = d.get("external_load_cores") or {}
    notes.append("the benchmark client (and Piper used to make its speech) run on the same machine as the "
                 "server. Cores used by processes outside this benchmark, per phase (noise; 0 = quiet): "
                 + (", ".join(f"{k} {_fmt(v, 2)}" for k, v in ext.items()) or "n/a") + ".")
    dr_from = dr.get("ratio_from")
    if dr_from:
        notes.append(f"llm_tok_s_* and the ratio are medians over {dr_from}; a pair is clean when other "
                     f"work used < {CLEAN_EXTERNAL_CORES} cores during both of its runs.")


def goal_checks(res: dict[str, Any]) -> None:
    res["goals"] = judge(res)


def json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else (("inf" if x > 0 else "-inf") if math.isinf(x) else x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
