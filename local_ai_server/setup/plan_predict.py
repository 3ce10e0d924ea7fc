"""Performance prediction of a model set on a device: the cost model of one voice turn and of a cold start.

With a benchmark of this CPU (bench version 3):
- the LLM's decode, prefill and first-token figures come from its real tensors priced at the per-type and
  per-layer rates measured here (plan_cost); the embedded LLM, which the bench measures byte for byte, is
  taken as measured;
- STT and TTS scale from the reference models measured here (STT by parameters, TTS by voice size and words);
- the voice turn applies the contention measured here: the first sentence is spoken while the rest of the
  answer decodes, and on few cores the two slow each other down (bench_kernels.measure_contention);
- the cold start (time to /ready) adds the server's measured start without models (to its port), every
  model file read at the disk's measured rate, the LLM's load and its warm-up (the system prompt
  prefilled, two tokens decoded) and the STT and TTS warm-ups.
Without one (or for a GPU), assumed figures per CPU class or GPU table entry (plan_devices) replace the
measurements, and the ranges are wide. Every figure has a p50 and a pessimistic bound; the planner chooses by
the bound. Nothing here runs a model or touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from local_ai_server.setup.plan_bench import Bench
from local_ai_server.setup.plan_cost import (
    Figure,
    LlmCost,
    calibration,
    llm_cost,
    measured_cost,
    reference_errors,
)
from local_ai_server.setup.plan_devices import Device
from local_ai_server.setup.plan_legacy import legacy_llm, predict_llm
from local_ai_server.setup.registry import Model, Registry

__all__ = ["ANSWER_TOKENS", "FIRST_SENTENCE_TOKENS", "FIRST_SENTENCE_WORDS", "PROMPT_TOKENS", "QUESTION_WORDS",
           "Prediction", "llm_figures", "predict", "predict_llm"]

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
# The server's warm-up prefills the default system prompt (~60 tokens) and a "Hi" in the chat template.
WARMUP_PROMPT_TOKENS = 80

# Fixed costs that do not shrink with faster hardware (the LLM's are in plan_legacy).
STT_OVERHEAD_MS = 30.0
TTS_OVERHEAD_MS = 20.0
# Empirical compute constants (ms x GFLOPS per million parameters), calibrated so that faster-whisper
# tiny.en int8 transcribes a 3 s utterance in ~0.4 s and Piper medium speaks a first sentence in
# ~0.2 s on 2 AVX2 cores, which is what the embedded tier does on the reference 2-core machine.
STT_MS_GFLOPS_PER_MPARAM = 410.0
TTS_MS_GFLOPS_PER_MB = 127.0
# Pessimistic margins where nothing was measured: an assumed CPU class or GPU table entry is a guess
# within a factor of ~1.5; a speech model scaled from another one measured here, within ~25%.
ASSUMED_MARGIN = 0.5
SCALED_MARGIN = 0.25
MEASURED_MARGIN = 0.10
# Without a benchmark: what a cold start's disk and the server's own start are assumed to cost.
ASSUMED_DISK_MB_S = 200.0
ASSUMED_START_MS = 3000.0
ASSUMED_LOAD_MS_PER_MB = 0.5


@dataclass(frozen=True)
class Prediction:
    """Predicted figures for one model set on one machine: p50s, pessimistic bounds, and what was measured."""

    decode_tok_s: float
    prefill_tok_s: float
    ttft_ms: float
    stt_ms: float
    tts_first_ms: float
    first_audio_ms: float
    turn_ms: float
    turn_decode_tok_s: float = 0.0
    ready_ms: float = 0.0
    # Pessimistic value per to_dict() key: the lower bound of a rate, the upper bound of a time.
    bounds: Mapping[str, float] = field(default_factory=dict)
    # to_dict() keys measured on this machine (the rest are estimates), and how each figure was got.
    measured: tuple[str, ...] = ()
    how: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        """Rounded, JSON-ready p50 figures."""
        out = {
            "decode_tok_s": round(self.decode_tok_s, 1),
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "ttft_ms": round(self.ttft_ms),
            "stt_ms": round(self.stt_ms),
            "tts_first_sentence_ms": round(self.tts_first_ms),
            "first_audio_ms": round(self.first_audio_ms),
            "voice_turn_ms": round(self.turn_ms),
        }
        if self.turn_decode_tok_s:
            out["turn_decode_tok_s"] = round(self.turn_decode_tok_s, 1)
        if self.ready_ms:
            out["ready_ms"] = round(self.ready_ms)
        return out

    def bounds_dict(self) -> dict[str, float]:
        """Rounded pessimistic bounds, same keys as to_dict()."""
        return {k: round(v, 1) if k.endswith("tok_s") else round(v) for k, v in self.bounds.items()}

    def bound(self, key: str) -> float:
        """The pessimistic value of to_dict()'s `key` (its p50 where no bound was computed)."""
        return float(self.bounds.get(key, self.to_dict()[key]))


