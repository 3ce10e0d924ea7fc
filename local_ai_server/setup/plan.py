"""Tier choice and performance prediction: a pure function of hardware, an optional benchmark and the registry.

The model, in short (without a benchmark; with one, measured rates replace the assumptions):
- LLM decode is memory-bound: each token streams the whole weights file once, so
  tok/s = 1 / (file_bytes / effective_bandwidth + per-token overhead).
- LLM prefill is compute-bound: 2 FLOPs per parameter per token, so tok/s = effective_FLOPS / (2 * params).
- STT (faster-whisper, CTranslate2) and TTS (Piper, onnxruntime) are compute-bound and run on their own,
  smaller thread pools (LOCAL_STT_THREADS <= 4, LOCAL_TTS_THREADS <= 2), so they scale with params / FLOPS.
- With a benchmark file, measured probe rates replace the assumptions. With two measured LLMs (the
  TinyLlama probe and the small embedded one), the per-token cost is a line through both: a fixed part
  (thread wake-ups, sampling, which dominate tiny models) plus a part proportional to weights bytes
  (decode) or parameters (prefill, time to first token). With one, costs scale proportionally.
  STT and TTS scale from the measured reference models by size (TTS also by words spoken).
Nothing here runs a model or touches the network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from local_ai_server.setup.hardware import Gpu, Hardware
from local_ai_server.setup.registry import Model, Registry, RegistryError, Tier

# --- the voice turn being predicted ---------------------------------------------------------------
QUESTION_WORDS = 10
# ~1.3 tokens per English word plus the chat template around the user turn; the system prompt is
# prefilled once when a worker starts, so it is not paid per turn.
PROMPT_TOKENS = round(QUESTION_WORDS * 1.3) + 12
ANSWER_TOKENS = 30
# The first sentence is what reaches the caller first: speech starts once it is synthesized.
FIRST_SENTENCE_TOKENS = 10
FIRST_SENTENCE_WORDS = round(FIRST_SENTENCE_TOKENS / 1.3)
UTTERANCE_S = 3.0  # a 10-word question spoken at a normal pace

# --- the server's thread defaults (see README: LOCAL_LLM_THREADS, LOCAL_STT_THREADS, LOCAL_TTS_THREADS)
LLM_MAX_THREADS = 8
STT_MAX_THREADS = 4
TTS_MAX_THREADS = 2

# Targets used when a tier does not state its own.
DEFAULT_MIN_DECODE_TOK_S = 10.0
DEFAULT_MAX_FIRST_AUDIO_MS = 1500.0
# MemTotal is below the installed RAM by what the kernel and firmware reserve: an "8 GB" laptop
# reports ~7.6 GiB, and must still count as 8.
RAM_TOLERANCE = 0.9
# Apple's Metal lets the GPU wire about two thirds of unified memory by default.
APPLE_GPU_SHARE = 0.66

# Fixed costs that do not shrink with faster hardware: kernel launches, sampling, tokenization.
CPU_TOKEN_OVERHEAD_S = 0.002
GPU_TOKEN_OVERHEAD_S = 0.003
TTFT_OVERHEAD_MS = 15.0
STT_OVERHEAD_MS = 30.0
TTS_OVERHEAD_MS = 20.0
# Empirical compute constants (ms x GFLOPS per million parameters), calibrated so that faster-whisper
# tiny.en int8 transcribes a 3 s utterance in ~0.4 s and Piper medium speaks a first sentence in
# ~0.2 s on 2 AVX2 cores, which is what the embedded tier does on the reference 2-core machine.
STT_MS_GFLOPS_PER_MPARAM = 410.0
TTS_MS_GFLOPS_PER_MB = 127.0


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


class PlanError(RegistryError):
    """A tier name or benchmark file the planner cannot use."""


@dataclass(frozen=True)
class ProbePoint:
    """One LLM measured on this machine: its size and its rates."""

    params_b: float
    file_bytes: int
    decode_tok_s: float
    prefill_tok_s: float
    ttft_ms: float

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> ProbePoint:
        """Validate one probe object of a bench document."""
        values: dict[str, float] = {}
        for key in ("params_b", "file_bytes", "decode_tok_s", "prefill_tok_s", "ttft_ms"):
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise PlanError(f"bench {where}.{key} must be a positive number, got {value!r}")
            values[key] = float(value)
        return cls(params_b=values["params_b"], file_bytes=int(values["file_bytes"]),
                   decode_tok_s=values["decode_tok_s"], prefill_tok_s=values["prefill_tok_s"],
                   ttft_ms=values["ttft_ms"])


@dataclass(frozen=True)
class Bench:
    """Measured rates from the bench: one probe LLM (two when the small one was there) plus STT and TTS."""

    params_b: float
    file_bytes: int
    decode_tok_s: float
    prefill_tok_s: float
    ttft_ms: float
    stt_ms: float | None
    tts_ms: float | None
    stt_model: str = "whisper-tiny.en"
    tts_model: str = "piper-en_US-joe-medium"
    # Words of the sentence `tts_ms` was measured on: synthesis time grows with the words spoken.
    tts_words: int | None = None
    # A second, much smaller LLM measured the same way: with two points the per-token cost is fitted as
    # a fixed part plus a part proportional to size, instead of assumed proportional.
    small: ProbePoint | None = None

    @property
    def points(self) -> tuple[ProbePoint, ...]:
        """The measured LLMs, the main probe first."""
        main = ProbePoint(self.params_b, self.file_bytes, self.decode_tok_s, self.prefill_tok_s, self.ttft_ms)
        return (main,) if self.small is None else (main, self.small)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Bench:
        """Validate a bench JSON document (`{"probe": {...}, "stt_ms": ..., "tts_ms": ...}`)."""
        probe = doc.get("probe")
        if not isinstance(probe, Mapping):
            raise PlanError("bench file needs a 'probe' object")
        values: dict[str, float] = {}
        for key in ("params_b", "file_bytes", "decode_tok_s", "prefill_tok_s", "ttft_ms"):
            value = probe.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise PlanError(f"bench probe.{key} must be a positive number, got {value!r}")
            values[key] = float(value)
        timings: dict[str, float | None] = {}
        for key in ("stt_ms", "tts_ms"):
            value = doc.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise PlanError(f"bench {key} must be a positive number, got {value!r}")
            timings[key] = None if value is None else float(value)
        return cls(
            params_b=values["params_b"], file_bytes=int(values["file_bytes"]),
            decode_tok_s=values["decode_tok_s"], prefill_tok_s=values["prefill_tok_s"], ttft_ms=values["ttft_ms"],
            stt_ms=timings["stt_ms"], tts_ms=timings["tts_ms"],
            stt_model=str(doc.get("stt_model", "whisper-tiny.en")),
            tts_model=str(doc.get("tts_model", "piper-en_US-joe-medium")),
            tts_words=_words(doc.get("tts")),
            small=ProbePoint.from_dict(doc["small_probe"], "small_probe")
            if isinstance(doc.get("small_probe"), Mapping) else None,
        )


def _words(tts: Any) -> int | None:
    words = tts.get("words") if isinstance(tts, Mapping) else None
    return words if isinstance(words, int) and not isinstance(words, bool) and words > 0 else None


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


@dataclass(frozen=True)
class Prediction:
    """Predicted figures for one model set on one machine."""

    decode_tok_s: float
    prefill_tok_s: float
    ttft_ms: float
    stt_ms: float
    tts_first_ms: float
    first_audio_ms: float
    turn_ms: float

    def to_dict(self) -> dict[str, float]:
        """Rounded, JSON-ready figures."""
        return {
            "decode_tok_s": round(self.decode_tok_s, 1),
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "ttft_ms": round(self.ttft_ms),
            "stt_ms": round(self.stt_ms),
            "tts_first_sentence_ms": round(self.tts_first_ms),
            "first_audio_ms": round(self.first_audio_ms),
            "voice_turn_ms": round(self.turn_ms),
        }


@dataclass(frozen=True)
class TierAssessment:
    """Whether a tier fits this machine, why (not), and what it would do here."""

    tier: str
    fits: bool
    meets_targets: bool
    reasons: tuple[str, ...]
    prediction: Prediction
    device: Device


@dataclass(frozen=True)
class Plan:
    """The chosen tier, why, and the per-tier assessments behind the choice."""

    tier: str
    requested: str | None
    why: tuple[str, ...]
    chosen: TierAssessment
    assessments: tuple[TierAssessment, ...]
    inputs: Mapping[str, Any] = field(default_factory=dict)
    # Set when a bigger tier suits the hardware but cannot be fetched from here: which, and why not.
    preferred: str | None = None
    fallback: str | None = None

    def _device_sources(self) -> dict[str, str]:
        """Where the chosen tier's figures came from: assumptions only where no measurement replaced them."""
        sources = dict(self.chosen.device.sources)
        measured = self.inputs.get("measured")
        if isinstance(measured, Mapping):
            if self.chosen.device.kind == "cpu":
                for key in ("memory_bandwidth", "compute"):
                    sources.pop(key, None)
                sources["llm"] = str(measured["llm"])
            for key in ("stt", "tts"):
                if key in measured and not (key == "stt" and "CUDA" in sources.get("stt", "")):
                    sources[key] = str(measured[key])
        return sources

    def to_dict(self, registry: Registry) -> dict[str, Any]:
        """The `plan --json` document."""
        models = registry.tier_models(self.tier)
        return {
            "tier": self.tier,
            "requested": self.requested,
            "why": list(self.why),
            "preferred_tier": self.preferred,
            "fallback": self.fallback,
            "turn": {"question_words": QUESTION_WORDS, "prompt_tokens": PROMPT_TOKENS,
                     "answer_tokens": ANSWER_TOKENS, "first_sentence_tokens": FIRST_SENTENCE_TOKENS},
            "llm_device": self.chosen.device.kind,
            "prediction": self.chosen.prediction.to_dict(),
            "models": {
                role: {"id": m.id, "display": m.display, "params_b": m.params_b, "quantization": m.quantization,
                       "file_bytes": m.file_bytes, "size_bytes": m.size_bytes}
                for role, m in models.items()
            },
            "inputs": dict(self.inputs) | {"device": self._device_sources()},
            "tiers": [
                {"tier": a.tier, "fits": a.fits, "meets_targets": a.meets_targets, "reasons": list(a.reasons),
                 "llm_device": a.device.kind, "prediction": a.prediction.to_dict()}
                for a in self.assessments
            ],
        }


