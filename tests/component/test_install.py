"""install.sh: option parsing, the dry run (it plans but changes nothing), and the llama.cpp backend chosen
from the GPU tools present (recorded nvidia-smi / rocm-smi outputs played back by stand-in commands)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.paths import INSTALLER_FIXTURES as FIXTURES
from tests.paths import REPO as ROOT


def install(args: list[str], tmp_path: Path, *, venv: Path | None = None, path_prefix: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run install.sh with its venv, models and cache redirected into tmp_path."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_")}
    full |= {"LOCAL_VENV": str(venv or tmp_path / "venv"), "LOCAL_MODELS_DIR": str(tmp_path / "models"),
             "LOCAL_AI_CACHE": str(tmp_path / "cache")}
    if path_prefix is not None:
        full["PATH"] = f"{path_prefix}:{full['PATH']}"
    full |= env or {}
    return subprocess.run(["bash", str(ROOT / "install.sh"), *args], env=full, capture_output=True, text=True,
                          timeout=180, check=False)


def fake_tool(bindir: Path, name: str, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text("#!/usr/bin/env bash\n" + script)
    tool.chmod(0o755)


def nvidia(bindir: Path, *, nvcc: bool) -> None:
    """A stand-in nvidia-smi answering as the recorded RTX 4090 box does (and nvcc if asked)."""
    recorded = (FIXTURES / "ryzen-7950x-rtx4090" / "nvidia-smi").read_text()
    fake_tool(bindir, "nvidia-smi", f"""