def _params_m(model: Model) -> float:
    # Registry entries without params_b are estimated from bytes at ~4.5 bits per weight.
    return (model.params_b if model.params_b else model.file_bytes * 8 / 4.5 / 1e9) * 1000


def llm_figures(llm: Model, device: Device, bench: Bench | None, registry: Registry | None) -> LlmCost:
    """The LLM's decode, prefill and first-token figures on `device`, with bounds and how they were got."""
    if bench is not None and device.kind == "cpu":
        small = bench.doc.get("small_probe") if bench.doc is not None else None
        if isinstance(small, Mapping) and small.get("model") == llm.id and small.get("file_bytes") == llm.file_bytes:
            return measured_cost(small)
        rates = bench.kernels
        if rates is not None and llm.shape is not None:
            refs = _references(bench, registry)
            calib = calibration(rates, refs)
            return llm_cost(llm.shape, rates, reference_errors(rates, refs, calib), calib)
        decode, prefill, ttft = predict_llm(bench, llm.file_bytes, _params_m(llm) / 1000)
        return LlmCost(Figure(decode, decode / (1 + SCALED_MARGIN)), Figure(prefill, prefill / (1 + SCALED_MARGIN)),
                       Figure(ttft, ttft * (1 + SCALED_MARGIN)),
                       "scaled from the probes by file size and parameters (no per-type rates in this benchmark)")
    # From the device's description: still by the model's real tensors where they are recorded (the bytes a
    # token streams, the layer weights a prompt token multiplies), else by file size and parameter count.
    nbytes = sum(llm.shape.decode_bytes().values()) if llm.shape is not None else llm.file_bytes
    params_b = sum(llm.shape.layer_params().values()) / 1e9 if llm.shape is not None else _params_m(llm) / 1000
    decode, prefill, ttft = legacy_llm(nbytes, params_b, device, PROMPT_TOKENS)
    margin = ASSUMED_MARGIN if "unknown GPU" not in device.sources.get("compute", "") else 2 * ASSUMED_MARGIN
    return LlmCost(Figure(decode, decode / (1 + margin)), Figure(prefill, prefill / (1 + margin)),
                   Figure(ttft, ttft * (1 + margin)), f"assumed from the {device.kind}'s description (no benchmark)")


def _references(bench: Bench, registry: Registry | None) -> list[tuple[Any, Mapping[str, Any]]]:
    """The LLMs the bench measured whose shapes the registry knows: the cost model's check on this machine."""
    if registry is None or bench.doc is None:
        return []
    out = []
    for key in ("probe", "small_probe"):
        probe = bench.doc.get(key)
        model = registry.models.get(str(probe.get("model"))) if isinstance(probe, Mapping) else None
        if model is not None and model.shape is not None and isinstance(probe, Mapping):
            out.append((model.shape, probe))
    return out


