"""The benchmark document the planner reads: measured LLM probe rates plus STT and TTS timings, validated.

`bench.run_bench` writes it; `plan_predict` scales its rates to the models of a tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from local_ai_server.setup.plan_cost import KernelRates
from local_ai_server.setup.registry import RegistryError


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
    # The full document (bench_kernels' blocks: kernels, contention, disk, startup), for the cost model.
    doc: Mapping[str, Any] | None = None

    @property
    def kernels(self) -> KernelRates | None:
        """The per-layer and per-type rates, when the bench measured them (bench version 3 and later)."""
        return None if self.doc is None else KernelRates.from_bench(self.doc)

    def block(self, name: str) -> Mapping[str, Any]:
        """One of the document's measurement blocks (contention, disk, startup), or an empty one."""
        value = None if self.doc is None else self.doc.get(name)
        return value if isinstance(value, Mapping) else {}

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
            doc=_checked(doc),
        )


def _checked(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """`doc` once its kernel block (when there is one) gives usable rates; PlanError naming what is broken."""
    if "kernels" in doc:
        try:
            KernelRates.from_bench(doc)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise PlanError(f"bench kernels block is unusable: {type(exc).__name__}: {exc}") from None
    for name in ("contention", "disk", "startup"):
        if name in doc and doc[name] is not None and not isinstance(doc[name], Mapping):
            raise PlanError(f"bench {name} must be an object")
    return doc


def _words(tts: Any) -> int | None:
    words = tts.get("words") if isinstance(tts, Mapping) else None
    return words if isinstance(words, int) and not isinstance(words, bool) and words > 0 else None

