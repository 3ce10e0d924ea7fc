"""The LLM estimates used where the real cost model (plan_cost) cannot run: no shape, no per-type rates, a GPU.

- From a benchmark without per-type rates (bench version 2, or a model without a recorded shape): the
  per-token cost is a line through the two measured LLMs, a fixed part plus a part proportional to file
  bytes (decode) or parameters (prefill, first token); with one measured LLM, costs scale proportionally.
- From the hardware description alone: decode streams the weights at the assumed bandwidth, prefill
  costs 2 FLOPs per parameter at the assumed FLOPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from local_ai_server.setup.plan_bench import Bench, ProbePoint
from local_ai_server.setup.plan_devices import Device

CPU_TOKEN_OVERHEAD_S = 0.002
GPU_TOKEN_OVERHEAD_S = 0.003
TTFT_OVERHEAD_MS = 15.0


def predict_llm(bench: Bench, file_bytes: int, params_b: float) -> tuple[float, float, float]:
    """(decode tok/s, prefill tok/s, time to first token ms) of an LLM of this size, from the measured probes."""
    points = bench.points
    decode = 1000.0 / _fit(points, file_bytes, lambda p: p.file_bytes, lambda p: 1000.0 / p.decode_tok_s)
    prefill = 1000.0 / _fit(points, params_b, lambda p: p.params_b, lambda p: 1000.0 / p.prefill_tok_s)
    ttft = _fit(points, params_b, lambda p: p.params_b, lambda p: p.ttft_ms)
    return decode, prefill, ttft


def legacy_llm(file_bytes: int, params_b: float, device: Device, prompt_tokens: int) -> tuple[float, float, float]:
    """(decode tok/s, prefill tok/s, first token ms) from the device's assumed bandwidth and FLOPS."""
    overhead = GPU_TOKEN_OVERHEAD_S if device.kind == "gpu" else CPU_TOKEN_OVERHEAD_S
    decode = 1.0 / (file_bytes / (device.bandwidth_gbs * 1e9) + overhead)
    prefill = device.llm_gflops * 1e9 / (2 * params_b * 1e9)
    return decode, prefill, prompt_tokens / prefill * 1000 + TTFT_OVERHEAD_MS


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
