"""An LLM's per-token cost on this CPU: its real tensors (llm_shape) priced at rates the bench measured here.

    decode ms/token   = overhead(layers) + sum over tensor types of (MB a token streams) x (ms per MB of that type)
    prefill ms/token  = overhead(layers) + sum over types of (M layer weights) x (ms per M weights of that type),
                        in a 128-token batch
    first token ms    = overhead(layers) + 25 x the same with the rates of a 25-token batch
                        + one pass over the output projection (its MB at its type's decode rate)

The overheads (a thread hand-off per operation of every layer, sampling: what dominates small models on few
cores) are lines through two tiny probes of 2 and 32 layers; the per-type rates come from one probe per
tensor type whose every matrix is of that type (bench_kernels measures both). A model the bench measured
itself (the embedded LLM, byte for byte) is taken as measured, not modelled.

Every figure comes as a p50 and a pessimistic bound: the bound widens with the measurement's own noise
(the spread of its repeats), with how far the model's two measured references (a TinyLlama-shaped probe and
the embedded LLM) were off when predicted the same way, and with how far the model lies from the probes
(its bytes per token beyond the biggest type probe's, a tensor type no probe measured).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from local_ai_server.setup.llm_shape import LlmShape

TTFT_TOKENS = 25  # bench_llm.TTFT_TOKENS: a 10-word question in its chat template
# The least a pessimistic bound adds: run-to-run drift on a shared machine is rarely below this.
MIN_MARGIN = 0.10
# Added per doubling of a model's bytes per token beyond the biggest type probe's: caches and TLBs stop
# helping, and nothing here measured that size.
MARGIN_PER_DOUBLING = 0.04
# A tensor type no probe measured is priced as the nearest measured one by bits per weight, with this margin.
UNMEASURED_TYPE_MARGIN = 0.25
MAX_MARGIN = 1.0


@dataclass(frozen=True)
class Line:
    """y = a + b * x, through two measured points."""

    a: float
    b: float

    @classmethod
    def through(cls, x1: float, y1: float, x2: float, y2: float) -> Line:
        """The line through two points, with a non-negative slope and intercept (noise can give neither)."""
        b = max(0.0, (y2 - y1) / (x2 - x1)) if x2 != x1 else 0.0
        return cls(max(0.0, y1 - b * x1), b)

    def at(self, x: float) -> float:
        """The line's value at x."""
        return self.a + self.b * x


@dataclass(frozen=True)
class Figure:
    """A predicted figure: its median, its pessimistic bound, and whether it was measured here or estimated."""

    p50: float
    bound: float
    measured: bool = False

    def scaled(self, factor: float) -> Figure:
        """Both values times `factor`."""
        return Figure(self.p50 * factor, self.bound * factor, self.measured)


@dataclass(frozen=True)
class LlmCost:
    """An LLM's predicted decode and prefill rates (tok/s) and first-token time (ms), with how they were got."""

    decode_tok_s: Figure
    prefill_tok_s: Figure
    ttft_ms: Figure
    how: str