def predict(models: Mapping[str, Model], device: Device, bench: Bench | None = None,
            registry: Registry | None = None) -> Prediction:
    """Predicted figures of an (stt, llm, tts) set on `device`; `bench` (CPU measurements) overrides assumptions."""
    stt, llm, tts = models["stt"], models["llm"], models["tts"]
    cost = llm_figures(llm, device, bench, registry)
    measured = [k for k, f in (("decode_tok_s", cost.decode_tok_s), ("prefill_tok_s", cost.prefill_tok_s),
                               ("ttft_ms", cost.ttft_ms)) if f.measured]
    how = {"llm": cost.how}
    stt_fig = _assumed(STT_OVERHEAD_MS + STT_MS_GFLOPS_PER_MPARAM * _params_m(stt) / device.stt_gflops)
    tts_fig = _assumed(TTS_OVERHEAD_MS + TTS_MS_GFLOPS_PER_MB * (tts.file_bytes / 1e6) / device.tts_gflops)
    how["stt"] = how["tts"] = "assumed from the hardware description"
    if bench is not None and registry is not None:
        # Measured STT/TTS of a known model scale by size to the planned model (same CPU either way,
        # except STT on CUDA, which the CPU measurement says nothing about).
        ref_stt = registry.models.get(bench.stt_model)
        stt_on_cuda = device.kind == "gpu" and "CUDA" in device.sources.get("stt", "")
        if bench.stt_ms and ref_stt is not None and not stt_on_cuda:
            same = ref_stt.id == stt.id
            stt_fig = _scaled(bench.stt_ms * _params_m(stt) / _params_m(ref_stt), same)
            measured += ["stt_ms"] if same else []
            how["stt"] = f"{ref_stt.id} measured here" + ("" if same else ", scaled by parameters")
        ref_tts = registry.models.get(bench.tts_model)
        if bench.tts_ms and ref_tts is not None:
            # Scaled by voice size, and from the benchmark sentence's length to a first sentence's.
            words = FIRST_SENTENCE_WORDS / bench.tts_words if bench.tts_words else 1.0
            tts_fig = _scaled(bench.tts_ms * words * tts.file_bytes / ref_tts.file_bytes, ref_tts.id == tts.id)
            how["tts"] = f"{ref_tts.id} measured here, scaled to {FIRST_SENTENCE_WORDS} words and by voice size"
    turn = _turn(cost, stt_fig, tts_fig, bench if device.kind == "cpu" else None, how)
    ready = _ready(models, cost, stt_fig, tts_fig, bench, registry, how)
    figures = {"decode_tok_s": cost.decode_tok_s, "prefill_tok_s": cost.prefill_tok_s, "ttft_ms": cost.ttft_ms,
               "stt_ms": stt_fig, "tts_first_sentence_ms": turn["tts"], "first_audio_ms": turn["first_audio"],
               "voice_turn_ms": turn["turn"], "turn_decode_tok_s": turn["decode"], "ready_ms": ready}
    return Prediction(
        decode_tok_s=cost.decode_tok_s.p50, prefill_tok_s=cost.prefill_tok_s.p50, ttft_ms=cost.ttft_ms.p50,
        stt_ms=stt_fig.p50, tts_first_ms=turn["tts"].p50, first_audio_ms=turn["first_audio"].p50,
        turn_ms=turn["turn"].p50, turn_decode_tok_s=turn["decode"].p50, ready_ms=ready.p50,
        bounds={k: f.bound for k, f in figures.items()}, measured=tuple(measured), how=how)


def _assumed(value: float) -> Figure:
    return Figure(value, value * (1 + ASSUMED_MARGIN))


def _scaled(value: float, same: bool) -> Figure:
    return Figure(value, value * (1 + (MEASURED_MARGIN if same else SCALED_MARGIN)), measured=same)


def _turn(cost: LlmCost, stt: Figure, tts: Figure, bench: Bench | None, how: dict[str, str]) -> dict[str, Figure]:
    """First audio, the turn's decode rate and the whole turn, with TTS and decode sharing the CPU.

    The first sentence decodes alone; it is then spoken while the rest of the answer decodes, each slowed by
    the contention the bench measured (none assumed without a measurement: the ranges are wide then anyway).
    """
    block = bench.block("contention") if bench is not None else {}
    dec_f = float(block.get("decode_factor") or 1.0)
    tts_f = float(block.get("tts_factor") or 1.0)
    if block:
        how["turn"] = (f"contention measured here: while Piper speaks the LLM decodes at {dec_f:.0%} of its rate "
                       f"and Piper takes {tts_f:.0%} of its time")

    def one(decode: float, ttft: float, stt_ms: float, tts_ms: float) -> tuple[float, float, float, float]:
        spoken = tts_ms * tts_f
        first_audio = stt_ms + ttft + (FIRST_SENTENCE_TOKENS - 1) / decode * 1000 + spoken
        rest = ANSWER_TOKENS - FIRST_SENTENCE_TOKENS
        during = min(rest, spoken / 1000 * decode * dec_f)
        rest_s = during / (decode * dec_f) + (rest - during) / decode
        answer_s = (FIRST_SENTENCE_TOKENS - 1) / decode + rest_s
        turn_decode = (ANSWER_TOKENS - 1) / answer_s
        return spoken, first_audio, turn_decode, stt_ms + ttft + answer_s * 1000 + spoken

    p50 = one(cost.decode_tok_s.p50, cost.ttft_ms.p50, stt.p50, tts.p50)
    worst = one(cost.decode_tok_s.bound, cost.ttft_ms.bound, stt.bound, tts.bound)
    return {"tts": Figure(p50[0], worst[0]), "first_audio": Figure(p50[1], worst[1]),
            "decode": Figure(p50[2], worst[2]), "turn": Figure(p50[3], worst[3])}


