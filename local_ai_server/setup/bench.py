"""The installer's benchmark: measure a probe LLM, STT and TTS on this machine, cached per hardware fingerprint.

The LLM probe is TinyLlama-1.1B-Chat Q4_K_M: the real file when it is installed, else a file with its
exact shapes and random weights (setup/probe.py), which decodes at the same speed (bench_inputs picks it).
The LLM is measured in a child process (bench_llm), STT and TTS in process (bench_speech). The result is
the document `plan.Bench.from_dict` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from local_ai_server.setup.bench_inputs import (
    PROBE_MODEL_ID,
    PROBE_QUANT,
    PROBE_SHAPE,
    REFERENCE_TIER,
    is_installed,
    random_probe_path,
    real_probe_path,
    speech_models,
)
from local_ai_server.setup.bench_inputs import choose_probe as _choose_probe  # the name run_bench and tests use
from local_ai_server.setup.bench_kernels import (
    kernel_types,
    measure_contention,
    measure_disk,
    measure_kernels,
    measure_server_start,
)
from local_ai_server.setup.bench_llm import BenchError, main, probe_llm
from local_ai_server.setup.bench_speech import (
    DEFAULT_STT_MODEL,
    DEFAULT_TTS_MODEL,
    SPEECH_RUNS,
    STT_SENTENCE,
    TTS_SENTENCE,
    SttMeasurement,
    measure_stt,
    probe_tts,
    word_error_rate,
)
from local_ai_server.setup.fetch import LogFn, structlog_log
from local_ai_server.setup.hardware import Hardware
from local_ai_server.setup.jsonfile import write_json_atomic
from local_ai_server.setup.plan import LLM_MAX_THREADS, STT_MAX_THREADS, TTS_MAX_THREADS, Bench, PlanError
from local_ai_server.setup.probe import build_probe
from local_ai_server.setup.probe_typed import build_typed_probe
from local_ai_server.setup.registry import Model, Registry

# The bench's names, with those of its parts that callers import from here.
__all__ = [
    "BENCH_VERSION", "PROBE_MODEL_ID", "STT_MAX_WER", "BenchError", "SttMeasurement", "cache_path", "engines_digest",
    "fingerprint", "llama_cpp_version", "main", "measure_stt", "probe_llm", "probe_stt", "probe_tts",
    "random_probe_path", "real_probe_path", "run_bench", "word_error_rate",
]

# Bump when what is measured or how changes: older cached results are then never reused.
# 3: per-type and per-layer rates, contention with TTS, disk read rate and import time (bench_kernels).
BENCH_VERSION = 3
# The word error rate an STT probe may have; probe_stt and run_bench read it from here (tests patch it).
STT_MAX_WER = 0.2


def probe_stt(model_dir: Path, threads: int, *, voice_path: Path | None = None, text: str = STT_SENTENCE,
              runs: int = SPEECH_RUNS) -> float:
    """Median ms for faster-whisper to transcribe a ~3 s utterance; BenchError if the transcript is wrong."""
    result = measure_stt(model_dir, threads, voice_path=voice_path, text=text, runs=runs)
    if result.wer > STT_MAX_WER:
        raise BenchError(f"STT probe: heard {result.transcript!r} for {text!r} (WER {result.wer:.0%})")
    return result.ms


# --- fingerprint and cache ---------------------------------------------------------------------------


def llama_cpp_version() -> str:
    """Installed llama-cpp-python version (without importing it), or "none"."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return "none"


