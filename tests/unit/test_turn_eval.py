"""bench/turn_eval.py's pure parts: where a pause is cut in, and how a mode's records are counted."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from tests.paths import REPO

sys.path.append(str(REPO / "bench"))  # the bench scripts import each other by module name (appended: shadows nothing)
from turn_eval import _quiet_point, report  # noqa: E402

pytestmark = pytest.mark.unit


def test_the_pause_goes_into_the_quietest_spot_near_the_prefix_end() -> None:
    x = np.ones(16000, dtype=np.float32)
    x[8800:9200] = 0.0  # a gap between two words, 50 ms after where the prefix alone ends
    at = _quiet_point(x, 8000)
    assert 8800 <= at <= 9200 - 320  # a whole 20 ms window inside the gap
    assert _quiet_point(x, 2000) != at  # too far from the gap: the best spot near 2000 instead


def rec(kind: str, cut: bool, endpoint: float | None = None, audio: float | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"kind": kind, "false_endpoint": cut}
    if endpoint is not None:
        r["endpoint_ms"] = endpoint
    if audio is not None:
        r["first_audio_ms"] = audio
    return r


def test_false_endpoints_are_counted_on_the_paused_clips_and_delays_only_where_not_cut() -> None:
    records = [
        rec("question", False, 500, 900), rec("question", False, 1500, 2000),
        rec("paused", True, 300, 50), rec("paused", False, 700, 1100),
        rec("statement", False, 600, 1000), rec("um", True, 400),
    ]
    r = report("vad", records, late_ms=900)
    assert (r["false_endpoints_paused"], r["paused_clips"], r["false_endpoint_pct_paused"]) == (2, 3, 66.7)
    assert r["false_endpoints_whole"] == 0
    # The cut clips' delays (to the final of the part after the pause) are not endpoint delays.
    assert r["endpoint_ms"]["n"] == 4 and r["endpoint_ms"]["max"] == 1500
    assert r["late_endpoints"] == 1
    assert r["first_audio_ms"]["n"] == 4
    assert r["by_kind"]["um"] == {"clips": 1, "false_endpoints": 1, "endpoint_ms": r["by_kind"]["um"]["endpoint_ms"]}
    assert r["by_kind"]["um"]["endpoint_ms"]["n"] == 0