# --- devices ---------------------------------------------------------------------------------------


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


# --- prediction ------------------------------------------------------------------------------------


def predict_llm(bench: Bench, file_bytes: int, params_b: float) -> tuple[float, float, float]:
    """(decode tok/s, prefill tok/s, time to first token ms) of an LLM of this size, from the measured probes."""
    points = bench.points
    decode = 1000.0 / _fit(points, file_bytes, lambda p: p.file_bytes, lambda p: 1000.0 / p.decode_tok_s)
    prefill = 1000.0 / _fit(points, params_b, lambda p: p.params_b, lambda p: 1000.0 / p.prefill_tok_s)
    ttft = _fit(points, params_b, lambda p: p.params_b, lambda p: p.ttft_ms)
    return decode, prefill, ttft


def _fit(points: tuple[ProbePoint, ...], x: float, x_of: Callable[[ProbePoint], float],
         y_of: Callable[[ProbePoint], float]) -> float:
    """A cost (ms) at size `x`: on the line through two measured points, else proportional to one.

    The line is a fixed cost plus a cost per unit of size; if the two points do not give a positive
    slope and intercept (noise), the nearest point is scaled proportionally instead.
    """
    if len(points) >= 2:
        (x1, y1), (x2, y2) = sorted((x_of(p), y_of(p)) for p in points[:2])
        if x2 > x1:
            slope = (y2 - y1) / (x2 - x1)
            intercept = y1 - slope * x1
            if slope > 0 and intercept >= 0:
                return intercept + slope * x
    nearest = min(points, key=lambda p: abs(math.log(x_of(p) / x)))
    return y_of(nearest) * x / x_of(nearest)


