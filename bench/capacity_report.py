"""The capacity benchmark's judgement and report: a step's figures, whether it passed, calls per box, the table."""

from __future__ import annotations

import collections
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stats import histogram_quantile, rnd, sample_labels, summary  # noqa: E402

P95_GOAL_MS = 1500.0  # voice-to-first-audio p95 a step must stay within
CLIENT_LATE_MS = 100.0  # a caller whose frames went out later than this: the client, not the server, was short
NOISY_CORES = 0.15  # outside load above this: the step shared the machine with other work


def summarize_step(n: int, callers: Sequence[dict[str, Any]], timed_out: bool = False) -> dict[str, Any]:
    """One step's client-side figures from its callers' records (caller.run_caller's `out`)."""
    turns = [t for c in callers for t in c.get("turns", [])]
    failures = collections.Counter(t["failure"] for t in turns if t.get("failure"))
    if timed_out:
        # A caller still in a turn when the step was cut short never got its answer.
        failures["step_timeout"] += sum(1 for c in callers if not c.get("done"))
    v2fa = [float(t["v2fa_ms"]) for t in turns if t.get("v2fa_ms") is not None]
    done = [t for t in turns if t.get("failure") is None]
    max_late = max((float(c.get("max_late_ms") or 0.0) for c in callers), default=0.0)
    return {
        "callers": n, "turns": len(turns), "turns_ok": len(done), "failed": sum(failures.values()),
        "failures": dict(failures), "v2fa_ms": summary(v2fa),
        "answer_done_ms": summary([float(t["answer_done_ms"]) for t in done]),
        "answer_audio_s": summary([float(t["answer_audio_s"]) for t in done], 2),
        "playback_gaps": sum(int(t.get("gaps") or 0) for t in done),
        "playback_gap_s": rnd(sum(float(t.get("gap_s") or 0.0) for t in done), 2),
        "client_late_frames": sum(int(c.get("late_frames") or 0) for c in callers),
        "client_max_late_ms": rnd(max_late), "client_limited": max_late > CLIENT_LATE_MS,
        "timed_out": timed_out,
    }


