"""Static checks in the suite: every module type-checks (mypy) and lints clean (ruff)."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO

ROOT = REPO
CHECKED = ["local_ai_server", "tests", "bench", "scripts", "model_setup.py"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """A module of this interpreter's environment, from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy() -> None:
    out = run("mypy", "--cache-dir", "/dev/null", *CHECKED)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff() -> None:
    out = run("ruff", "check", "--no-cache", *CHECKED)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