def _params_m(model: Model) -> float:
    # Registry entries without params_b are estimated from bytes at ~4.5 bits per weight.
    return (model.params_b if model.params_b else model.file_bytes * 8 / 4.5 / 1e9) * 1000


def predict(models: Mapping[str, Model], device: Device, bench: Bench | None = None,
            registry: Registry | None = None) -> Prediction:
    """Predicted figures of an (stt, llm, tts) set on `device`; `bench` (CPU measurements) overrides assumptions."""
    stt, llm, tts = models["stt"], models["llm"], models["tts"]
    llm_params_b = _params_m(llm) / 1000
    use_bench = bench is not None and device.kind == "cpu"
    if use_bench and bench is not None:
        decode, prefill, ttft = predict_llm(bench, llm.file_bytes, llm_params_b)
    else:
        overhead = GPU_TOKEN_OVERHEAD_S if device.kind == "gpu" else CPU_TOKEN_OVERHEAD_S
        decode = 1.0 / (llm.file_bytes / (device.bandwidth_gbs * 1e9) + overhead)
        prefill = device.llm_gflops * 1e9 / (2 * llm_params_b * 1e9)
        ttft = PROMPT_TOKENS / prefill * 1000 + TTFT_OVERHEAD_MS
    stt_ms = STT_OVERHEAD_MS + STT_MS_GFLOPS_PER_MPARAM * _params_m(stt) / device.stt_gflops
    tts_ms = TTS_OVERHEAD_MS + TTS_MS_GFLOPS_PER_MB * (tts.file_bytes / 1e6) / device.tts_gflops
    if bench is not None and registry is not None:
        # Measured STT/TTS of a known model scale by size to the planned model (same CPU either way,
        # except STT on CUDA, which the CPU measurement says nothing about).
        ref_stt = registry.models.get(bench.stt_model)
        stt_on_cuda = device.kind == "gpu" and "CUDA" in device.sources.get("stt", "")
        if bench.stt_ms and ref_stt is not None and not stt_on_cuda:
            stt_ms = bench.stt_ms * _params_m(stt) / _params_m(ref_stt)
        ref_tts = registry.models.get(bench.tts_model)
        if bench.tts_ms and ref_tts is not None:
            # Scaled by voice size, and from the benchmark sentence's length to a first sentence's.
            words = FIRST_SENTENCE_WORDS / bench.tts_words if bench.tts_words else 1.0
            tts_ms = bench.tts_ms * words * tts.file_bytes / ref_tts.file_bytes
    first_sentence_ms = (FIRST_SENTENCE_TOKENS - 1) / decode * 1000
    first_audio = stt_ms + ttft + first_sentence_ms + tts_ms
    turn = stt_ms + ttft + (ANSWER_TOKENS - 1) / decode * 1000 + tts_ms
    return Prediction(decode_tok_s=decode, prefill_tok_s=prefill, ttft_ms=ttft, stt_ms=stt_ms,
                      tts_first_ms=tts_ms, first_audio_ms=first_audio, turn_ms=turn)


