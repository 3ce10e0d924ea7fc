"""Where the LLM runs and what that device can do: CPU classes, the GPU table, thread pools, assumed figures.

The figures are assumptions; a benchmark replaces those it measured (plan_predict). Nothing here runs a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from local_ai_server.setup.hardware import Gpu, Hardware

# --- the server's thread defaults (see README: LOCAL_LLM_THREADS, LOCAL_STT_THREADS, LOCAL_TTS_THREADS)
LLM_MAX_THREADS = 8
STT_MAX_THREADS = 4
TTS_MAX_THREADS = 2

# Apple's Metal lets the GPU wire about two thirds of unified memory by default.
APPLE_GPU_SHARE = 0.66


@dataclass(frozen=True)
class CpuClass:
    """Assumed figures for a family of CPUs, used only when no benchmark was given."""

    name: str
    bandwidth_gbs: float  # what llama.cpp decode reaches from all channels, not the datasheet peak
    per_core_gbs: float  # what one core can pull: few threads cannot saturate a wide memory system
    ghz: float  # sustained all-core clock


# Ordered: the first pattern that matches the CPU model name wins.
CPU_CLASSES: tuple[tuple[str, CpuClass], ...] = (
    (r"Apple M\d+ (Max|Ultra)", CpuClass("apple-silicon-max", 200.0, 30.0, 3.2)),
    (r"Apple M\d+ Pro", CpuClass("apple-silicon-pro", 120.0, 25.0, 3.2)),
    (r"Apple M", CpuClass("apple-silicon", 55.0, 20.0, 3.2)),
    # Haswell/Broadwell Xeons (v3/v4): DDR4-2133/2400, and usually a VM slice of a socket.
    (r"Xeon.*v[34]\b", CpuClass("xeon-ddr4-2014", 30.0, 5.0, 2.6)),
    (r"Xeon|EPYC|Threadripper", CpuClass("server", 40.0, 7.0, 2.5)),
    # Laptop parts: U/H suffixes, mobile Ryzen; dual-channel DDR4 shared with the iGPU.
    (r"\d{4,5}[UH]\b|Ryzen \d \d{4}[UH]|Celeron|Pentium|Atom", CpuClass("laptop", 20.0, 5.0, 2.5)),
    (r"Ryzen|Core\(TM\)|Core i\d|Core Ultra", CpuClass("desktop", 55.0, 9.0, 4.0)),
)
UNKNOWN_CPU = CpuClass("unknown", 15.0, 5.0, 2.0)

# GPU memory bandwidth (GB/s, datasheet) and the dense FP16 TFLOPS llama.cpp prefill reaches (effective).
GPU_TABLE: tuple[tuple[str, float, float], ...] = (
    (r"RTX 4090", 1008.0, 80.0),
    (r"RTX 4080", 717.0, 50.0),
    (r"RTX 4070", 504.0, 30.0),
    (r"RTX 4060", 272.0, 15.0),
    (r"RTX 3090", 936.0, 40.0),
    (r"RTX 3080", 760.0, 30.0),
    (r"RTX 3070", 448.0, 20.0),
    (r"RTX 3060", 360.0, 12.0),
    (r"A100", 1555.0, 150.0),
    (r"H100", 2000.0, 300.0),
    (r"L4\b", 300.0, 30.0),
    (r"T4\b", 320.0, 15.0),
    (r"7900 XTX", 960.0, 40.0),
    (r"7900 XT\b", 800.0, 35.0),
    (r"Apple M\d+ (Max|Ultra)", 400.0, 8.0),
    (r"Apple M\d+ Pro", 200.0, 4.0),
    (r"Apple M", 68.0, 1.5),
)
GPU_BANDWIDTH_EFFICIENCY = 0.75  # decode reaches ~75% of datasheet bandwidth


@dataclass(frozen=True)
class Device:
    """Where the LLM runs and the figures its predictions use, each with where it came from."""

    kind: str  # "cpu" or "gpu"
    name: str
    bandwidth_gbs: float
    llm_gflops: float
    stt_gflops: float
    tts_gflops: float
    sources: Mapping[str, str]


def cpu_class(model_name: str) -> CpuClass:
    """The assumed class of a CPU, from its model name."""
    for pattern, klass in CPU_CLASSES:
        if re.search(pattern, model_name, re.IGNORECASE):
            return klass
    return UNKNOWN_CPU


def flops_per_cycle(flags: tuple[str, ...], arch: str) -> tuple[float, str]:
    """Effective FLOPs per cycle per core llama.cpp-style int-quantized matmuls reach, and why."""
    have = set(flags)
    if "avx512f" in have or "amx_tile" in have:
        return 16.0, "AVX-512"
    if "avx2" in have and "fma" in have:
        return 10.0, "AVX2+FMA"
    if arch in ("arm64", "aarch64") or "neon" in have or "asimd" in have:
        return 12.0, "NEON"
    if "avx" in have:
        return 5.0, "AVX"
    return 3.0, "SSE/scalar"


def cpu_device(hw: Hardware) -> Device:
    """The CPU as an LLM device, from assumptions per CPU class (no benchmark)."""
    klass = cpu_class(hw.cpu_model)
    llm_cores = min(hw.cpu_cores, LLM_MAX_THREADS)
    fpc, isa = flops_per_cycle(hw.cpu_flags, hw.arch)
    bandwidth = min(klass.bandwidth_gbs, llm_cores * klass.per_core_gbs)
    per_core = klass.ghz * fpc
    return Device(
        kind="cpu",
        name=hw.cpu_model,
        bandwidth_gbs=bandwidth,
        llm_gflops=llm_cores * per_core,
        stt_gflops=min(hw.cpu_cores, STT_MAX_THREADS) * per_core,
        tts_gflops=max(1, min(hw.cpu_cores // 2, TTS_MAX_THREADS)) * per_core,
        sources={
            "memory_bandwidth": f"assumed {bandwidth:g} GB/s: CPU class {klass.name} "
                                f"({klass.bandwidth_gbs:g} GB/s total, {klass.per_core_gbs:g} GB/s per core, "
                                f"{llm_cores} LLM threads)",
            "compute": f"assumed {per_core:g} GFLOPS per core: {klass.ghz:g} GHz x {fpc:g} FLOP/cycle ({isa})",
        },
    )


def usable_gpu(hw: Hardware) -> Gpu | None:
    """The GPU llama.cpp would offload to (the one with most memory), if any."""
    gpus = [g for g in hw.gpus if g.vendor in ("nvidia", "amd", "apple") and gpu_memory_gb(g) > 0]
    return max(gpus, key=gpu_memory_gb, default=None)


def gpu_memory_gb(gpu: Gpu) -> float:
    """Memory the GPU can give to model weights (a share of unified memory on Apple silicon)."""
    return round(gpu.vram_gb * APPLE_GPU_SHARE, 1) if gpu.unified else gpu.vram_gb


def gpu_device(hw: Hardware, gpu: Gpu) -> Device:
    """A GPU as an LLM device; STT runs on it only with CUDA (CTranslate2 has no ROCm/Metal backend)."""
    bandwidth, tflops, source = 0.0, 0.0, ""
    for pattern, bw, tf in GPU_TABLE:
        if re.search(pattern, gpu.name, re.IGNORECASE):
            bandwidth, tflops, source = bw, tf, f"GPU table entry {pattern!r}"
            break
    if not bandwidth:
        # Unknown card: mid-range figures scaled by its memory, which tracks its class.
        bandwidth, tflops = 25.0 * max(gpu.vram_gb, 4.0), 1.2 * max(gpu.vram_gb, 4.0)
        source = f"unknown GPU: assumed from its {gpu.vram_gb:g} GB memory"
    cpu = cpu_device(hw)
    stt_gflops = tflops * 1000 * 0.2 if gpu.vendor == "nvidia" else cpu.stt_gflops
    effective = bandwidth * GPU_BANDWIDTH_EFFICIENCY
    return Device(
        kind="gpu",
        name=gpu.name,
        bandwidth_gbs=effective,
        llm_gflops=tflops * 1000,
        stt_gflops=stt_gflops,
        tts_gflops=cpu.tts_gflops,  # Piper runs on the CPU in this server
        sources={
            "memory_bandwidth": f"assumed {effective:g} GB/s: {GPU_BANDWIDTH_EFFICIENCY:.0%} of "
                                f"{bandwidth:g} GB/s ({source})",
            "compute": f"assumed {tflops:g} effective TFLOPS ({source})",
            "stt": "faster-whisper on CUDA" if gpu.vendor == "nvidia" else "faster-whisper on the CPU "
                   "(CTranslate2 has no ROCm/Metal backend): " + cpu.sources["compute"],
            "tts": "Piper on the CPU: " + cpu.sources["compute"],
        },
    )

