"""Check the installer's LLM predictions against measurements, for every CPU tier's LLM, on this machine.

Usage::

    .venv/bin/python bench/predict_check.py [--rounds 2] [--models ID,...] [--out FILE] [--cache-dir DIR]

The installer prices an LLM by its real tensors (registry.json `architecture`: layers, widths, heads,
vocabulary, the GGML type of every tensor of the published file) at the per-type and per-layer rates its
benchmark measured here (local_ai_server/setup/plan_cost.py). This takes every CPU tier's LLM, writes a
file with exactly those tensors and random weights (which costs the same per token as the real weights; the
embedded LLM is the real file), predicts its decode rate, prefill rate and time to first token with the
installer's own cost model (calibrated, as the installer's is, on the TinyLlama-shaped probe and the
embedded LLM measured beside the rates, never on the model being checked), then measures them with the
installer's own probe (same child process, token counts and threads), and prints each figure's error and
whether it fell inside the predicted range. The embedded tier's LLM is the exception, as it is in the
installer: the installer's benchmark measures that very file and promises those figures, so its check is
that measurement (taken beside the rates) against the later one, and the cost model's own figure for it is
printed beside, for the record.

Each round measures, right before each model, the rates that model needs (the depth probes and one probe
per tensor type it uses, 20-60 s), so both sides of a comparison see about the same outside load; the
outside load (CPU other processes used during each measurement, in cores) is recorded beside every figure.
A second table compares CPU time instead of wall time (each phase's CPU seconds / threads), for diagnosis
on a shared machine. Goal (wall time): every figure within +-15%, none optimistic (predicting better than
measured) by more than 10%.

Probe files are cached under the cache dir's probes/ (a few seconds each to write; 3.3 GB for all four).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from local_ai_server.threads import thread_env  # noqa: E402

thread_env()  # before any model library loads

from procs import system_busy_seconds  # noqa: E402

from local_ai_server.setup.bench import probe_llm, reference_llm  # noqa: E402
from local_ai_server.setup.bench_cache import default_cache_dir  # noqa: E402
from local_ai_server.setup.bench_inputs import PROBE_MODEL_ID  # noqa: E402
from local_ai_server.setup.bench_kernels import kernel_types, measure_kernels  # noqa: E402
from local_ai_server.setup.hardware import detect  # noqa: E402
from local_ai_server.setup.plan_cost import KernelRates, calibration, llm_cost, measured_cost  # noqa: E402
from local_ai_server.setup.probe_typed import build_typed_probe  # noqa: E402
from local_ai_server.setup.registry import Model, Registry, load_registry  # noqa: E402
from local_ai_server.setup.selection import default_models_dir, default_registry_path  # noqa: E402

GOAL_PCT = 15.0
OPTIMISTIC_PCT = 10.0
FIGURES = ("decode_tok_s", "prefill_tok_s", "ttft_ms")
LABELS = {"decode_tok_s": "decode tok/s", "prefill_tok_s": "prefill tok/s", "ttft_ms": "first token ms"}


def cpu_tier_llms(registry: Registry) -> list[tuple[str, Model]]:
    """(tier, LLM) of every CPU tier, in rank order, each LLM once."""
    seen: set[str] = set()
    out = []
    for tier in sorted(registry.tiers.values(), key=lambda t: t.rank):
        if tier.requirements.get("gpu") is True:
            continue
        model = registry.models[tier.models["llm"]]
        if model.id not in seen and model.shape is not None:
            seen.add(model.id)
            out.append((tier.name, model))
    return out


def error_pct(predicted: float, measured: float) -> float:
    """Signed error of the prediction, in percent of the measured value."""
    return round((predicted - measured) / measured * 100.0, 1)


def optimistic_pct(key: str, error: float) -> float:
    """How much better than measured the prediction was (0 when it was not): a rate too high, a time too low."""
    return max(0.0, error if key.endswith("tok_s") else -error)


class Outside:
    """CPU that processes other than this script and its children used while a block ran, in cores."""

    def __enter__(self) -> Outside:
        self.t0, self.busy0, self.own0 = time.perf_counter(), system_busy_seconds(), _own_seconds()
        self.load0 = os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        busy1, own = system_busy_seconds(), _own_seconds() - self.own0
        self.cores = (None if self.busy0 is None or busy1 is None or wall <= 0 else
                      round(max(0.0, (busy1 - self.busy0 - own) / wall), 2))
        self.load = [round(self.load0, 2), round(os.getloadavg()[0], 2)]


def _own_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Build, predict, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rate measurements + model measurements (default 2)")
    parser.add_argument("--models", default="", help="comma-separated registry LLM ids (default: every CPU tier's)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    parser.add_argument("--json", action="store_true", help="the last stdout line is the JSON document")
    args = parser.parse_args(argv)
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().absolute()
    models_dir = default_models_dir()
    registry = load_registry(default_registry_path())
    hw = detect(models_dir)
    targets = cpu_tier_llms(registry)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        targets = [(t, m) for t, m in targets if m.id in wanted] + \
                  [("-", registry.models[m]) for m in wanted if m not in {x.id for _, x in targets}]
    threads = max(1, min(hw.cpu_cores, 8))

    def say(event: str, **fields: object) -> None:
        print(event, *(f"{k}={v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    # The installer calibrates its model on the LLMs its bench measures beside the rates: a TinyLlama-shaped
    # probe and the embedded LLM. So does this, never with the model being checked.
    references = [registry.models[m] for m in (PROBE_MODEL_ID, "smollm2-135m-instruct-q4_1") if m in registry.models]
    measured_here = reference_llm(registry, models_dir)
    files: dict[str, Path] = {}
    for _tier, model in [*targets, *(("-", m) for m in references)]:
        real = models_dir / model.dest
        if real.is_file() and real.stat().st_size == model.file_bytes:
            files[model.id] = real
            continue
        assert model.shape is not None
        path = cache_dir / "probes" / f"{model.id}-shape.gguf"
        if not path.is_file() or path.stat().st_size < model.shape.tensor_bytes:
            build_typed_probe(model.shape, path, log=say)
        files[model.id] = path

    rounds: list[dict[str, Any]] = []
    for n in range(max(1, args.rounds)):
        say("predict_check.round", round=n + 1, of=args.rounds)
        rows = []
        for tier, model in targets:
            assert model.shape is not None
            # The rates this model and the references need, measured right before it, then the references:
            # both sides of the comparison see about the same outside load.
            refs = [m for m in references if m.id != model.id and m.shape is not None]
            # The installer never models the reference tier's own LLM: its bench measures that very file and
            # promises those figures (plan_cost.measured_cost). Checked the same way: that measurement, taken
            # here beside the rates, against the later one.
            installer_measures = measured_here is not None and model.id == measured_here.id
            with Outside() as out_k:
                kernels = measure_kernels(kernel_types([model.shape, *(m.shape for m in refs if m.shape)]),
                                          cache_dir / "probes", threads, say)
                ref_measured = [(m, probe_llm(files[m.id], threads=threads)) for m in refs]
                bench_probe = probe_llm(files[model.id], threads=threads) if installer_measures else None
            say("predict_check.measure", model=model.id, file=files[model.id].name)
            with Outside() as out_m:
                got = probe_llm(files[model.id], threads=threads)
            row: dict[str, Any] = {"tier": tier, "model": model.id, "file": str(files[model.id]),
                                   "real_file": files[model.id].stat().st_size == model.file_bytes,
                                   "decode_mb_per_token": round(sum(model.shape.decode_bytes().values()) / 1e6),
                                   "outside_cores": out_m.cores, "load1": out_m.load,
                                   "kernels_outside_cores": out_k.cores, "kernels": kernels}
            row["references"] = {m.id: {k: r[k] for k in (*FIGURES, "runs", "cpu")} for m, r in ref_measured}
            for basis, name, measured in (("wall", "figures", got), ("cpu", "cpu_figures", got["cpu"])):
                rates = KernelRates.from_bench({"kernels": kernels}, basis=basis)
                assert rates is not None
                calib = calibration(rates, [(m.shape, r if basis == "wall" else r["cpu"])
                                            for m, r in ref_measured if m.shape is not None])
                row[name + "_calibration"] = {k: round(v, 3) for k, v in calib.items()}
                cost = llm_cost(model.shape, rates, {}, calib)
                if bench_probe is not None:
                    # What the cost model would have said, for the record; the promise is the measurement.
                    row["model_" + name] = {k: {"predicted": round(getattr(cost, k).p50, 2),
                                                "error_pct": error_pct(getattr(cost, k).p50, measured[k])}
                                            for k in FIGURES}
                    cost = measured_cost(bench_probe if basis == "wall" else bench_probe["cpu"])
                row["promise"] = "measured" if bench_probe is not None else "cost model"
                predicted = {"decode_tok_s": cost.decode_tok_s, "prefill_tok_s": cost.prefill_tok_s,
                             "ttft_ms": cost.ttft_ms}
                row[name] = {}
                for key in FIGURES:
                    p, m = predicted[key], measured[key]
                    err = error_pct(p.p50, m)
                    inside = m >= p.bound if key.endswith("tok_s") else m <= p.bound
                    row[name][key] = {"predicted": round(p.p50, 2), "bound": round(p.bound, 2), "measured": m,
                                      "runs": measured["runs"][key], "error_pct": err,
                                      "optimistic_pct": optimistic_pct(key, err), "within_bound": inside}
            rows.append(row)
        rounds.append({"round": n + 1, "rows": rows})

    print(f"machine: {hw.cpu_model}, {hw.cpu_cores} cores, {threads} LLM threads; {len(rounds)} round(s); "
          f"the figures below are the median over rounds (each round: rates measured, then every model)")
    summary = _summary(targets, rounds, "figures")
    _table("wall-clock figures (what a caller sees; other work on the machine slows both sides unevenly):",
           summary)
    cpu_summary = _summary(targets, rounds, "cpu_figures")
    _table("CPU-time figures (each phase's CPU seconds / threads: the time it would take with the cores to "
           "itself; this takes the other work out of both the rates and the measurements):", cpu_summary)
    doc = {"goal_pct": GOAL_PCT, "optimistic_goal_pct": OPTIMISTIC_PCT, **summary, "cpu_time": cpu_summary,
           "rounds": rounds,
           "machine": {"cpu_model": hw.cpu_model, "cpu_cores": hw.cpu_cores, "threads": threads},
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc))
    return 0


def _table(title: str, summary: dict[str, Any]) -> None:
    print(title)
    print(f"  {'model (tier)':<40}{'MB/tok':>7}  {'figure':<15}{'predicted':>10}{'worst':>9}{'measured':>10}"
          f"{'error':>8}{'outside':>9}")
    for row in summary["rows"]:
        for i, key in enumerate(FIGURES):
            f = row["figures"][key]
            head = (f"{row['model'] + ' (' + row['tier'] + ')':<40}{row['decode_mb_per_token']:>7}" if i == 0
                    else " " * 47)
            print(f"  {head}  {LABELS[key]:<15}{f['predicted']:>10g}{f['bound']:>9g}{f['measured']:>10g}"
                  f"{f['error_pct']:>+7.1f}%{row['outside_cores']:>7.2f} c")
        if row.get("promise") == "measured":
            errs = row.get("cost_model_error_pct") or {}
            print("  " + " " * 47 + "(the installer promises this file's own measurement; its cost model would "
                  "have been off " + ", ".join(f"{LABELS[k]} {v:+.1f}%" for k, v in errs.items()) + ")")
    print(f"  worst error {summary['worst_error_pct']:.1f}% (goal +-{GOAL_PCT:g}%); most optimistic "
          f"{summary['worst_optimistic_pct']:.1f}% (goal <= {OPTIMISTIC_PCT:g}%); measurements outside the "
          f"predicted range: {summary['outside_range']}; outside load: median {summary['outside_cores_median']} "
          f"cores used by other processes during the measurements")
    print("  verdict: " + ("goal met" if summary["goal_met"] else "goal NOT met"))


def _summary(targets: list[tuple[str, Model]], rounds: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Per model and figure (`name`: wall or CPU-time figures), the median over rounds of prediction, bound,
    measurement and error."""
    rows = []
    for tier, model in targets:
        per = [r for rnd in rounds for r in rnd["rows"] if r["model"] == model.id]
        figures = {}
        for key in FIGURES:
            vals = [r[name][key] for r in per]
            err = statistics.median(v["error_pct"] for v in vals)
            figures[key] = {k: round(statistics.median(v[k] for v in vals), 2)
                            for k in ("predicted", "bound", "measured")}
            figures[key] |= {"error_pct": round(err, 1), "errors_by_round": [v["error_pct"] for v in vals],
                             "optimistic_pct": optimistic_pct(key, err),
                             "within_bound_by_round": [v["within_bound"] for v in vals]}
        cores = [r["outside_cores"] for r in per if r["outside_cores"] is not None]
        model_errors = {key: statistics.median(r["model_" + name][key]["error_pct"] for r in per)
                        for key in FIGURES} if all("model_" + name in r for r in per) else None
        rows.append({"tier": tier, "model": model.id, "decode_mb_per_token": per[0]["decode_mb_per_token"],
                     "real_file": per[0]["real_file"], "figures": figures,
                     "promise": per[0].get("promise", "cost model"), "cost_model_error_pct": model_errors,
                     "outside_cores": round(statistics.median(cores), 2) if cores else float("nan")})
    errors = [f["error_pct"] for r in rows for f in r["figures"].values()]
    optimistic = [f["optimistic_pct"] for r in rows for f in r["figures"].values()]
    outside = sum(not ok for r in rows for f in r["figures"].values() for ok in f["within_bound_by_round"])
    cores = [r["outside_cores"] for r in rows if r["outside_cores"] == r["outside_cores"]]
    worst, most = max(map(abs, errors), default=0.0), max(optimistic, default=0.0)
    return {"rows": rows, "worst_error_pct": worst, "worst_optimistic_pct": most, "outside_range": outside,
            "outside_cores_median": round(statistics.median(cores), 2) if cores else None,
            "goal_met": worst <= GOAL_PCT and most <= OPTIMISTIC_PCT}


if __name__ == "__main__":
    sys.exit(main())
