"""A short soak (the CI version of bench/soak.py): sessions doing full turns leak no descriptors or memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_two_minute_soak(models_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "2", "--sessions", "4", "--warmup-s", "40",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["server_exit_code"] == 0
    assert res["turns_measured"] >= 8, res
    assert not res["errors"] and res["error_replies"] == 0, res
    # Descriptors must come back to where they were once every caller has hung up.
    assert res["fd_growth"] <= 0, res
    # The goal (< 5 %) is judged by the 30-minute bench; two minutes only catch a gross leak.
    assert res["rss_growth_pct"] < 15, res