def _ready(models: Mapping[str, Model], cost: LlmCost, stt: Figure, tts: Figure, bench: Bench | None,
           registry: Registry | None, how: dict[str, str]) -> Figure:
    """A cold start: the server's own start, every file read from disk, the models' loads and warm-ups.

    With a benchmark that started the real server on the reference tier (files in the page cache), that
    start is the base, and only what differs is modelled: this tier's LLM load and warm-up against the
    reference LLM's, its speech models' warm-ups against the reference ones', and the cold read of its files.
    """
    startup = bench.block("startup") if bench is not None else {}
    disk = bench.block("disk") if bench is not None else {}
    rate = float(disk.get("read_mb_s") or ASSUMED_DISK_MB_S)
    load_per_mb = ASSUMED_LOAD_MS_PER_MB
    doc = bench.doc if bench is not None and bench.doc is not None else {}
    probe = doc.get("probe")
    if isinstance(probe, Mapping) and probe.get("load_ms") and probe.get("file_bytes"):
        load_per_mb = float(probe["load_ms"]) / (float(probe["file_bytes"]) / 1e6)
    total_mb = sum(m.size_bytes for m in models.values()) / 1e6
    read_ms = total_mb / rate * 1000

    def llm_ms(llm_mb: float, prefill: float, decode: float) -> float:
        return llm_mb * load_per_mb + WARMUP_PROMPT_TOKENS / prefill * 1000 + 2 / decode * 1000

    def own(c: LlmCost, stt_ms: float, tts_ms: float, worst: bool) -> float:
        pick = (lambda f: f.bound) if worst else (lambda f: f.p50)
        return llm_ms(models["llm"].file_bytes / 1e6, pick(c.prefill_tok_s), pick(c.decode_tok_s)) + stt_ms + tts_ms

    base = _reference_start(startup, doc, registry, llm_ms)
    measured_inputs = bool(disk.get("read_mb_s")) and (base is not None or bool(startup.get("port_open_ms")))
    if base is not None:
        warm_ms, ref_ms = base
        how["ready"] = (f"the server started here on the {startup['ready_tier']} tier in {warm_ms:.0f} ms (files "
                        f"cached); this tier's models load and warm up in {own(cost, stt.p50, tts.p50, False):.0f} "
                        f"ms against {ref_ms:.0f}; {total_mb:.0f} MB read at the disk's measured {rate:.0f} MB/s")
        p50 = warm_ms + read_ms + own(cost, stt.p50, tts.p50, False) - ref_ms
        worst = (warm_ms + read_ms) * (1 + 3 * MEASURED_MARGIN) + own(cost, stt.bound, tts.bound, True) - ref_ms
        return Figure(max(p50, warm_ms), max(worst, p50))
    start_ms = float(startup.get("port_open_ms") or ASSUMED_START_MS)
    how["ready"] = ((f"the server's start without models measured here ({start_ms:.0f} ms to its port), "
                     f"{total_mb:.0f} MB read at the disk's measured {rate:.0f} MB/s, the models' loads and "
                     f"warm-ups ({WARMUP_PROMPT_TOKENS} prompt tokens and 2 decoded by the LLM)")
                    if measured_inputs else
                    f"assumed: start {start_ms:.0f} ms, disk {rate:.0f} MB/s (no benchmark of this machine)")
    slow = 1 + (MEASURED_MARGIN * 3 if measured_inputs else 2 * ASSUMED_MARGIN)
    return Figure(start_ms + read_ms + own(cost, stt.p50, tts.p50, False),
                  (start_ms + read_ms) * slow + own(cost, stt.bound, tts.bound, True) * slow)


def _reference_start(startup: Mapping[str, Any], doc: Mapping[str, Any], registry: Registry | None,
                     llm_ms: Any) -> tuple[float, float] | None:
    """(the measured warm start of the reference tier, what its models' loads and warm-ups cost by this model)."""
    warm = startup.get("ready_ms_warm")
    tier = registry.tiers.get(str(startup.get("ready_tier", "")).lower()) if registry is not None else None
    small = doc.get("small_probe")
    if not warm or tier is None or registry is None or not isinstance(small, Mapping):
        return None
    ref_llm = registry.models[tier.models["llm"]]
    if small.get("model") != ref_llm.id:
        return None
    words = doc.get("tts", {}).get("words") if isinstance(doc.get("tts"), Mapping) else None
    stt_ms = float(doc.get("stt_ms") or 0.0)
    # As the tier's TTS figure is: scaled from the benchmark sentence to a first sentence.
    tts_ms = float(doc.get("tts_ms") or 0.0) * (FIRST_SENTENCE_WORDS / words if words else 1.0)
    ref = llm_ms(ref_llm.file_bytes / 1e6, float(small["prefill_tok_s"]), float(small["decode_tok_s"]))
    return float(warm), ref + stt_ms + tts_ms