def engines_digest() -> str:
    """Hash of the engine adapters the bench measures through: a change to them re-measures.

    The STT engine's short window made a transcript 5x faster, and a result cached before it went on
    predicting the old time (412 ms predicted, 58 ms measured by `verify`).
    """
    engines = Path(__file__).resolve().parent.parent / "engines"
    h = hashlib.sha256()
    for path in sorted(engines.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(hw: Hardware) -> str:
    """Stable short hash of what the measurement depends on: hardware, OS, llama.cpp, engines, BENCH_VERSION."""
    doc = {
        "cpu_model": hw.cpu_model,
        "cores": hw.cpu_cores,
        "threads": hw.cpu_threads,
        "flags": sorted(hw.cpu_flags),
        "ram_gb": round(hw.ram_gb),  # MemTotal wobbles by a few MB between kernels
        "gpus": sorted(f"{g.vendor}:{g.name}:{round(g.vram_gb)}" for g in hw.gpus),
        "os": hw.os,
        "arch": hw.arch,
        "llama_cpp": llama_cpp_version(),
        "bench_version": BENCH_VERSION,
        "engines": engines_digest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, hw: Hardware) -> Path:
    """Where the bench result of `hw` is cached."""
    return Path(cache_dir) / f"bench-{fingerprint(hw)}.json"


def run_bench(
    *,
    hardware: Hardware,
    models_dir: Path,
    registry: Registry,
    cache_dir: Path,
    probe_path: Path | None = None,
    refresh: bool = False,
    threads: int | None = None,
    log: LogFn = structlog_log,
) -> dict[str, Any]:
    """Benchmark this machine (or return the cached result for its fingerprint); a `Bench.from_dict` document.

    Probe: `probe_path` if given, else the installed real TinyLlama file, else a TinyLlama-shaped random
    probe built once under cache_dir/probes. STT and TTS use the embedded tier's models (else the
    selected ones) when present in `models_dir`; absent ones give null with a note.
    """
    cache_dir = Path(cache_dir)
    fp = fingerprint(hardware)
    cached_file = cache_path(cache_dir, hardware)
    probe_file, source = _choose_probe(registry, Path(models_dir), cache_dir, probe_path)
    if not refresh:
        cached = _read_cached(cached_file, probe_file)
        if cached is not None:
            log("bench.cached", path=str(cached_file), fingerprint=fp, measured_at=cached.get("measured_at"))
            return cached
    log("bench.start", fingerprint=fp, probe=str(probe_file), source=source)
    if source == "tinyllama-shaped-random" and not probe_file.is_file():
        started = time.monotonic()
        reference = registry.models.get(PROBE_MODEL_ID)
        if reference is not None and reference.shape is not None:
            build_typed_probe(reference.shape, probe_file, log=log)  # its recorded tensor types, in seconds
        else:
            build_probe(PROBE_SHAPE, probe_file, quant=PROBE_QUANT, log=log)
        log("bench.probe_built", path=str(probe_file), s=round(time.monotonic() - started, 1))

    llm_threads = threads or max(1, min(hardware.cpu_cores, LLM_MAX_THREADS))
    stt_threads = threads or max(1, min(hardware.cpu_cores, STT_MAX_THREADS))
    tts_threads = threads or max(1, min(hardware.cpu_cores // 2, TTS_MAX_THREADS))
    notes: list[str] = []
    llm = probe_llm(probe_file, threads=llm_threads)
    if source == "given-file" and llm.get("general_name") == f"probe-{PROBE_SHAPE.name}":
        source = "tinyllama-shaped-random"
    log("bench.llm", decode_tok_s=llm["decode_tok_s"], prefill_tok_s=llm["prefill_tok_s"], ttft_ms=llm["ttft_ms"],
        rss_mb=llm["rss_mb"], load_ms=llm["load_ms"])

    small = _small_probe(registry, Path(models_dir), llm_threads, notes, log)

    stt_model, voice, tts_model = speech_models(registry, Path(models_dir))
    stt_ms: float | None = None
    tts_ms: float | None = None
    stt_detail: dict[str, Any] | None = None
    if stt_model is None or voice is None:
        notes.append("STT not measured: no installed whisper model and Piper voice in the models dir")
    else:
        result = measure_stt(Path(models_dir) / stt_model.dest, stt_threads, voice_path=Path(models_dir) / voice.dest)
        if result.wer > STT_MAX_WER:
            raise BenchError(f"STT probe: heard {result.transcript!r} for {result.expected!r} (WER {result.wer:.0%})")
        stt_ms = result.ms
        stt_detail = {"transcript": result.transcript, "wer": result.wer, "audio_s": result.audio_s,
                      "threads": stt_threads, "voice": voice.id}
        log("bench.stt", model=stt_model.id, ms=stt_ms, wer=result.wer)
    if tts_model is None:
        notes.append("TTS not measured: no installed Piper voice in the models dir")
    else:
        tts_ms = probe_tts(Path(models_dir) / tts_model.dest, tts_threads)
        log("bench.tts", model=tts_model.id, ms=tts_ms)

    kernels = measure_kernels(kernel_types(m.shape for m in registry.models.values() if m.shape is not None),
                              cache_dir / "probes", llm_threads, log)
    contention = None
    small_model = reference_llm(registry, Path(models_dir))
    if small_model is not None and tts_model is not None:
        contention = measure_contention(Path(models_dir) / small_model.dest, llm_threads,
                                        Path(models_dir) / tts_model.dest, tts_threads, log=log)
    else:
        notes.append("contention not measured: the embedded LLM and a Piper voice must be installed")
    disk = measure_disk(probe_file)
    startup = measure_server_start(registry=registry, models_dir=Path(models_dir), tier=REFERENCE_TIER)
    log("bench.cold_start_inputs", disk_mb_s=disk["read_mb_s"], port_open_ms=startup["port_open_ms"])

    probe_bytes = probe_file.stat().st_size
    doc: dict[str, Any] = {
        "bench_version": BENCH_VERSION,
        "fingerprint": fp,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "probe": {
            "source": source,
            "path": str(probe_file),
            "model": PROBE_MODEL_ID if source.startswith("tinyllama") else probe_file.name,
            "params_b": round(llm["n_params"] / 1e9, 6),
            "file_bytes": probe_bytes,
            "decode_tok_s": llm["decode_tok_s"],
            "prefill_tok_s": llm["prefill_tok_s"],
            "ttft_ms": llm["ttft_ms"],
            "load_ms": llm["load_ms"],
            "rss_mb": llm["rss_mb"],
            "threads": llm_threads,
            **{k: llm[k] for k in ("n_params", "prompt_tokens", "decode_tokens", "ttft_tokens", "repeats",
                                   "gpu_layers", "n_ctx", "runs", "llama_cpp", "system_info", "gomp_spincount")},
        },
        "small_probe": small,
        "stt_ms": stt_ms,
        "tts_ms": tts_ms,
        "stt_model": stt_model.id if stt_model is not None else DEFAULT_STT_MODEL,
        "tts_model": tts_model.id if tts_model is not None else DEFAULT_TTS_MODEL,
        "stt": stt_detail,
        "tts": None if tts_model is None else {"threads": tts_threads, "words": len(TTS_SENTENCE.split())},
        "kernels": kernels,
        "contention": contention,
        "disk": disk,
        "startup": startup,
        "outside_load": outside_load(),
        "hardware": {"cpu_model": hardware.cpu_model, "cpu_cores": hardware.cpu_cores,
                     "cpu_threads": hardware.cpu_threads, "ram_gb": hardware.ram_gb,
                     "gpus": [g.name for g in hardware.gpus], "os": hardware.os, "arch": hardware.arch,
                     "python": platform.python_version()},
        "notes": notes,
    }
    try:
        Bench.from_dict(doc)
    except PlanError as exc:
        raise BenchError(f"bench result is unusable: {exc}") from None
    write_json_atomic(cached_file, doc)
    log("bench.done", path=str(cached_file), fingerprint=fp)
    return doc


def reference_llm(registry: Registry, models_dir: Path) -> Model | None:
    """The reference tier's LLM when it is installed."""
    tier = registry.tiers.get(REFERENCE_TIER)
    model = registry.models.get(tier.models["llm"]) if tier is not None else None
    return model if model is not None and is_installed(model, models_dir) else None


def outside_load() -> dict[str, float] | None:
    """The machine's load averages (1, 5, 15 min) as the measurement ended: other work skews every figure."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return {"load1": round(one, 2), "load5": round(five, 2), "load15": round(fifteen, 2)}


def _small_probe(registry: Registry, models_dir: Path, threads: int, notes: list[str],
                 log: LogFn) -> dict[str, Any] | None:
    """Measure the reference tier's small LLM too when it is installed: a second point for the cost model.

    Per-token cost is not proportional to size alone: a fixed part (threads waking up, sampling) dominates
    small models, so two probes of very different sizes let the planner fit both parts.
    """
    model = reference_llm(registry, models_dir)
    if model is None:
        notes.append("small LLM not measured: the embedded tier's LLM is not installed; predictions scale "
                     "from the TinyLlama probe alone")
        return None
    try:
        llm = probe_llm(models_dir / model.dest, threads=threads)
    except BenchError as exc:
        notes.append(f"small LLM probe failed: {exc}")
        return None
    log("bench.small_llm", model=model.id, decode_tok_s=llm["decode_tok_s"], prefill_tok_s=llm["prefill_tok_s"],
        ttft_ms=llm["ttft_ms"])
    return {"model": model.id, "params_b": round(llm["n_params"] / 1e9, 6), "file_bytes": model.file_bytes,
            "decode_tok_s": llm["decode_tok_s"], "prefill_tok_s": llm["prefill_tok_s"], "ttft_ms": llm["ttft_ms"],
            "rss_mb": llm["rss_mb"], "runs": llm["runs"]}


def _read_cached(path: Path, probe_file: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("bench_version") != BENCH_VERSION:
        return None
    try:
        Bench.from_dict(doc)
    except PlanError:
        return None
    # A result measured with another probe file (e.g. random, before the real TinyLlama arrived) is stale.
    probe = doc.get("probe") or {}
    if probe.get("path") != str(probe_file):
        return None
    return doc


if __name__ == "__main__":
    # The LLM probe's child entry, where it was before bench_llm: `python -m local_ai_server.setup.bench _probe`.
    sys.exit(main())