WAIT = "las_queue_wait_seconds"
FIRST_TOKEN = "las_llm_backend_first_token_seconds"


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _labelled_deltas(before: dict[str, float], after: dict[str, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in after:
        metric, labels = sample_labels(key)
        if metric == name and label in labels:
            d = _delta(before, after, key)
            if d:
                out[labels[label]] = d
    return out


def histogram_figures(before: dict[str, float], after: dict[str, float], name: str,
                      labels: dict[str, str]) -> dict[str, Any]:
    """Count, mean, p50 and p95 (interpolated in the buckets) of one histogram child between two scrapes."""
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    count = _delta(before, after, f"{name}_count{{{sel}}}")
    total = _delta(before, after, f"{name}_sum{{{sel}}}")
    p50 = histogram_quantile(before, after, name, 0.5, labels)
    p95 = histogram_quantile(before, after, name, 0.95, labels)
    return {"count": int(count), "mean_ms": rnd(total / count * 1000) if count else None,
            "p50_ms": p50["interp_ms"], "p95_ms": p95["interp_ms"], "p95_bucket_ms": p95["upper_ms"]}


def server_figures(before: dict[str, float], after: dict[str, float], backend: str) -> dict[str, Any]:
    """What the server counted during a step (two /metrics scrapes): queue waits per stage, errors, drops."""
    return {
        "queue_wait": {st: histogram_figures(before, after, WAIT, {"stage": st}) for st in ("stt", "llm", "tts")},
        "llm_first_token": histogram_figures(before, after, FIRST_TOKEN, {"backend": backend}),
        "errors": _labelled_deltas(before, after, "las_errors_total", "code"),
        "speculative_turns": _labelled_deltas(before, after, "las_speculative_turns_total", "outcome"),
        "audio_frames_dropped": int(_delta(before, after, "las_audio_frames_dropped_total")),
    }


def turn_stages(events: Sequence[dict[str, Any]], call_prefix: str) -> dict[str, Any]:
    """The server's own timings of the step's voice turns (turn.done), from the end of each utterance."""
    done = [e for e in events if e.get("event") == "turn.done" and e.get("kind") == "voice"
            and str(e.get("call_id", "")).startswith(call_prefix)]

    def of(key: str) -> dict[str, Any]:
        return summary([float(e[key]) for e in done if e.get(key) is not None])

    return {"turns": len(done), "speculative": sum(1 for e in done if e.get("speculative")),
            "stt_ms": of("stt_ms"), "llm_first_token_ms": of("llm_first_token_ms"),
            "first_audio_ms": of("first_audio_ms")}


def step_passes(step: dict[str, Any], goal_ms: float = P95_GOAL_MS) -> bool:
    """A step holds its N callers when no turn failed and first audio p95 is within the goal."""
    p95 = step.get("v2fa_ms", {}).get("p95")
    return bool(step.get("turns_ok")) and not step.get("failed") and p95 is not None and p95 <= goal_ms


def calls_per_box(steps: Sequence[dict[str, Any]], goal_ms: float = P95_GOAL_MS) -> dict[str, Any]:
    """The highest N that passed, every smaller step having passed too (steps in ramp order).

    A step that passes above a failed one (noise, or a lucky schedule) does not raise the figure; it is listed
    in `passed_above_failure` so the reader sees it.
    """
    best = 0
    first_failure: int | None = None
    above: list[int] = []
    for s in steps:
        ok = step_passes(s, goal_ms)
        if first_failure is None:
            if ok:
                best = max(best, int(s["callers"]))
            else:
                first_failure = int(s["callers"])
        elif ok:
            above.append(int(s["callers"]))
    return {"calls_per_box": best, "first_failing_step": first_failure, "passed_above_failure": above,
            "goal": f"first-audio p95 <= {goal_ms:g} ms and no failed turn"}


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.0f}"


def _wait(step: dict[str, Any], stage: str) -> str:
    w = step.get("server", {}).get("queue_wait", {}).get(stage) or {}
    return "-" if not w.get("count") else f"{_ms(w.get('p95_ms'))}"


def _cores(step: dict[str, Any], key: str) -> str:
    v = step.get("cpu", {}).get(key)
    return "-" if v is None else f"{v:.2f}"


def render_table(res: dict[str, Any]) -> str:
    """Every step of every backend, then the verdicts and the remote decode ratio."""
    head = (f"{'backend':15s} {'N':>3s} {'turns':>7s} {'failed':>6s} {'v2fa p50':>8s} {'p95':>6s} {'pass':>4s} "
            f"{'wait p95 ms stt/llm/tts':>23s} {'1st tok':>7s} {'cores srv/llm/eng':>17s} {'client':>6s} "
            f"{'outside':>7s}")
    lines = ["capacity: full-mode callers that speak, listen to the whole answer, pause and speak again",
             "v2fa = end of the caller's speech -> first audio frame (ms); wait = time queued for an STT thread, "
             "an LLM worker (remote: a slot of ours;", "the engine's own queue is inside '1st tok', submit -> first "
             "token p95) and a TTS thread; cores = server main / LLM workers / engine", "", head, "-" * len(head)]
    for name, b in res.get("backends", {}).items():
        for s in b.get("steps", []):
            waits = "/".join(_wait(s, st) for st in ("stt", "llm", "tts"))
            cores = "/".join(_cores(s, k) for k in ("server_main", "llm_workers", "engine"))
            first = s.get("server", {}).get("llm_first_token", {}).get("p95_ms")
            flags = (" client-late" if s.get("client_limited") else "") + (
                " noisy" if (s.get("cpu", {}).get("outside") or 0) > NOISY_CORES else "")
            lines.append(f"{name:15s} {s['callers']:>3d} {s['turns_ok']:>3d}/{s['turns']:<3d} {s['failed']:>6d} "
                         f"{_ms(s['v2fa_ms']['p50']):>8s} {_ms(s['v2fa_ms']['p95']):>6s} "
                         f"{'yes' if s.get('passed') else 'NO':>4s} {waits:>23s} {_ms(first):>7s} {cores:>17s} "
                         f"{_cores(s, 'client'):>6s} {_cores(s, 'outside'):>7s}{flags}")
            if s.get("failures"):
                lines.append(f"{'':20s}failures: {s['failures']}")
        if b.get("error"):
            lines.append(f"{name:15s} FAILED: {b['error']}")
    lines.append("")
    for name, b in res.get("backends", {}).items():
        v = b.get("verdict")
        if v:
            extra = f" (first failing step: {v['first_failing_step']})" if v.get("first_failing_step") else ""
            extra += f"; passed above it: {v['passed_above_failure']}" if v.get("passed_above_failure") else ""
            lines.append(f"calls per box, {name}: {v['calls_per_box']}{extra}  [{v['goal']}]")
    d = res.get("remote_decode")
    if d and d.get("ratio") is not None:
        lines.append(f"remote decode through our server / straight to the engine: {d['ratio']:.3f} "
                     f"(median over {d.get('ratio_from')} of {d['pairs']} alternating, {d['token_cap']} tokens; "
                     f"runs that ended short: {d.get('short_runs')}; goal >= 0.95: "
                     f"{'met' if d['ratio'] >= 0.95 else 'NOT met'}); server {d.get('server_tok_s')} tok/s, "
                     f"direct {d.get('direct_tok_s')} tok/s")
    m = res.get("machine", {})
    lines.append(f"machine: {m.get('cpu')}, {m.get('cores')} cores; load average at start "
                 f"{m.get('loadavg_at_start')}; outside load over the run {res.get('outside_load_cores')} cores")
    lines.append("flags: client-late = a caller's frames went out > 100 ms late (the machine starved the client); "
                 f"noisy = outside load > {NOISY_CORES} cores")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)