def _number(requirements: Mapping[str, float | int | bool], key: str, default: float) -> float:
    value = requirements.get(key, default)
    return float(value) if not isinstance(value, bool) else default


@dataclass(frozen=True)
class Constraints:
    """What the installer adds to the hardware: GPU policy, the llama.cpp build, tiers it cannot fetch."""

    gpu: str = "auto"  # auto: use a GPU tier when one fits; off: --cpu-only; require: --gpu
    # The llama.cpp backend that was built (cpu, cuda, hip, metal); None: not known, assume it matches.
    llama_backend: str | None = None
    unavailable: Mapping[str, str] = field(default_factory=dict)  # tier name (lower) -> why it can't be fetched

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the plan's inputs."""
        return {"gpu": self.gpu, "llama_backend": self.llama_backend, "unavailable": dict(self.unavailable)}


GPU_BACKENDS = {"nvidia": ("cuda",), "amd": ("hip", "vulkan"), "apple": ("metal",)}


def assess(registry: Registry, tier: Tier, hw: Hardware, bench: Bench | None = None,
           constraints: Constraints | None = None) -> TierAssessment:
    """Check a tier's requirements against `hw` and predict what it would do here."""
    c = constraints or Constraints()
    req = tier.requirements
    models = registry.tier_models(tier.name)
    reasons: list[str] = []
    fits = True
    unavailable = c.unavailable.get(tier.name.lower())
    if unavailable:
        fits = False
        reasons.append(unavailable)
    wants_gpu = req.get("gpu") is True
    if wants_gpu and c.gpu == "off":
        fits = False
        reasons.append("GPU tiers are disabled (--cpu-only)")
    if not wants_gpu and c.gpu == "require":
        fits = False
        reasons.append("a CPU tier, and --gpu asks for a GPU tier")
    min_ram = _number(req, "min_ram_gb", 0)
    # The LLM is mapped into RAM (CPU) or staged through it (GPU); STT and TTS add their share.
    need_ram = max(min_ram * RAM_TOLERANCE, sum(m.size_bytes for m in models.values()) / 1024**3 + 1.0)
    if hw.ram_gb < need_ram:
        fits = False
        reasons.append(f"needs {min_ram:g} GB RAM, has {hw.ram_gb:g} GB")
    min_cores = _number(req, "min_cpu_cores", 0)
    if hw.cpu_cores < min_cores:
        fits = False
        reasons.append(f"needs {min_cores:g} CPU cores, has {hw.cpu_cores}")
    min_disk = _number(req, "min_disk_gb", 0)
    if hw.disk_free_gb is not None and hw.disk_free_gb < min_disk:
        fits = False
        reasons.append(f"needs {min_disk:g} GB free disk, has {hw.disk_free_gb:g} GB")
    device = cpu_device(hw)
    if req.get("gpu") is True:
        gpu = usable_gpu(hw)
        min_vram = _number(req, "min_vram_gb", 0)
        llm_gb = models["llm"].file_bytes / 1024**3
        if gpu is None:
            fits = False
            reasons.append("needs a GPU, none detected")
        else:
            device = gpu_device(hw, gpu)
            backends = GPU_BACKENDS.get(gpu.vendor, ())
            if c.llama_backend is not None and c.llama_backend not in backends:
                fits = False
                reasons.append(f"llama.cpp was built for {c.llama_backend}, not for this {gpu.vendor} GPU "
                               f"({'/'.join(backends) or 'no GPU backend'}); its toolkit was not found")
            # Weights plus KV cache and compute buffers (~20% + 0.5 GB) must fit in GPU memory.
            need_vram = max(min_vram, llm_gb * 1.2 + 0.5)
            if gpu_memory_gb(gpu) < need_vram:
                fits = False
                reasons.append(f"needs {need_vram:.1f} GB GPU memory, {gpu.name} offers {gpu_memory_gb(gpu):g} GB")
    prediction = predict(models, device, bench, registry)
    min_decode = _number(req, "min_decode_tok_s", DEFAULT_MIN_DECODE_TOK_S)
    max_first = _number(req, "max_first_audio_ms", DEFAULT_MAX_FIRST_AUDIO_MS)
    meets = True
    if prediction.decode_tok_s < min_decode:
        meets = False
        reasons.append(f"predicted decode {prediction.decode_tok_s:.1f} tok/s is below the tier's {min_decode:g}")
    if prediction.first_audio_ms > max_first:
        meets = False
        reasons.append(f"predicted first audio {prediction.first_audio_ms:.0f} ms exceeds the tier's {max_first:g} ms")
    if fits and meets:
        reasons.append(f"fits and meets its targets (decode >= {min_decode:g} tok/s, first audio <= {max_first:g} ms)")
    return TierAssessment(tier=tier.name, fits=fits, meets_targets=meets, reasons=tuple(reasons),
                          prediction=prediction, device=device)