@dataclass(frozen=True)
class KernelRates:
    """What bench_kernels measured: per-layer overheads and per-type costs, plus the noise of the measurement."""

    decode_overhead: Line  # ms per decoded token vs layers
    prefill_overhead: Line  # ms per prompt token (128-token batch) vs layers
    ttft_overhead: Line  # ms for a 25-token prompt vs layers
    decode_ms_per_mb: Mapping[str, float]
    prefill_ms_per_mparam: Mapping[str, float]
    ttft_ms_per_mparam: Mapping[str, float]
    probe_decode_mb: float  # the biggest type probe's MB per token
    spread: float  # relative spread of the repeats (max/min - 1), the measurement's own noise

    @classmethod
    def from_bench(cls, doc: Mapping[str, Any], *, basis: str = "wall") -> KernelRates | None:
        """The rates in a bench document's `kernels` block; None when it has none (an older bench).

        `basis` "cpu": from the CPU time each probe got instead of its wall time (bench_check compares a
        model's own CPU-time figures with these, which takes the other work on a shared machine out).
        """
        kernels = doc.get("kernels")
        if not isinstance(kernels, Mapping):
            return None
        depth, types = kernels.get("depth"), kernels.get("types")
        if not isinstance(depth, Mapping) or len(depth) < 2 or not isinstance(types, Mapping) or not types:
            return None
        if basis == "cpu":
            depth = {k: _on_cpu(v) for k, v in depth.items()}
            types = {k: _on_cpu(v) for k, v in types.items()}
        ordered = sorted(depth.values(), key=lambda d: d["n_layer"])
        shallow, deep = ordered[0], ordered[-1]
        lines = {key: Line.through(shallow["n_layer"], _ms(shallow, key), deep["n_layer"], _ms(deep, key))
                 for key in ("decode_tok_s", "prefill_tok_s", "ttft_ms")}
        dec: dict[str, float] = {}
        pre: dict[str, float] = {}
        first: dict[str, float] = {}
        spreads = [_spread(d) for d in depth.values()]
        biggest = 0.0
        for kind, probe in types.items():
            n_layer = probe["n_layer"]
            mb = sum(probe["decode_bytes"].values()) / 1e6
            mparams = sum(probe["layer_params"].values()) / 1e6
            out_mb = probe["output_bytes"] / 1e6
            biggest = max(biggest, mb)
            dec[kind] = max(1e-6, (_ms(probe, "decode_tok_s") - lines["decode_tok_s"].at(n_layer)) / mb)
            pre[kind] = max(1e-6, (_ms(probe, "prefill_tok_s") - lines["prefill_tok_s"].at(n_layer)) / mparams)
            first[kind] = max(1e-6, (_ms(probe, "ttft_ms") - lines["ttft_ms"].at(n_layer) - out_mb * dec[kind])
                              / (TTFT_TOKENS * mparams))
            spreads.append(_spread(probe))
        return cls(decode_overhead=lines["decode_tok_s"], prefill_overhead=lines["prefill_tok_s"],
                   ttft_overhead=lines["ttft_ms"], decode_ms_per_mb=dec, prefill_ms_per_mparam=pre,
                   ttft_ms_per_mparam=first, probe_decode_mb=biggest, spread=max(spreads, default=0.0))

    def rate(self, table: Mapping[str, float], kind: str) -> tuple[float, bool]:
        """The rate of `kind` in `table`, and whether it was measured (else: the nearest type by bits per weight)."""
        if kind in table:
            return table[kind], True
        from local_ai_server.setup.llm_shape import TYPE_SIZES

        bits = {k: TYPE_SIZES[k][1] * 8 / TYPE_SIZES[k][0] for k in TYPE_SIZES}
        nearest = min(table, key=lambda k: abs(bits[k] - bits.get(kind, 4.5)))
        return table[nearest], False

    def raw(self, shape: LlmShape) -> tuple[float, float, float, bool]:
        """(decode ms/token, prefill ms/token, first-token ms, every type measured) of `shape`, unrounded."""
        every = True
        decode = self.decode_overhead.at(shape.n_layer)
        for kind, nbytes in shape.decode_bytes().items():
            rate, known = self.rate(self.decode_ms_per_mb, kind)
            decode += nbytes / 1e6 * rate
            every &= known
        prefill = self.prefill_overhead.at(shape.n_layer)
        first = self.ttft_overhead.at(shape.n_layer)
        for kind, params in shape.layer_params().items():
            rate, known = self.rate(self.prefill_ms_per_mparam, kind)
            prefill += params / 1e6 * rate
            rate25, _ = self.rate(self.ttft_ms_per_mparam, kind)
            first += TTFT_TOKENS * params / 1e6 * rate25
            every &= known
        out = shape.output_spec
        first += out.nbytes / 1e6 * self.rate(self.decode_ms_per_mb, out.type)[0]
        return decode, prefill, first, every