if [[ "$1" == -L ]]; then echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0)"; exit 0; fi
cat <<'EOF'
{recorded.rstrip()}
EOF
""")
    if nvcc:
        fake_tool(bindir, "nvcc", 'echo "Cuda compilation tools, release 12.4"\n')


def nvcc_env(bindir: Path, *, nvcc: bool) -> dict[str, str]:
    # CUDACXX names the CUDA compiler (CMake reads it too); pointing it nowhere hides a real toolkit on
    # this machine, which has nvcc but no GPU.
    return {"CUDACXX": str(bindir / "nvcc") if nvcc else str(bindir / "no-nvcc")}


def assert_changed_nothing(tmp_path: Path) -> None:
    for name in ("venv", "models", "cache"):
        assert not (tmp_path / name).exists(), name


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    proc = install(["--dry-run"], tmp_path)
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
    # The whole pipeline is announced in order: detect -> the reference models -> bench -> plan ->
    # download of the chosen tier -> verify.
    steps = [out.index(f"model_setup.py {step}") for step in ("detect", "download --tier embedded --no-select",
                                                               "bench", "plan", "download --plan", "verify")]
    assert steps == sorted(steps)
    assert "--check-sources" in out and "--llama-backend cpu" in out
    assert_changed_nothing(tmp_path)


def test_dry_run_with_an_installed_venv_shows_the_real_plan(tmp_path: Path) -> None:
    venv = ROOT / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.fail("run ./install.sh first (scripts/test.sh does)")
    proc = install(["--dry-run", "--offline"], tmp_path, venv=venv)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "cpu:" in out and "ram:" in out  # detect ran for real
    assert "tier embedded (LLM on cpu)" in out  # so did the plan: offline, only embedded can be had
    assert "(--offline)" in out and "Dry run: nothing was changed." in out
    assert not (tmp_path / "models").exists() and not (tmp_path / "cache").exists()


def test_nvidia_with_cuda_toolkit_builds_for_cuda(tmp_path: Path) -> None:
    nvidia(tmp_path / "bin", nvcc=True)
    proc = install(["--dry-run"], tmp_path, path_prefix=tmp_path / "bin", env=nvcc_env(tmp_path / "bin", nvcc=True))
    assert proc.returncode == 0, proc.stderr
    assert "-DGGML_CUDA=ON" in proc.stdout and "for cuda" in proc.stdout
    assert "--llama-backend cuda" in proc.stdout
    assert_changed_nothing(tmp_path)


def test_nvidia_without_toolkit_builds_for_cpu_and_says_why(tmp_path: Path) -> None:
    nvidia(tmp_path / "bin", nvcc=False)
    proc = install(["--dry-run"], tmp_path, path_prefix=tmp_path / "bin",
                   env=nvcc_env(tmp_path / "bin", nvcc=False))
    assert proc.returncode == 0, proc.stderr
    assert "-DGGML_CUDA" not in proc.stdout and "--llama-backend cpu" in proc.stdout
    assert "CUDA toolkit (nvcc) is not" in proc.stderr


def test_cpu_only_ignores_the_gpu(tmp_path: Path) -> None:
    nvidia(tmp_path / "bin", nvcc=True)
    proc = install(["--dry-run", "--cpu-only"], tmp_path, path_prefix=tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert "-DGGML_CUDA" not in proc.stdout and "--cpu-only" in proc.stdout


def test_amd_with_rocm_builds_for_hip(tmp_path: Path) -> None:
    recorded = (FIXTURES / "amd-rx7900xtx" / "rocm-smi").read_text()
    fake_tool(tmp_path / "bin", "rocm-smi", f"cat <<'EOF'\n{recorded.rstrip()}\nEOF\n")
    fake_tool(tmp_path / "bin", "hipcc", "echo HIP version: 6.1\n")
    proc = install(["--dry-run"], tmp_path, path_prefix=tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert "-DGGML_HIP=ON" in proc.stdout and "--llama-backend hip" in proc.stdout


def test_gpu_without_a_gpu_toolchain_fails_clearly(tmp_path: Path) -> None:
    proc = install(["--dry-run", "--gpu"], tmp_path)
    assert proc.returncode == 1
    assert "--gpu: no usable GPU toolchain here" in proc.stderr
    assert_changed_nothing(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown option"),
    (["--tier"], "--tier needs a value"),
    (["--models-dir", "--yes"], "--models-dir needs a value"),
    (["--cpu-only", "--gpu"], "contradict"),
])
def test_bad_options_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    proc = install(args, tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert_changed_nothing(tmp_path)


def test_every_flag_has_an_environment_variable(tmp_path: Path) -> None:
    # The same dry run driven by environment variables instead of flags.
    nvidia(tmp_path / "bin", nvcc=True)
    proc = install([], tmp_path, path_prefix=tmp_path / "bin",
                   env={"LOCAL_DRY_RUN": "1", "LOCAL_CPU_ONLY": "1", "LOCAL_OFFLINE": "1", "LOCAL_TIER": "embedded",
                        "LOCAL_NO_BENCHMARK": "1", "LOCAL_MIRROR": "https://hf-mirror.example"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "-DGGML_CUDA" not in out and "--cpu-only" in out and "--offline" in out
    assert "--tier embedded" in out and "--mirror https://hf-mirror.example" in out
    assert "model_setup.py bench" not in out and "benchmark skipped" in out
    help_text = install(["--help"], tmp_path).stdout
    for flag, var in (("--tier", "LOCAL_TIER"), ("--cpu-only", "LOCAL_CPU_ONLY"), ("--gpu", "LOCAL_GPU"),
                      ("--yes", "LOCAL_ASSUME_YES"), ("--models-dir", "LOCAL_MODELS_DIR"),
                      ("--mirror", "LOCAL_MIRROR"), ("--offline", "LOCAL_OFFLINE"), ("--dry-run", "LOCAL_DRY_RUN"),
                      ("--no-benchmark", "LOCAL_NO_BENCHMARK"), ("--service", "LOCAL_INSTALL_SERVICE")):
        line = next(line for line in help_text.splitlines() if line.strip().startswith(flag))
        assert var in line or var in help_text.split(flag, 1)[1].split("\n  --", 1)[0], flag
