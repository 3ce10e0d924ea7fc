"""Hardware detection: CPU, RAM, GPUs and disk, from the raw outputs of the usual system tools.

Every parser takes a tool's raw output as a string, so tests feed recorded outputs (fixtures)
and only `detect()` touches the live machine. A missing tool, a timeout or unparsable output
means "not present", never an error: detection must work on any box the installer lands on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Tools that hang (a wedged GPU driver) must not hang the installer.
COMMAND_TIMEOUT_S = 5.0
GIB = 1024**3

NVIDIA_SMI_CMD = ("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")
ROCM_SMI_CMD = ("rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json")
SYSCTL_CMD = ("sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize")
SYSCTL_CORES_CMD = ("sysctl", "-n", "hw.physicalcpu", "hw.logicalcpu")
SYSTEM_PROFILER_CMD = ("system_profiler", "SPDisplaysDataType")


@dataclass(frozen=True)
class Gpu:
    """One GPU; `vram_gb` is GiB of dedicated memory, or of unified memory when `unified` is set."""

    vendor: str
    name: str
    vram_gb: float
    unified: bool = False


@dataclass(frozen=True)
class Hardware:
    """What the planner needs to know about a machine (the `detect --json` document)."""

    cpu_model: str
    cpu_cores: int
    cpu_threads: int
    cpu_flags: tuple[str, ...]
    ram_gb: float
    gpus: tuple[Gpu, ...]
    os: str
    arch: str
    disk_free_gb: float | None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; lists instead of tuples."""
        doc = asdict(self)
        doc["cpu_flags"] = list(self.cpu_flags)
        doc["gpus"] = [asdict(g) for g in self.gpus]
        doc["notes"] = list(self.notes)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Hardware:
        """Rebuild from a `detect --json` document; ValueError naming the bad field otherwise."""
        try:
            gpus = tuple(
                Gpu(vendor=str(g["vendor"]), name=str(g["name"]), vram_gb=float(g["vram_gb"]),
                    unified=bool(g.get("unified", False)))
                for g in doc.get("gpus", [])
            )
            cores = int(doc["cpu_cores"])
            disk = doc.get("disk_free_gb")
            return cls(
                cpu_model=str(doc["cpu_model"]),
                cpu_cores=cores,
                cpu_threads=int(doc.get("cpu_threads", cores)),
                cpu_flags=tuple(str(f) for f in doc.get("cpu_flags", [])),
                ram_gb=float(doc["ram_gb"]),
                gpus=gpus,
                os=str(doc.get("os", "unknown")),
                arch=str(doc.get("arch", "unknown")),
                disk_free_gb=None if disk is None else float(disk),
                notes=tuple(str(n) for n in doc.get("notes", [])),
            )
        except KeyError as exc:
            raise ValueError(f"hardware description is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"hardware description is malformed: {exc}") from None


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says: model name, flags, logical CPUs and physical cores."""

    model: str
    flags: tuple[str, ...]
    threads: int
    cores: int


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse Linux /proc/cpuinfo (x86 and ARM layouts)."""
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    model = ""
    flags: tuple[str, ...] = ()
    threads = 0
    physical: set[tuple[str, str]] = set()
    cores_field = 0
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if "processor" in fields and fields["processor"].isdigit():
            threads += 1
        model = model or fields.get("model name", "") or fields.get("hardware", "") or fields.get("cpu model", "")
        if not flags:
            # x86 says "flags", ARM says "Features".
            flags = tuple(sorted(set((fields.get("flags") or fields.get("features") or "").split())))
        if "physical id" in fields and "core id" in fields:
            physical.add((fields["physical id"], fields["core id"]))
        if fields.get("cpu cores", "").isdigit():
            cores_field = max(cores_field, int(fields["cpu cores"]))
    # Physical cores: distinct (socket, core) pairs when listed; VMs often list only "cpu cores".
    cores = len(physical) or cores_field or threads
    return CpuInfo(model=model or "unknown", flags=flags, threads=threads, cores=min(cores, threads or cores))


def parse_meminfo(text: str) -> float:
    """MemTotal of /proc/meminfo in GiB (0.0 if absent)."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return round(int(match.group(1)) * 1024 / GIB, 1) if match else 0.0


def parse_nproc(text: str) -> int | None:
    """The number `nproc` prints, or None."""
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` (MiB) -> GPUs."""
    gpus = []
    for line in text.splitlines():
        name, sep, mem = line.rpartition(",")
        if not sep:
            continue
        try:
            mib = float(mem.strip())
        except ValueError:
            continue  # "[N/A]" or an error line: not a usable GPU
        gpus.append(Gpu(vendor="nvidia", name=name.strip(), vram_gb=round(mib / 1024, 1)))
    return gpus


def parse_rocm_smi(text: str) -> list[Gpu]:
    """`rocm-smi --showproductname --showmeminfo vram --json` -> GPUs (VRAM in bytes there)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(doc, dict):
        return []
    gpus = []
    for key, card in doc.items():
        if not (key.startswith("card") and isinstance(card, dict)):
            continue
        name = str(card.get("Card series") or card.get("Card model") or card.get("Card SKU") or key)
        total = next((v for k, v in card.items() if "VRAM Total Memory" in k), None)
        try:
            vram = round(int(str(total)) / GIB, 1) if total is not None else 0.0
        except ValueError:
            vram = 0.0
        gpus.append(Gpu(vendor="amd", name=name, vram_gb=vram))
    return gpus


def parse_sysctl(text: str) -> tuple[str, float]:
    """`sysctl -n machdep.cpu.brand_string hw.memsize` -> (CPU brand, RAM GiB)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    brand = next((line for line in lines if not line.isdigit()), "unknown")
    mem = next((int(line) for line in lines if line.isdigit()), 0)
    return brand, round(mem / GIB, 1)


def parse_system_profiler(text: str, unified_gb: float = 0.0) -> list[Gpu]:
    """`system_profiler SPDisplaysDataType` -> GPUs; Apple silicon shares `unified_gb` with the CPU."""
    gpus = []
    for match in re.finditer(r"Chipset Model:\s*(.+)", text):
        name = match.group(1).strip()
        rest = text[match.end():]
        vram_match = re.search(r"VRAM \((?:Total|Dynamic, Max)\):\s*(\d+)\s*(GB|MB)", rest.split("Chipset Model:")[0])
        if name.startswith("Apple"):
            gpus.append(Gpu(vendor="apple", name=name, vram_gb=unified_gb, unified=True))
        elif vram_match:
            size = float(vram_match.group(1)) / (1 if vram_match.group(2) == "GB" else 1024)
            vendor = "amd" if "AMD" in name or "Radeon" in name else "nvidia" if "NVIDIA" in name else "other"
            gpus.append(Gpu(vendor=vendor, name=name, vram_gb=round(size, 1)))
    return gpus


def from_raw(raw: Mapping[str, str | None], *, os_name: str, arch: str, disk_free_gb: float | None) -> Hardware:
    """Build a Hardware from raw tool outputs keyed by tool (`cpuinfo`, `meminfo`, `nproc`,
    `nvidia_smi`, `rocm_smi`, `sysctl`, `sysctl_cores`, `system_profiler`); None means absent."""
    notes: list[str] = []
    cpuinfo, meminfo = raw.get("cpuinfo"), raw.get("meminfo")
    cpu = parse_cpuinfo(cpuinfo) if cpuinfo else None
    model = cpu.model if cpu else "unknown"
    flags = cpu.flags if cpu else ()
    threads = cpu.threads if cpu else 0
    cores = cpu.cores if cpu else 0
    ram = parse_meminfo(meminfo) if meminfo else 0.0
    nproc = parse_nproc(raw.get("nproc") or "")
    if nproc:
        # nproc honours cgroup/affinity limits: a container may use fewer CPUs than cpuinfo lists.
        if threads and nproc < threads:
            notes.append(f"nproc={nproc} limits this process to fewer than the {threads} CPUs listed")
            cores = min(cores, nproc)
        threads = min(threads, nproc) if threads else nproc
        cores = cores or nproc
    gpus: list[Gpu] = []
    if raw.get("sysctl"):
        brand, mem = parse_sysctl(raw["sysctl"] or "")
        model = brand if model == "unknown" else model
        ram = ram or mem
        if raw.get("sysctl_cores"):
            counts = [int(x) for x in (raw["sysctl_cores"] or "").split() if x.isdigit()]
            if len(counts) == 2:
                cores, threads = counts
        if arch in ("arm64", "aarch64") and not flags:
            flags = ("neon",)  # every Apple silicon CPU has NEON; sysctl has no flag list for it
    if raw.get("nvidia_smi"):
        gpus += parse_nvidia_smi(raw["nvidia_smi"] or "")
    if raw.get("rocm_smi"):
        gpus += parse_rocm_smi(raw["rocm_smi"] or "")
    if raw.get("system_profiler"):
        known = {g.name for g in gpus}
        gpus += [g for g in parse_system_profiler(raw["system_profiler"] or "", ram) if g.name not in known]
    if not cores:
        notes.append("CPU core count unknown; assuming 1")
    if not ram:
        notes.append("RAM size unknown")
    return Hardware(
        cpu_model=model,
        cpu_cores=max(cores, 1),
        cpu_threads=max(threads, cores, 1),
        cpu_flags=tuple(flags),
        ram_gb=ram,
        gpus=tuple(gpus),
        os=os_name,
        arch=arch,
        disk_free_gb=disk_free_gb,
        notes=tuple(notes),
    )


def run_tool(cmd: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> str | None:
    """stdout of `cmd`, or None when it is missing, fails or times out."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout.strip() else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def detect(models_dir: Path | None = None) -> Hardware:
    """Detect this machine; free disk is measured where the models go (`models_dir`, else cwd)."""
    system = platform.system().lower()
    raw: dict[str, str | None] = {"nproc": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity")
                                  else str(os.cpu_count() or "")}
    if system == "linux":
        raw["cpuinfo"] = _read("/proc/cpuinfo")
        raw["meminfo"] = _read("/proc/meminfo")
    if system == "darwin":
        raw["sysctl"] = run_tool(SYSCTL_CMD)
        raw["sysctl_cores"] = run_tool(SYSCTL_CORES_CMD)
        raw["system_profiler"] = run_tool(SYSTEM_PROFILER_CMD, timeout=15.0)  # it is slow on first call
    else:
        raw["nvidia_smi"] = run_tool(NVIDIA_SMI_CMD)
        raw["rocm_smi"] = run_tool(ROCM_SMI_CMD)
    probe = Path(models_dir or Path.cwd()).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        disk: float | None = round(shutil.disk_usage(probe).free / GIB, 1)
    except OSError:
        disk = None
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)
    return from_raw(raw, os_name=system, arch=arch, disk_free_gb=disk)