# --- tier names ------------------------------------------------------------------------------------


def resolve_tier(registry: Registry, name: str, hw: Hardware, *, gpu: bool = True) -> Tier:
    """A tier by name (any case) or alias: LIGHT/MEDIUM/HEAVY pick the GPU variant when this machine
    has a usable GPU (and `gpu` allows it) and the registry has one, else the CPU variant."""
    key = name.strip().lower()
    if key in registry.tiers:
        return registry.tiers[key]
    variants = [f"{key}_gpu", f"{key}_cpu"] if gpu and usable_gpu(hw) is not None else [f"{key}_cpu"]
    for variant in variants:
        if variant in registry.tiers:
            return registry.tiers[variant]
    known = ", ".join(t.name for t in registry.tiers.values())
    aliases = sorted({t.name.rsplit("_", 1)[0].lower() for t in registry.tiers.values() if "_" in t.name})
    alias_text = f"; aliases: {', '.join(aliases)}" if aliases else ""
    raise PlanError(f"unknown tier {name!r} (known tiers: {known}{alias_text})")


# --- the plan --------------------------------------------------------------------------------------


def make_plan(registry: Registry, hw: Hardware, *, tier: str | None = None, bench: Bench | None = None,
              constraints: Constraints | None = None) -> Plan:
    """Choose a tier for `hw` (or explain `tier` when one is requested) and predict its figures."""
    c = constraints or Constraints()
    ordered = sorted(registry.tiers.values(), key=lambda t: t.rank)
    assessments = tuple(assess(registry, t, hw, bench, c) for t in ordered)
    by_name = {a.tier: a for a in assessments}
    gpu = usable_gpu(hw)
    inputs: dict[str, Any] = {
        "hardware": {"cpu_model": hw.cpu_model, "cpu_cores": hw.cpu_cores, "ram_gb": hw.ram_gb,
                     "gpu": None if gpu is None else {"name": gpu.name, "memory_gb": gpu_memory_gb(gpu)}},
        "bench": ("none: predicted from hardware alone, with the assumptions below" if bench is None else
                  "measured probe rates, scaled by weights bytes (decode) and parameters (prefill, TTFT)"
                  if bench.small is None else
                  "two measured LLMs; per-token costs fitted as a fixed part plus a part proportional to weights "
                  "bytes (decode) or parameters (prefill, TTFT)"),
        "constraints": c.to_dict(),
    }
    if bench is not None:
        inputs["measured"] = {
            "llm": f"probe ({bench.params_b:g}B params, {bench.file_bytes / 1e6:.0f} MB) measured here: decode "
                   f"{bench.decode_tok_s:g} tok/s, prefill {bench.prefill_tok_s:g} tok/s, first token "
                   f"{bench.ttft_ms:g} ms"
                   + ("" if bench.small is None else
                      f"; small LLM ({bench.small.params_b:g}B params, {bench.small.file_bytes / 1e6:.0f} MB) "
                      f"measured here: decode {bench.small.decode_tok_s:g} tok/s, prefill "
                      f"{bench.small.prefill_tok_s:g} tok/s, first token {bench.small.ttft_ms:g} ms"),
        }
        if bench.stt_ms:
            inputs["measured"]["stt"] = (f"{bench.stt_model} measured here: {bench.stt_ms:g} ms for an utterance; "
                                         "scaled by parameters")
        if bench.tts_ms:
            inputs["measured"]["tts"] = (f"{bench.tts_model} measured here: {bench.tts_ms:g} ms for "
                                         f"{bench.tts_words or '?'} words; scaled to {FIRST_SENTENCE_WORDS} words "
                                         "and by voice size")
    if tier is not None:
        chosen_tier = resolve_tier(registry, tier, hw, gpu=c.gpu != "off")
        blocked = c.unavailable.get(chosen_tier.name.lower())
        if blocked:
            raise PlanError(f"tier {chosen_tier.name} cannot be installed from here: {blocked}")
        chosen = by_name[chosen_tier.name]
        why = [f"requested {tier!r} -> {chosen_tier.name}"]
        if not chosen.fits or not chosen.meets_targets:
            why.append("warning: " + "; ".join(r for r in chosen.reasons))
        return Plan(tier=chosen_tier.name, requested=tier, why=tuple(why), chosen=chosen,
                    assessments=assessments, inputs=inputs)
    if c.gpu == "require" and not any(a.fits for a in assessments):
        gpu_tiers = [a for a in assessments if registry.tiers[a.tier.lower()].requirements.get("gpu") is True]
        detail = "; ".join(f"{a.tier}: {'; '.join(a.reasons)}" for a in gpu_tiers) or "the registry has none"
        raise PlanError(f"--gpu: no GPU tier fits this machine: {detail}")
    good = [a for a in assessments if a.fits and a.meets_targets]
    if good:
        chosen = good[-1]
        why = [f"{chosen.tier} is the largest tier that fits this machine and meets its targets"]
        rank = registry.tiers[chosen.tier.lower()].rank
        bigger = [a for a in assessments if registry.tiers[a.tier.lower()].rank > rank]
        why += [f"not {a.tier}: {'; '.join(a.reasons)}" for a in bigger]
    else:
        fitting = [a for a in assessments if a.fits]
        chosen = fitting[0] if fitting else assessments[0]
        why = [f"no tier meets its targets here; {chosen.tier} is the smallest"
               + (" that fits" if fitting else " (and this machine is below even its requirements)")]
        why += [f"{a.tier}: {'; '.join(a.reasons)}" for a in assessments]
    preferred = fallback = None
    if c.unavailable:
        # What would this machine get if every hub answered? If that is more than what it gets, say so.
        ideal = make_plan(registry, hw, bench=bench, constraints=replace(c, unavailable={}))
        if ideal.tier != chosen.tier:
            preferred = ideal.tier
            blocked = c.unavailable.get(ideal.tier.lower(), "it cannot be fetched")
            fallback = (f"{ideal.tier} suits this machine, but {blocked}; installing {chosen.tier} instead "
                        "(--mirror URL fetches from a Hugging Face mirror, --tier picks a tier)")
            why.insert(0, fallback)
    return Plan(tier=chosen.tier, requested=None, why=tuple(why), chosen=chosen, assessments=assessments,
                inputs=inputs, preferred=preferred, fallback=fallback)
