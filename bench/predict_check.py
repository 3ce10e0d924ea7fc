"""Check the installer's LLM predictions against measurements on this machine.

Usage::

    .venv/bin/python bench/predict_check.py [--json] [--shapes llama3.2-1b,llama3.2-3b] [--cache-dir DIR]

The installer predicts every tier's LLM speed from what `model_setup.py bench` measured (the TinyLlama-
shaped probe plus the small embedded LLM). This builds models of other sizes with the exact shapes of
real ones (Llama-3.2-1B, Llama-3.2-3B; random weights, quantized to Q4_K_M like the registry's files,
which costs the same per token as the real weights), predicts their decode rate, prefill rate and time to
first token with the planner's own function, then measures them with the bench's own probe (same child
process, same token counts, same threads), and prints the error of each prediction. Goal: within +-25%.

Built models are cached (cache dir/probes/); the first run spends a few minutes quantizing them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local_ai_server.threads import thread_env  # noqa: E402

thread_env()  # before any model library loads

from local_ai_server.setup.bench import probe_llm, run_bench  # noqa: E402
from local_ai_server.setup.hardware import detect  # noqa: E402
from local_ai_server.setup.plan import Bench, predict_llm  # noqa: E402
from local_ai_server.setup.probe import LLAMA32_1B, LLAMA32_3B, ProbeShape, build_probe  # noqa: E402
from local_ai_server.setup.registry import load_registry  # noqa: E402
from local_ai_server.setup.selection import default_models_dir, default_registry_path  # noqa: E402

SHAPES: dict[str, ProbeShape] = {"llama3.2-1b": LLAMA32_1B, "llama3.2-3b": LLAMA32_3B}
GOAL_PCT = 25.0
FIGURES = ("decode_tok_s", "prefill_tok_s", "ttft_ms")


def default_cache_dir() -> Path:
    """Same cache as the installer's ($LOCAL_AI_CACHE, else ~/.cache/local-ai-server)."""
    configured = os.environ.get("LOCAL_AI_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "local-ai-server"


def error_pct(predicted: float, measured: float) -> float:
    """Signed error of the prediction, in percent of the measured value."""
    return round((predicted - measured) / measured * 100.0, 1)


def main(argv: list[str] | None = None) -> int:
    """Build, predict, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="the last stdout line is one JSON object")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--refresh-bench", action="store_true", help="re-run the installer's bench first")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s): {', '.join(unknown)}")
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().absolute()
    models_dir = default_models_dir()
    registry = load_registry(default_registry_path())
    hw = detect(models_dir)

    def say(event: str, **fields: object) -> None:
        print(event, *(f"{k}={v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    # The same measurement the installer bases its plan on (cached per machine).
    bench_doc = run_bench(hardware=hw, models_dir=models_dir, registry=registry, cache_dir=cache_dir,
                          refresh=args.refresh_bench, log=say)
    bench = Bench.from_dict(bench_doc)
    threads = int(bench_doc["probe"]["threads"])
    rows: list[dict[str, Any]] = []
    for name in names:
        shape = SHAPES[name]
        path = cache_dir / "probes" / f"{name}-random-q4_k_m.gguf"
        if not path.is_file():
            started = time.monotonic()
            say("predict_check.build", shape=name, params=shape.params)
            build_probe(shape, path, quant="Q4_K_M", log=say)
            say("predict_check.built", shape=name, s=round(time.monotonic() - started, 1))
        size = path.stat().st_size
        decode, prefill, ttft = predict_llm(bench, size, shape.params / 1e9)
        predicted = {"decode_tok_s": round(decode, 2), "prefill_tok_s": round(prefill, 1), "ttft_ms": round(ttft, 1)}
        say("predict_check.measure", shape=name)
        got = probe_llm(path, threads=threads)
        measured = {k: got[k] for k in FIGURES}
        errors = {k: error_pct(predicted[k], measured[k]) for k in FIGURES}
        rows.append({"shape": name, "params_b": round(shape.params / 1e9, 3), "file_mb": round(size / 1e6),
                     "predicted": predicted, "measured": measured, "error_pct": errors,
                     "within_goal": all(abs(e) <= GOAL_PCT for e in errors.values())})

    print(f"machine: {hw.cpu_model}, {hw.cpu_cores} cores, {threads} LLM threads; reference probes: "
          f"{bench_doc['probe']['model']} ({bench_doc['probe']['source']})"
          + (f" + {bench_doc['small_probe']['model']}" if bench_doc.get("small_probe") else ""))
    print(f"{'model shape':<14}{'size':>9}  {'figure':<15}{'predicted':>11}{'measured':>11}{'error':>9}")
    for row in rows:
        for i, key in enumerate(FIGURES):
            head = f"{row['shape']:<14}{row['file_mb']:>6} MB" if i == 0 else " " * 23
            print(f"{head}  {key:<15}{row['predicted'][key]:>11g}{row['measured'][key]:>11g}"
                  f"{row['error_pct'][key]:>+8.1f}%")
    worst = max((abs(e) for row in rows for e in row["error_pct"].values()), default=0.0)
    print(f"worst error {worst:.1f}% (goal: within {GOAL_PCT:g}%)")
    if args.json:
        print(json.dumps({"goal_pct": GOAL_PCT, "worst_error_pct": worst, "rows": rows,
                          "bench": {"probe": {k: bench_doc["probe"][k] for k in ("model", "source", *FIGURES)},
                                    "small_probe": bench_doc.get("small_probe")},
                          "machine": {"cpu_model": hw.cpu_model, "cpu_cores": hw.cpu_cores, "threads": threads}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
