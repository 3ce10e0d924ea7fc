"""The bench's LLM probe: load a GGUF file in a child process and measure prefill, first token, decode and RSS.

The child process turns a llama.cpp crash (e.g. the AMX build bug, shared/MODELS.md trap 1) into a
BenchError instead of killing the installer. Its entry is `python -m local_ai_server.setup.bench_llm _probe`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from local_ai_server.setup.registry import SetupError
from local_ai_server.threads import thread_env

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


class BenchError(SetupError):
    """A measurement could not be made (crashed, timed out, or gave an implausible result)."""


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
    cmd = [sys.executable, "-m", "local_ai_server.setup.bench_llm", "_probe", json.dumps(spec)]
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
    # CPU seconds of this process (all its threads) per phase, beside the wall time: on a machine other work
    # shares, `cpu / threads` is the time the phase would take with the cores to itself (cpu_figures).
    cpu: dict[str, list[float]] = {"prefill_tok_s": [], "decode_tok_s": [], "ttft_ms": []}
    # Warm-up: lazy allocations, and a broken build crashes on the first decode, not on load.
    llm.eval(prompt)
    for _ in range(4):
        llm.eval([next_token()])
    ttft, prefill, decode = [], [], []
    for _ in range(repeats):
        reset()
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval(chat)
        next_token()
        ttft.append((time.perf_counter() - t0) * 1000)
        cpu["ttft_ms"].append((time.process_time() - c0) / threads * 1000)

        reset()
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval(prompt)
        token = next_token()
        prefill.append(prompt_n / (time.perf_counter() - t0))
        cpu["prefill_tok_s"].append(prompt_n / max((time.process_time() - c0) / threads, 1e-9))

        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(decode_n):
            llm.eval([token])
            token = next_token()
        decode.append(decode_n / (time.perf_counter() - t0))
        cpu["decode_tok_s"].append(decode_n / max((time.process_time() - c0) / threads, 1e-9))
    return {
        "load_ms": round(load_ms, 1),
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
        "ttft_ms": round(statistics.median(ttft), 2),
        "rss_mb": round(peak_rss_mb(), 1),
        "runs": {"prefill_tok_s": [round(x, 2) for x in prefill], "decode_tok_s": [round(x, 2) for x in decode],
                 "ttft_ms": [round(x, 2) for x in ttft]},
        "cpu": {k: round(statistics.median(v), 2) for k, v in cpu.items()}
        | {"runs": {k: [round(x, 2) for x in v] for k, v in cpu.items()}},
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


# --- child-process entry -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """Child entry: `python -m local_ai_server.setup.bench_llm _probe SPEC_JSON` prints one JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "_probe":
        print("usage: python -m local_ai_server.setup.bench_llm _probe SPEC_JSON", file=sys.stderr)
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