def _on_cpu(probe: Mapping[str, Any]) -> dict[str, Any]:
    """A probe's figures as CPU time would give them (its `cpu` block); KeyError when it has none."""
    cpu = probe["cpu"]
    return dict(probe) | {k: cpu[k] for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms")} | {"runs": cpu["runs"]}


def _ms(probe: Mapping[str, Any], key: str) -> float:
    value = float(probe[key])
    return value if key == "ttft_ms" else 1000.0 / value


def _spread(probe: Mapping[str, Any]) -> float:
    runs = probe.get("runs") or {}
    worst = 0.0
    for values in runs.values():
        values = [float(v) for v in values if v]
        if len(values) >= 2:
            worst = max(worst, max(values) / min(values) - 1.0)
    return worst


FIGURES = ("decode_tok_s", "prefill_tok_s", "ttft_ms")
References = list[tuple[LlmShape, Mapping[str, Any]]]


def _times(rates: KernelRates, shape: LlmShape, calibration: Mapping[str, float] | None) -> dict[str, float]:
    """Modelled ms per decoded token, ms per prompt token and first-token ms, times the calibration."""
    decode, prefill, first, _ = rates.raw(shape)
    c = calibration or {}
    return {"decode_tok_s": decode * c.get("decode_tok_s", 1.0), "prefill_tok_s": prefill * c.get("prefill_tok_s", 1.0),
            "ttft_ms": first * c.get("ttft_ms", 1.0)}


def _measured_times(measured: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(measured[k]) if k == "ttft_ms" else 1000.0 / float(measured[k]) for k in FIGURES}


def calibration(rates: KernelRates, references: References) -> dict[str, float]:
    """Per figure, what the measured reference LLMs took over what the model gave them (geometric mean).

    The per-type probes are 4 layers of one width; whole models of other widths run their matrix kernels
    a little differently (a consistent ~15 % at prefill on the 2-core EPYC): the references, measured in the
    same benchmark, take that out. Clamped to a factor of 2 either way: beyond that something is broken.
    """
    logs: dict[str, list[float]] = {k: [] for k in FIGURES}
    for shape, measured in references:
        model, real = _times(rates, shape, None), _measured_times(measured)
        for key in FIGURES:
            logs[key].append(math.log(real[key] / model[key]))
    return {k: min(2.0, max(0.5, math.exp(sum(v) / len(v)))) for k, v in logs.items() if v}


def reference_errors(rates: KernelRates, references: References,
                     calibration: Mapping[str, float] | None = None) -> dict[str, float]:
    """How far the (calibrated) model was off on LLMs the bench measured, per figure: the largest such error."""
    worst = {k: 0.0 for k in FIGURES}
    for shape, measured in references:
        model, real = _times(rates, shape, calibration), _measured_times(measured)
        for key in FIGURES:
            worst[key] = max(worst[key], abs(model[key] - real[key]) / real[key])
    return worst


def llm_cost(shape: LlmShape, rates: KernelRates, ref_errors: Mapping[str, float],
             calibration: Mapping[str, float] | None = None) -> LlmCost:
    """The modelled figures of `shape` (times the references' calibration), each with its pessimistic bound."""
    _, _, _, every = rates.raw(shape)
    t = _times(rates, shape, calibration)
    decode, prefill, first = t["decode_tok_s"], t["prefill_tok_s"], t["ttft_ms"]
    margin = max(MIN_MARGIN, rates.spread)
    total_mb = sum(shape.decode_bytes().values()) / 1e6
    if total_mb > rates.probe_decode_mb > 0:
        margin += MARGIN_PER_DOUBLING * math.log2(total_mb / rates.probe_decode_mb)
    if not every:
        margin += UNMEASURED_TYPE_MARGIN

    def fig(value: float, key: str, rate: bool) -> Figure:
        m = min(MAX_MARGIN, margin + ref_errors.get(key, 0.0))
        return Figure(value, value / (1 + m) if rate else value * (1 + m))

    how = (f"modelled from its {shape.n_layer} layers and its tensors ({_mix(shape)}) at the rates measured here"
           + (f", calibrated on the reference LLMs measured beside them (x{calibration.get('decode_tok_s', 1):.2f} "
              f"decode, x{calibration.get('prefill_tok_s', 1):.2f} prefill, x{calibration.get('ttft_ms', 1):.2f} "
              "first token, in time)" if calibration else "")
           + ("" if every else "; a tensor type no probe measured is priced as the nearest measured one"))
    return LlmCost(decode_tok_s=fig(1000.0 / decode, "decode_tok_s", True),
                   prefill_tok_s=fig(1000.0 / prefill, "prefill_tok_s", True),
                   ttft_ms=fig(first, "ttft_ms", False), how=how)


def measured_cost(probe: Mapping[str, Any]) -> LlmCost:
    """Figures the bench measured on the very file: p50 the median, the bound its worst repeat (and 10%)."""

    def fig(key: str, rate: bool) -> Figure:
        value = float(probe[key])
        runs = [float(v) for v in (probe.get("runs") or {}).get(key, []) if v] or [value]
        worst = min(runs) if rate else max(runs)
        bound = min(worst, value / (1 + MIN_MARGIN)) if rate else max(worst, value * (1 + MIN_MARGIN))
        return Figure(value, bound, measured=True)

    return LlmCost(decode_tok_s=fig("decode_tok_s", True), prefill_tok_s=fig("prefill_tok_s", True),
                   ttft_ms=fig("ttft_ms", False), how="measured here on this very file by the benchmark")


def _mix(shape: LlmShape) -> str:
    total = sum(shape.decode_bytes().values())
    parts = sorted(shape.decode_bytes().items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / total:.0%}" for k, v in parts) + f" of {total / 1e6:.0f} MB per token"
