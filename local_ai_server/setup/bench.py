"""The installer's benchmark: measure a probe LLM, STT and TTS on this machine, cached per hardware fingerprint.

The LLM probe is TinyLlama-1.1B-Chat Q4_K_M: the real file when it is installed, else a file with its
exact shapes and random weights (setup/probe.py), which decodes at the same speed. The LLM is measured
in a child process so that a llama.cpp crash (e.g. the AMX build bug, shared/MODELS.md trap 1) becomes
a BenchError instead of killing the installer. The result is the document `plan.Bench.from_dict` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from local_ai_server.setup.fetch import LogFn, structlog_log
from local_ai_server.setup.hardware import Hardware
from local_ai_server.setup.jsonfile import write_json_atomic
from local_ai_server.setup.plan import LLM_MAX_THREADS, STT_MAX_THREADS, TTS_MAX_THREADS, Bench, PlanError
from local_ai_server.setup.probe import TINYLLAMA_1B, ProbeShape, build_probe
from local_ai_server.setup.registry import Model, Registry, SetupError, load_registry
from local_ai_server.setup.selection import default_models_dir, default_registry_path, read_selection
from local_ai_server.threads import thread_env

# Bump when what is measured or how changes: older cached results are then never reused.
BENCH_VERSION = 2
PROBE_MODEL_ID = "tinyllama-1.1b-chat-v1.0-q4_k_m"
PROBE_SHAPE = TINYLLAMA_1B
PROBE_QUANT = "Q4_K_M"
# The tier whose STT and TTS models are the measurement's reference (what plan.Bench defaults to).
REFERENCE_TIER = "embedded"
DEFAULT_STT_MODEL = "whisper-tiny.en"
DEFAULT_TTS_MODEL = "piper-en_US-joe-medium"

PROMPT_TOKENS = 128
DECODE_TOKENS = 64
# Like plan.PROMPT_TOKENS: a 10-word question inside the chat template.
TTFT_TOKENS = 25
REPEATS = 3
PROBE_CONTEXT = 2048
PROBE_TIMEOUT_S = 900.0
# Token ids are drawn above the SentencePiece specials and byte tokens: ordinary text pieces.
FIRST_TEXT_TOKEN = 259
ERROR_TAIL_CHARS = 600

# ~3 s spoken; plain words without digits, which Whisper may write either way.
STT_SENTENCE = "The weather is lovely today, so let us take a long walk in the park."
# ~15 words: a typical first sentence of an answer.
TTS_SENTENCE = "Thank you for calling, I can help you change your booking or answer any other question."
STT_MAX_WER = 0.2
STT_RATE_HZ = 16000
SPEECH_RUNS = 3


class BenchError(SetupError):
    """A measurement could not be made (crashed, timed out, or gave an implausible result)."""


@dataclass(frozen=True)
class SttMeasurement:
    """One STT probe: the median time to transcribe a known utterance and what came out."""

    ms: float
    transcript: str
    expected: str
    audio_s: float
    wer: float


# --- LLM probe (child process) -----------------------------------------------------------------------


def probe_llm(
    model_path: Path,
    *,
    threads: int,
    gpu_layers: int = 0,
    prompt_tokens: int = PROMPT_TOKENS,
    decode_tokens: int = DECODE_TOKENS,
    repeats: int = REPEATS,
    ttft_tokens: int = TTFT_TOKENS,
    context: int = PROBE_CONTEXT,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, Any]:
    """Load `model_path` in a child process and measure load, prefill, time to first token, decode and RSS.

    Rates are medians over `repeats`, each from an empty KV cache. Any failure (load error, crash,
    timeout) raises BenchError naming the file.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise BenchError(f"LLM probe: no model file at {model_path}")
    if min(threads, prompt_tokens, decode_tokens, repeats, ttft_tokens) < 1:
        raise BenchError("LLM probe: threads, token counts and repeats must be positive")
    spec = {
        "model": str(model_path), "threads": threads, "gpu_layers": gpu_layers, "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens, "repeats": repeats, "ttft_tokens": ttft_tokens,
        "context": max(context, prompt_tokens + decode_tokens + 8, ttft_tokens + 8),
    }
    env = dict(thread_env(dict(os.environ)))  # the server's own thread environment
    cmd = [sys.executable, "-m", "local_ai_server.setup.bench", "_probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"LLM probe of {model_path.name} timed out after {timeout_s:g} s") from None
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None or "error" in result:
        if result is not None and "error" in result:
            reason = str(result["error"])
            cause = _llama_error(proc.stderr)
            reason += f" ({cause})" if cause else ""
        else:
            reason = f"{_exit_reason(proc.returncode)}; {_tail(proc.stderr)}"
        raise BenchError(f"LLM probe of {model_path.name} failed: {reason}")
    for key in ("load_ms", "prefill_tok_s", "decode_tok_s", "ttft_ms"):
        value = result.get(key)
        if not isinstance(value, (int, float)) or not value > 0:
            raise BenchError(f"LLM probe of {model_path.name} gave an implausible {key}: {value!r}")
    return result


def _probe_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side of `probe_llm`: the measurements, as a JSON-ready dict."""
    import llama_cpp
    import numpy as np

    threads = int(spec["threads"])
    prompt_n, decode_n, ttft_n = int(spec["prompt_tokens"]), int(spec["decode_tokens"]), int(spec["ttft_tokens"])
    repeats = int(spec["repeats"])
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(spec["model"]), n_ctx=int(spec["context"]), n_threads=threads, n_threads_batch=threads,
        n_batch=max(512, prompt_n), n_ubatch=max(512, prompt_n), n_gpu_layers=int(spec["gpu_layers"]),
        verbose=True,  # llama.cpp's log goes to our stderr, which the parent reads for the reason of a failure
    )
    load_ms = (time.perf_counter() - started) * 1000
    n_vocab = llm.n_vocab()
    memory = llama_cpp.llama_get_memory(llm.ctx)
    # Fixed pseudo-random ids: the same work for every model and run, no tokenizer involved.
    rng = np.random.default_rng(1234)
    low = FIRST_TEXT_TOKEN if n_vocab > FIRST_TEXT_TOKEN * 2 else 0
    bos = llm.token_bos()
    lead = [bos] if bos >= 0 else []

    def tokens(n: int) -> list[int]:
        return lead + [int(t) for t in rng.integers(low, n_vocab, size=n - len(lead))]

    def reset() -> None:
        llama_cpp.llama_memory_clear(memory, True)
        llm.reset()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())  # greedy

    prompt, chat = tokens(prompt_n), tokens(ttft_n)
    # Warm-up: lazy allocations, and a broken build crashes on the first decode, not on load.
    llm.eval(prompt)
    for _ in range(4):
        llm.eval([next_token()])
    ttft, prefill, decode = [], [], []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        llm.eval(chat)
        next_token()
        ttft.append((time.perf_counter() - t0) * 1000)

        reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = next_token()
        prefill.append(prompt_n / (time.perf_counter() - t0))

        t0 = time.perf_counter()
        for _ in range(decode_n):
            llm.eval([token])
            token = next_token()
        decode.append(decode_n / (time.perf_counter() - t0))
    return {
        "load_ms": round(load_ms, 1),
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
        "ttft_ms": round(statistics.median(ttft), 2),
        "rss_mb": round(peak_rss_mb(), 1),
        "runs": {"prefill_tok_s": [round(x, 2) for x in prefill], "decode_tok_s": [round(x, 2) for x in decode],
                 "ttft_ms": [round(x, 2) for x in ttft]},
        "n_params": int(llama_cpp.llama_model_n_params(llm.model)),
        "model_bytes": int(llama_cpp.llama_model_size(llm.model)),
        "n_vocab": n_vocab,
        "general_name": str((llm.metadata or {}).get("general.name", "")),
        "threads": threads,
        "gpu_layers": int(spec["gpu_layers"]),
        "prompt_tokens": prompt_n,
        "decode_tokens": decode_n,
        "ttft_tokens": ttft_n,
        "repeats": repeats,
        "n_ctx": llm.n_ctx(),
        "llama_cpp": str(getattr(llama_cpp, "__version__", "unknown")),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM on Linux, getrusage elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                return None
            return doc if isinstance(doc, dict) else None
    return None


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        import signal

        try:
            return f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"crashed (signal {-returncode})"
    return f"exit code {returncode}"


def _llama_error(stderr: str) -> str | None:
    """The reason llama.cpp logged for a failure (the Python exception only says "failed to load")."""
    for line in stderr.splitlines():
        _, sep, cause = line.partition("error loading model:")
        if sep:
            return cause.strip()[:ERROR_TAIL_CHARS]
    return None


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-ERROR_TAIL_CHARS:] or "no output"


# --- STT and TTS probes (in process) ----------------------------------------------------------------


def probe_tts(model_path: Path, threads: int, *, text: str = TTS_SENTENCE, runs: int = SPEECH_RUNS) -> float:
    """Median ms for Piper to synthesize `text` (one ~15-word sentence) after a warm-up."""
    from local_ai_server.engines.tts import PiperTts

    try:
        tts = PiperTts(Path(model_path), threads=threads)
    except FileNotFoundError as exc:
        raise BenchError(f"TTS probe: {exc}") from None
    tts.warm_up()
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        audio = tts.synthesize_all(text)
        times.append((time.perf_counter() - t0) * 1000)
        # A sentence this long is seconds of speech; far less means the voice is broken.
        if audio.size < tts.sample_rate:
            raise BenchError(f"TTS probe: {Path(model_path).name} produced {audio.size / tts.sample_rate:.2f} s "
                             f"of audio for a {len(text.split())}-word sentence")
    return round(statistics.median(times), 1)


def default_voice_path() -> Path:
    """The joe voice (what speaks the STT probe's input) in the default models dir."""
    registry = load_registry(default_registry_path())
    model = registry.models.get(DEFAULT_TTS_MODEL)
    if model is None:
        raise BenchError(f"STT probe: registry has no {DEFAULT_TTS_MODEL} voice to speak the test utterance")
    return default_models_dir() / model.dest


def measure_stt(model_dir: Path, threads: int, *, voice_path: Path | None = None, text: str = STT_SENTENCE,
                runs: int = SPEECH_RUNS) -> SttMeasurement:
    """Transcribe `text` spoken by a Piper voice (default: joe), resampled to 16 kHz; median ms after a warm-up."""
    from local_ai_server.audio import resample
    from local_ai_server.engines.stt import WhisperStt
    from local_ai_server.engines.tts import PiperTts

    try:
        # The same rendition every run: the word error rate check must not depend on Piper's noise.
        voice = PiperTts(Path(voice_path) if voice_path is not None else default_voice_path(), threads=1,
                         variation=False)
        stt = WhisperStt(Path(model_dir), threads=threads)
    except FileNotFoundError as exc:
        raise BenchError(f"STT probe: {exc}") from None
    audio = resample(voice.synthesize_all(text), voice.sample_rate, STT_RATE_HZ)
    del voice
    stt.transcribe(audio)  # warm-up on the real input: the first call pays lazy initialisation
    times, transcript = [], ""
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        transcript = stt.transcribe(audio).text
        times.append((time.perf_counter() - t0) * 1000)
    return SttMeasurement(ms=round(statistics.median(times), 1), transcript=transcript, expected=text,
                          audio_s=round(audio.size / STT_RATE_HZ, 2), wer=round(word_error_rate(text, transcript), 3))


def probe_stt(model_dir: Path, threads: int, *, voice_path: Path | None = None, text: str = STT_SENTENCE,
              runs: int = SPEECH_RUNS) -> float:
    """Median ms for faster-whisper to transcribe a ~3 s utterance; BenchError if the transcript is wrong."""
    result = measure_stt(model_dir, threads, voice_path=voice_path, text=text, runs=runs)
    if result.wer > STT_MAX_WER:
        raise BenchError(f"STT probe: heard {result.transcript!r} for {text!r} (WER {result.wer:.0%})")
    return result.ms


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference length, ignoring case and punctuation."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


# --- fingerprint, probe choice, cache ---------------------------------------------------------------


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


def random_probe_path(cache_dir: Path, shape: ProbeShape = PROBE_SHAPE, quant: str = PROBE_QUANT) -> Path:
    """Where the random-weight probe of `shape` is cached."""
    return Path(cache_dir) / "probes" / f"{shape.name}-random-{quant.lower()}.gguf"


def real_probe_path(registry: Registry, models_dir: Path) -> Path | None:
    """The installed real TinyLlama file, if present with the registry's size."""
    model = registry.models.get(PROBE_MODEL_ID)
    if model is None:
        return None
    path = Path(models_dir) / model.dest
    expected = next((f.size_bytes for f in model.files if f.path == model.dest), None)
    try:
        return path if path.is_file() and path.stat().st_size == expected else None
    except OSError:
        return None


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

    stt_model, voice, tts_model = _speech_models(registry, Path(models_dir))
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


def _small_probe(registry: Registry, models_dir: Path, threads: int, notes: list[str],
                 log: LogFn) -> dict[str, Any] | None:
    """Measure the reference tier's small LLM too when it is installed: a second point for the cost model.

    Per-token cost is not proportional to size alone: a fixed part (threads waking up, sampling) dominates
    small models, so two probes of very different sizes let the planner fit both parts.
    """
    tier = registry.tiers.get(REFERENCE_TIER)
    model = registry.models.get(tier.models["llm"]) if tier is not None else None
    if model is None or not _installed(model, models_dir):
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


def _choose_probe(registry: Registry, models_dir: Path, cache_dir: Path,
                  probe_path: Path | None) -> tuple[Path, str]:
    model = registry.models.get(PROBE_MODEL_ID)
    if probe_path is not None:
        path = Path(probe_path)
        if not path.is_file():
            raise BenchError(f"probe file not found: {path}")
        real_size = model.file_bytes if model is not None else None
        return path, "tinyllama-file" if path.stat().st_size == real_size else "given-file"
    real = real_probe_path(registry, models_dir)
    if real is not None:
        return real, "tinyllama-file"
    return random_probe_path(cache_dir), "tinyllama-shaped-random"


def _speech_models(registry: Registry, models_dir: Path) -> tuple[Model | None, Model | None, Model | None]:
    """(STT model, Piper voice to speak the STT input, TTS model): installed ones, reference tier first."""
    candidates: dict[str, list[str]] = {"stt": [DEFAULT_STT_MODEL], "tts": [DEFAULT_TTS_MODEL]}
    tier = registry.tiers.get(REFERENCE_TIER)
    if tier is not None:
        for role in candidates:
            candidates[role].insert(0, tier.models[role])
    try:
        selection = read_selection(models_dir)
    except SetupError:
        selection = None
    if selection is not None:
        for role in candidates:
            candidates[role].append(selection.model(role).id)
    installed = {role: [m for m in (registry.models.get(i) for i in ids) if m is not None and _installed(m, models_dir)]
                 for role, ids in candidates.items()}
    stt = installed["stt"][0] if installed["stt"] else None
    tts = installed["tts"][0] if installed["tts"] else None
    # The STT input is spoken by the joe voice when it is there (what the figures in MODELS.md used).
    voice = next((m for m in installed["tts"] if m.id == DEFAULT_TTS_MODEL), tts)
    return stt, voice, tts


def _installed(model: Model, models_dir: Path) -> bool:
    try:
        return all((models_dir / f.path).stat().st_size == f.size_bytes for f in model.files)
    except OSError:
        return False


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


# --- child-process entry -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """Child entry: `python -m local_ai_server.setup.bench _probe SPEC_JSON` prints one JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "_probe":
        print("usage: python -m local_ai_server.setup.bench _probe SPEC_JSON", file=sys.stderr)
        return 2
    try:
        result = _probe_child(json.loads(args[1]))
    except Exception as exc:  # noqa: BLE001 - every failure must reach the parent as one line
        out(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
        return 1
    out(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
