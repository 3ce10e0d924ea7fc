"""Figures from samples and scrapes: percentiles, summaries, Prometheus histograms, progress lines."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



_T0 = time.monotonic()


def progress(msg: str) -> None:
    """A progress line on stderr (stdout carries only the table and the JSON)."""
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def pct(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None without samples."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return None
    return float(np.percentile(arr, q))


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def summary(values: list[float], digits: int = 1) -> dict[str, Any]:
    """p50/p95/p99/max and the sample count."""
    return {"p50": rnd(pct(values, 50), digits), "p95": rnd(pct(values, 95), digits),
            "p99": rnd(pct(values, 99), digits), "max": rnd(max(values), digits) if values else None,
            "n": len(values)}


def sample_labels(key: str) -> tuple[str, dict[str, str]]:
    """'name{a="x",b="y"}' -> ('name', {'a': 'x', 'b': 'y'}) (label values hold no quotes or commas here)."""
    name, _, rest = key.partition("{")
    labels = {}
    for part in rest.rstrip("}").split(","):
        k, eq, v = part.partition("=")
        if eq:
            labels[k.strip()] = v.strip().strip('"')
    return name, labels


def histogram_buckets(metrics: dict[str, float], name: str,
                      labels: dict[str, str] | None = None) -> list[tuple[float, float]]:
    """[(le, cumulative count)] of one histogram (the child with `labels`, if given), sorted by le."""
    out = []
    want = labels or {}
    for key, value in metrics.items():
        if not key.startswith(f"{name}_bucket{{"):
            continue
        _, got = sample_labels(key)
        le = got.pop("le", None)
        if le is None or got != want:
            continue
        out.append((math.inf if le == "+Inf" else float(le), value))
    return sorted(out)


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str,
                       q: float, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The q-quantile of the observations between two scrapes: bucket upper bound and interpolation."""
    b = dict(histogram_buckets(before, name, labels))
    a = histogram_buckets(after, name, labels)
    deltas = [(le, cum - b.get(le, 0.0)) for le, cum in a]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return {"upper_ms": None, "lower_ms": None, "interp_ms": None, "samples": 0, "max_bucket_ms": None}
    rank = q * total
    prev_le, prev_cum = 0.0, 0.0
    upper = lower = interp = None
    for le, cum in deltas:
        if cum >= rank:
            upper, lower = le, prev_le
            if math.isinf(le):
                interp = prev_le
            else:
                frac = (rank - prev_cum) / (cum - prev_cum) if cum > prev_cum else 1.0
                interp = prev_le + (le - prev_le) * frac
            break
        prev_le, prev_cum = le, cum
    max_bucket = None
    prev_cum = 0.0
    for le, cum in deltas:
        if cum > prev_cum:
            max_bucket = le
        prev_cum = cum
    return {
        "upper_ms": None if upper is None or math.isinf(upper) else upper * 1000,
        "upper_inf": bool(upper is not None and math.isinf(upper)),
        "lower_ms": None if lower is None else lower * 1000,
        "interp_ms": None if interp is None else round(interp * 1000, 2),
        "samples": int(total),
        "max_bucket_ms": None if max_bucket is None else (math.inf if math.isinf(max_bucket)
                                                            else max_bucket * 1000),
    }
