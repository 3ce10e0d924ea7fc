"""What pausing an answer costs on the LLM worker: parking and restoring its state, at a call's context sizes.

Usage::

    .venv/bin/python bench/llm_switch.py [--json] [--contexts 128,512,1024,1800] [--reps 7]

A worker that serves a new caller's first sentence ahead of another call's answer tail pauses the tail
between two tokens (llm_slots.Slots). Pausing copies the tail's sequence out of the llama.cpp context and
restoring it copies it back (engines.llm.LlamaEngine.park / unpark: llama_state_seq_get_data / set_data
on sequence 0, plus the sampler). This measures, on the installed GGUF with the server's threads, for a
context filled to each size: park + unpark of that sequence (the mechanism used), llama-cpp-python's
whole-context Llama.save_state + load_state (the alternative, which also copies the logits rows), and
one decoded token for scale. Medians of `--reps`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local_ai_server.threads import thread_env  # noqa: E402

thread_env()  # before any model library loads

from local_ai_server.config import cpu_count, thread_budget  # noqa: E402
from local_ai_server.engines.llm import LlamaEngine, LlmParams  # noqa: E402
from local_ai_server.setup.selection import read_selection  # noqa: E402

FILLER = ("The caller asked about the weather, then about the opening hours of the library, and the "
          "assistant answered in short spoken sentences. ")


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def measure(engine: LlamaEngine, n_tokens: int, reps: int) -> dict[str, Any]:
    """Fill the context with `n_tokens`, then time each way of setting that state aside and back."""
    llm: Any = engine._llm
    text = FILLER * (n_tokens // 20 + 2)
    tokens = llm.tokenize(text.encode(), add_bos=True)[:n_tokens]
    llm.reset()
    llm.eval(tokens)
    park, whole, decode = [], [], []
    size = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        state = engine.park()
        engine.unpark(state)
        park.append(time.perf_counter() - t0)
        size = state.size
        t0 = time.perf_counter()
        saved = llm.save_state()
        llm.load_state(saved)
        whole.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm.eval([tokens[-1]])  # one more token on top of the context (then dropped again)
        decode.append(time.perf_counter() - t0)
        llm.n_tokens -= 1
        llm._ctx.kv_cache_seq_rm(0, llm.n_tokens, -1)
    return {"context_tokens": len(tokens), "park_unpark_ms": median_ms(park), "state_mb": round(size / 2**20, 2),
            "save_load_state_ms": median_ms(whole), "decode_one_token_ms": median_ms(decode)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--contexts", default="128,512,1024,1800", help="context sizes in tokens")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    sel = read_selection(ROOT / "models")
    if sel is None:
        print(f"no models installed in {ROOT / 'models'}: run ./install.sh", file=sys.stderr)
        return 2
    threads = thread_budget(cpu_count())[0]
    engine = LlamaEngine(sel.path("llm"), LlmParams(context=2048, threads=threads, batch=256, gpu_layers=0))
    rows = [measure(engine, int(n), max(1, args.reps)) for n in args.contexts.split(",") if n.strip()]
    print(f"model {sel.path('llm').name}, {threads} threads; medians of {args.reps}")
    print(f"{'context':>8s} {'park+unpark':>12s} {'state MB':>9s} {'save+load_state':>16s} {'1 token':>8s}")
    for r in rows:
        print(f"{r['context_tokens']:>8d} {r['park_unpark_ms']:>10.2f}ms {r['state_mb']:>9.2f} "
              f"{r['save_load_state_ms']:>14.2f}ms {r['decode_one_token_ms']:>6.2f}ms")
    if args.json:
        print(json.dumps({"threads": threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
