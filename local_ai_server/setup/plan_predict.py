"""Performance prediction of a model set on a device: the cost model of one voice turn.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from local_ai_server.setup.plan_bench import Bench, ProbePoint
from local_ai_server.setup.plan_devices import Device
from local_ai_server.setup.registry import Model, Registry

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

