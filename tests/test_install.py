"""install.sh: the dry run shows the plan, picks safe llama.cpp flags, and changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    venv, models = tmp_path / "venv", tmp_path / "models"
    env = {**os.environ, "LOCAL_VENV": str(venv), "LOCAL_MODELS_DIR": str(models),
           "LOCAL_AI_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "install.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[dry-run]" in out and "Dry run: nothing was changed." in out
    # Never a -march=native build (it crashes on AMX CPUs); exactly the CPU's own ISA flags instead.
    assert "-DGGML_NATIVE=OFF" in out
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "") + " "
    for cpu_flag, cmake in (("avx2", "AVX2"), ("avx512f", "AVX512")):
        state = "ON" if f" {cpu_flag} " in flags else "OFF"
        assert f"-DGGML_{cmake}={state}" in out
    assert "model_setup.py download --tier embedded" in out
    assert not venv.exists() and not models.exists() and not (tmp_path / "cache").exists()


def test_unknown_option_is_refused() -> None:
    proc = subprocess.run(["bash", str(ROOT / "install.sh"), "--frobnicate"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
