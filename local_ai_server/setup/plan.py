"""Tier choice: a pure function of hardware, an optional benchmark and the registry.

Each tier's requirements are checked against the machine and its figures predicted (plan_predict, on a
device from plan_devices, scaled from a benchmark document from plan_bench when one was given); the
largest tier that fits and meets its targets wins. Nothing here runs a model or touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from local_ai_server.setup.hardware import Hardware
from local_ai_server.setup.plan_bench import Bench, PlanError
from local_ai_server.setup.plan_devices import (
    LLM_MAX_THREADS,
    STT_MAX_THREADS,
    TTS_MAX_THREADS,
    Device,
    cpu_device,
    gpu_device,
    gpu_memory_gb,
    usable_gpu,
)
from local_ai_server.setup.plan_predict import (
    ANSWER_TOKENS,
    FIRST_SENTENCE_TOKENS,
    FIRST_SENTENCE_WORDS,
    PROMPT_TOKENS,
    QUESTION_WORDS,
    Prediction,
    predict,
    predict_llm,
)
from local_ai_server.setup.registry import Registry, Tier

# The planner's names, with those of its parts that callers import from here.
__all__ = [
    "LLM_MAX_THREADS", "STT_MAX_THREADS", "TTS_MAX_THREADS", "Bench", "Constraints", "Device", "Plan", "PlanError",
    "Prediction", "TierAssessment", "assess", "cpu_device", "make_plan", "predict", "predict_llm", "resolve_tier",
]

# Targets used when a tier does not state its own.
DEFAULT_MIN_DECODE_TOK_S = 10.0
DEFAULT_MAX_FIRST_AUDIO_MS = 1500.0
# MemTotal is below the installed RAM by what the kernel and firmware reserve: an "8 GB" laptop
# reports ~7.6 GiB, and must still count as 8.
RAM_TOLERANCE = 0.9


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
            # The pessimistic end of each figure's range (what the tier was chosen by), which figures were
            # measured on this machine (the others are estimates), and how each was got.
            "prediction_bound": self.chosen.prediction.bounds_dict(),
            "measured_here": list(self.chosen.prediction.measured),
            "how": dict(self.chosen.prediction.how),
            "models": {
                role: {"id": m.id, "display": m.display, "params_b": m.params_b, "quantization": m.quantization,
                       "file_bytes": m.file_bytes, "size_bytes": m.size_bytes}
                for role, m in models.items()
            },
            "inputs": dict(self.inputs) | {"device": self._device_sources()},
            "tiers": [
                {"tier": a.tier, "fits": a.fits, "meets_targets": a.meets_targets, "reasons": list(a.reasons),
                 "llm_device": a.device.kind, "prediction": a.prediction.to_dict(),
                 "prediction_bound": a.prediction.bounds_dict()}
                for a in self.assessments
            ],
        }


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
    # Never optimistic: a tier must meet its targets at the pessimistic end of each predicted range.
    decode, first_audio = prediction.bound("decode_tok_s"), prediction.bound("first_audio_ms")
    if decode < min_decode:
        meets = False
        reasons.append(f"predicted decode {_range(prediction, 'decode_tok_s')} tok/s is below the tier's "
                       f"{min_decode:g}")
    if first_audio > max_first:
        meets = False
        reasons.append(f"predicted first audio {_range(prediction, 'first_audio_ms')} ms exceeds the tier's "
                       f"{max_first:g} ms")
    if fits and meets:
        reasons.append(f"fits and meets its targets (decode >= {min_decode:g} tok/s, first audio <= {max_first:g} ms)")
    return TierAssessment(tier=tier.name, fits=fits, meets_targets=meets, reasons=tuple(reasons),
                          prediction=prediction, device=device)


def _range(prediction: Prediction, key: str) -> str:
    """`p50 (at worst bound)`, e.g. `12.5 (at worst 9.8)`; the p50 alone where both are the same."""
    p50, bound = prediction.to_dict()[key], prediction.bounds_dict().get(key, prediction.to_dict()[key])
    return f"{p50:g}" if p50 == bound else f"{p50:g} (at worst {bound:g})"


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
                  "per-type and per-layer rates measured here (one probe per tensor type, two depth probes); "
                  "each LLM priced by its recorded tensors (registry.json architecture), the embedded LLM "
                  "measured byte for byte" if bench.kernels is not None else
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
