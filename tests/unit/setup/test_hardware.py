"""Hardware detection on recorded tool outputs (fixtures) and the live, tolerant detect()."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from local_ai_server.setup import hardware
from local_ai_server.setup.hardware import (
    Gpu,
    Hardware,
    from_raw,
    parse_cpuinfo,
    parse_meminfo,
    parse_nvidia_smi,
    parse_rocm_smi,
    parse_sysctl,
    parse_system_profiler,
)
from tests.paths import INSTALLER_FIXTURES as FIXTURES
from tests.paths import REPO

# fixture file name -> from_raw key
TOOL_FILES = {
    "cpuinfo": "cpuinfo", "meminfo": "meminfo", "nproc": "nproc", "nvidia-smi": "nvidia_smi",
    "rocm-smi": "rocm_smi", "sysctl": "sysctl", "sysctl_cores": "sysctl_cores", "system_profiler": "system_profiler",
}


def machine(name: str) -> Hardware:
    """Detect a recorded machine from its fixture directory."""
    directory = FIXTURES / name
    raw = {key: (directory / f).read_text() for f, key in TOOL_FILES.items() if (directory / f).exists()}
    meta = json.loads((directory / "meta.json").read_text())
    return from_raw(raw, os_name=meta["os"], arch=meta["arch"], disk_free_gb=meta["disk_free_gb"])


def test_xeon_e5_2660_v3() -> None:
    hw = machine("xeon-e5-2660v3")
    assert hw.cpu_model == "Intel(R) Xeon(R) CPU E5-2660 v3 @ 2.60GHz"
    assert (hw.cpu_cores, hw.cpu_threads) == (16, 16)
    assert hw.ram_gb == 39.0
    assert hw.gpus == ()
    assert "avx2" in hw.cpu_flags and "fma" in hw.cpu_flags and "avx512f" not in hw.cpu_flags


def test_ryzen_with_rtx_4090() -> None:
    hw = machine("ryzen-7950x-rtx4090")
    assert hw.cpu_model.startswith("AMD Ryzen 9 7950X")
    assert (hw.cpu_cores, hw.cpu_threads) == (16, 32)  # SMT siblings are not cores
    assert 62 <= hw.ram_gb <= 64
    assert hw.gpus == (Gpu(vendor="nvidia", name="NVIDIA GeForce RTX 4090", vram_gb=24.0),)
    assert "avx512f" in hw.cpu_flags


def test_apple_m1() -> None:
    hw = machine("apple-m1")
    assert hw.cpu_model == "Apple M1"
    assert (hw.cpu_cores, hw.cpu_threads) == (8, 8)
    assert hw.ram_gb == 16.0
    assert hw.gpus == (Gpu(vendor="apple", name="Apple M1", vram_gb=16.0, unified=True),)
    assert (hw.os, hw.arch) == ("darwin", "arm64")
    assert hw.cpu_flags == ("neon",)


def test_laptop_i5_8250u() -> None:
    hw = machine("laptop-i5-8250u")
    assert (hw.cpu_cores, hw.cpu_threads) == (4, 8)
    assert 7 < hw.ram_gb < 8  # MemTotal of an 8 GB machine
    assert hw.gpus == ()


def test_amd_gpu_via_rocm_smi() -> None:
    hw = machine("amd-rx7900xtx")
    assert hw.gpus == (Gpu(vendor="amd", name="Navi 31 [Radeon RX 7900 XTX]", vram_gb=24.0),)


def test_this_machine_fixture() -> None:
    hw = machine("this-machine")
    nproc = int((FIXTURES / "this-machine" / "nproc").read_text())
    assert hw.cpu_threads == nproc and 1 <= hw.cpu_cores <= nproc
    assert hw.ram_gb > 0 and hw.cpu_model != "unknown"


def test_nproc_below_cpuinfo_limits_cores() -> None:
    raw = {"cpuinfo": (FIXTURES / "xeon-e5-2660v3" / "cpuinfo").read_text(), "nproc": "4\n"}
    hw = from_raw(raw, os_name="linux", arch="x86_64", disk_free_gb=None)
    assert (hw.cpu_cores, hw.cpu_threads) == (4, 4)
    assert any("nproc=4" in n for n in hw.notes)


def test_parsers_tolerate_garbage_and_absence() -> None:
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\n") == []
    assert parse_nvidia_smi("Tesla T4, [N/A]\nTesla T4, 15360\n") == [Gpu("nvidia", "Tesla T4", 15.0)]
    assert parse_rocm_smi("not json") == [] and parse_rocm_smi("[]") == []
    assert parse_meminfo("") == 0.0
    assert parse_sysctl("Apple M2 Pro\n34359738368\n") == ("Apple M2 Pro", 32.0)
    assert parse_cpuinfo("").threads == 0
    hw = from_raw({}, os_name="linux", arch="x86_64", disk_free_gb=None)
    assert hw.cpu_cores == 1 and hw.ram_gb == 0.0 and hw.gpus == ()
    assert any("unknown" in n for n in hw.notes)


def test_system_profiler_discrete_gpu() -> None:
    text = ("Graphics/Displays:\n\n    Radeon Pro 560X:\n\n"
            "      Chipset Model: Radeon Pro 560X\n      VRAM (Total): 4 GB\n")
    assert parse_system_profiler(text) == [Gpu("amd", "Radeon Pro 560X", 4.0)]


def test_arm_cpuinfo_features() -> None:
    text = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n\nprocessor\t: 1\nFeatures\t: fp asimd evtstrm crc32\n"
    info = parse_cpuinfo(text)
    assert info.threads == 2 and info.cores == 2 and "asimd" in info.flags


def test_dict_round_trip() -> None:
    hw = machine("ryzen-7950x-rtx4090")
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    with pytest.raises(ValueError, match="missing 'ram_gb'"):
        Hardware.from_dict({"cpu_model": "x", "cpu_cores": 2})


def test_live_detect_survives_missing_and_hanging_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hardware.run_tool(("definitely-not-a-tool-here",)) is None
    assert hardware.run_tool((sys.executable, "-c", "import time; time.sleep(5)"), timeout=0.2) is None
    assert hardware.run_tool((sys.executable, "-c", "import sys; sys.exit(3)")) is None
    hw = hardware.detect()
    assert hw.cpu_cores >= 1 and hw.ram_gb > 0 and hw.disk_free_gb is not None


def test_cli_detect_json() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "model_setup.py"), "detect", "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    doc = json.loads(proc.stdout)
    for key in ("cpu_model", "cpu_cores", "cpu_flags", "ram_gb", "gpus", "os", "arch", "disk_free_gb"):
        assert key in doc
    assert isinstance(doc["cpu_flags"], list) and isinstance(doc["gpus"], list)
