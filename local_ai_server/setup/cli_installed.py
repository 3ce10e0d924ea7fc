"""model_setup.py verify, summary and service: check the installed tier, report it, run it as a service."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from local_ai_server.setup.bench_cache import BenchChoice, bench_summary, cached_or_none, default_cache_dir
from local_ai_server.setup.cli_common import args_models_dir, args_registry, emit, expectation_lines
from local_ai_server.setup.fetch import verify_tier
from local_ai_server.setup.hardware import Hardware, detect
from local_ai_server.setup.installation import InstallRecord, now_iso, read_record, record_path, write_record
from local_ai_server.setup.registry import ROLES, Registry, SetupError
from local_ai_server.setup.selection import read_selection


def cmd_service(args: argparse.Namespace) -> int:
    """Write the systemd unit for the checkout (`args.root`), and enable it unless --no-enable."""
    import getpass

    from local_ai_server.setup.service import UnitSpec, install_unit

    user = args.user or os.environ.get("SUDO_USER") or getpass.getuser()
    spec = UnitSpec(venv=Path(args.venv).absolute(), root=args.root, models_dir=args_models_dir(args), user=user)
    unit, done = install_unit(spec, args.unit_dir, enable=not args.no_enable)
    if args.json:
        emit({"ok": True, "unit": str(unit), "done": done})
    else:
        for line in done:
            print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash the selected (or --tier) files, then run one voice turn unless --hash-only or --tier."""
    registry = args_registry(args)
    models_dir = args_models_dir(args)
    problems: list[str] = []
    selection = None
    if args.tier:
        tier = registry.tier(args.tier).name
    else:
        selection = read_selection(models_dir)
        if selection is None:
            raise SetupError(f"no selection in {models_dir}; run `model_setup.py download` first")
        tier = registry.tier(selection.tier).name
        expected = registry.tier_models(tier)
        for role in ROLES:
            chosen, want = selection.model(role), expected[role]
            if chosen.id != want.id or chosen.path != want.dest:
                problems.append(f"selection mismatch: {role} is {chosen.id} at {chosen.path}, "
                                f"registry tier {tier} has {want.id} at {want.dest}")
    files = registry.tier_files(tier)
    problems += verify_tier(registry, tier, models_dir)
    llm = registry.tier_models(tier)["llm"]
    mismatches: list[str] = []
    if not problems and llm.shape is not None:
        # The registry's tensor facts priced this tier: check them against the installed file itself. A
        # mismatch leaves the server working, but its predictions were made for another file: said, not fatal.
        from local_ai_server.setup.llm_shape import file_mismatches

        mismatches = file_mismatches(llm.shape, models_dir / llm.dest)
        for line in mismatches[:5]:
            print(f"warning: registry.json's architecture of {llm.id} does not match the file: {line}",
                  file=sys.stderr)
    if not args.json:
        for problem in problems:
            print(problem)
        if not problems:
            print(f"ok: {len(files)} files of tier {tier} verified in {models_dir}")
    turn: dict[str, Any] | None = None
    if not problems and selection is not None and not args.hash_only:
        rebench = None if args.no_rebench else BenchRerun(
            registry=registry, hw=detect(models_dir), models_dir=models_dir,
            cache_dir=Path(args.cache_dir or default_cache_dir()).expanduser().absolute(), offline=args.offline,
            mirror=args.mirror, stream=sys.stderr if args.json else sys.stdout)
        turn = verify_turn(models_dir, selection, quiet=args.json, rebench=rebench,
                           cold_start_files=None if args.no_cold_start else [models_dir / f.path for f in files])
    if args.json:
        emit({"ok": not problems, "tier": tier, "models_dir": str(models_dir), "files": len(files),
               "problems": problems, "architecture_mismatches": mismatches, "turn": turn})
    if problems:
        print(f"error: {len(problems)} problem(s) with tier {tier} in {models_dir}; "
              "re-run `model_setup.py download` to repair", file=sys.stderr)
        return 1
    return 0


class Rerun(Protocol):
    """How verify re-measures this machine and re-predicts the installed tier (BenchRerun; a fake in tests)."""

    def run(self, record: InstallRecord) -> dict[str, Any]:
        """Measure afresh (refreshing this fingerprint's cache); the bench document."""

    def repredict(self, record: InstallRecord, doc: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """The installed tier's prediction from bench `doc`, with the plan inputs it came from."""

    def summary(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """install.json's `bench` block for bench `doc`."""


@dataclass(frozen=True)
class BenchRerun:
    """verify's re-bench: `model_setup.py bench --refresh` on the probe the recorded benchmark used, then `plan`."""

    registry: Registry
    hw: Hardware
    models_dir: Path
    cache_dir: Path
    offline: bool
    mirror: str | None
    stream: TextIO

    def run(self, record: InstallRecord) -> dict[str, Any]:
        """Measure again with the recorded benchmark's probe when it is still there (else bench's own choice)."""
        from local_ai_server.setup.cli_plan import measure_bench

        bench = record.doc.get("bench")
        recorded = bench.get("probe_path") if isinstance(bench, Mapping) else None
        probe = Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None
        return measure_bench(self.registry, self.hw, self.models_dir, self.cache_dir, probe=probe,
                             offline=self.offline, mirror=self.mirror, refresh=True, stream=self.stream)

    def repredict(self, record: InstallRecord, doc: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """The plan's prediction for the installed tier on this machine, from `doc`."""
        from local_ai_server.setup.plan import Bench, Constraints, make_plan

        plan = make_plan(self.registry, self.hw, tier=record.tier, bench=Bench.from_dict(doc),
                         constraints=Constraints(llama_backend=record.llama_backend)).to_dict(self.registry)
        return dict(plan["prediction"]), dict(plan["inputs"]) | {"prediction_bound": plan["prediction_bound"],
                                                                  "measured_here": plan["measured_here"]}

    def summary(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """The fresh benchmark as the cache now holds it."""
        choice = cached_or_none(self.hw, no_bench=False, cache_dir=self.cache_dir)
        return bench_summary(choice if choice.doc == doc else BenchChoice("file", doc=doc))


def verify_turn(models_dir: Path, selection: Any, *, quiet: bool, rebench: Rerun | None = None,
                cold_start_files: list[Path] | None = None) -> dict[str, Any]:
    """Run one voice turn on the selected models, then (unless `cold_start_files` is None) a cold start of the
    real server; compare both with install.json and record the result there.

    More than 25 % off the prediction, `rebench` (unless None: --no-rebench) measures the machine again once
    and the prediction is recomputed from it (verify_bench.recheck).
    """
    from local_ai_server.config import cpu_count, thread_budget
    from local_ai_server.setup.turn import compare, describe_comparison, run_turn
    from local_ai_server.setup.verify_bench import REBENCH_OFF_PCT, apply_to_record, is_off, recheck

    record = read_record(models_dir)
    settings = dict(record.settings) if record is not None and record.tier == selection.tier else {}
    llm_t, stt_t, tts_t = thread_budget(cpu_count())

    def setting(name: str, default: int) -> int:
        # The thread budgets and offload the server will use: environment over install.json.
        raw = os.environ.get(name) or settings.get(name)
        return int(raw) if raw else default

    def say(line: str) -> None:
        print(line, file=sys.stderr if quiet else sys.stdout, flush=True)

    say(f"verify: one voice turn on tier {selection.tier} (the question is spoken by the installed voice)")
    result = run_turn(selection.path("stt"), selection.path("llm"), selection.path("tts"),
                      llm_threads=setting("LOCAL_LLM_THREADS", llm_t), stt_threads=setting("LOCAL_STT_THREADS", stt_t),
                      tts_threads=setting("LOCAL_TTS_THREADS", tts_t), gpu_layers=setting("LOCAL_LLM_GPU_LAYERS", 0),
                      system_prompt=os.environ.get("LOCAL_LLM_SYSTEM_PROMPT") or None)
    measured = result.figures()
    say(f"  heard: {result.transcript!r}")
    say(f"  answered: {result.answer[:120]!r}")
    cold: dict[str, Any] | None = None
    if cold_start_files is not None:
        from local_ai_server.setup.cold_start import measure_cold_start

        say("verify: a cold start of the server (its model files dropped from the page cache) until /ready")
        cold = measure_cold_start(models_dir, cold_start_files)
        if cold["ready_ms"] is not None:
            measured["ready_ms"] = cold["ready_ms"]
        still = cold["still_cached_mb"]
        say(f"  port open after {cold['port_open_ms']} ms, /ready after {cold['ready_ms']} ms"
            + ("" if cold["page_cache_dropped"] else " (the page cache could not be dropped: a warm start)")
            + (f" ({still:g} of {cold['files_mb']:g} MB stayed cached: other processes map these files, so "
               "the start was partly warm)" if still else ""))
    out: dict[str, Any] = {"measured": measured, "transcript": result.transcript, "answer": result.answer,
                           "comparison": None, "cold_start": cold}
    if record is None or record.tier != selection.tier:
        say("  measured: " + ", ".join(f"{k} {v:g}" for k, v in measured.items()))
        say("  no installation record for this tier (install.json): nothing to compare with; run ./install.sh")
        return out
    bound = record.doc.get("expected_bound")
    rows = compare(measured, record.expected, bound if isinstance(bound, Mapping) else None)
    out["comparison"] = rows
    for line in describe_comparison(rows):
        say("  " + line)
    doc = dict(record.doc)
    doc["measured"] = {"at": now_iso(), "figures": measured, "comparison": rows, "transcript": result.transcript,
                       "cold_start": cold}
    if rebench is not None:
        rerun = rebench
        checked = recheck(measured, rows, record.expected, run_bench=lambda: rerun.run(record),
                          repredict=lambda bench_doc: rerun.repredict(record, bench_doc), say=lambda s: say("  " + s))
        if checked is not None:
            summary = rerun.summary(checked["bench"]) if "bench" in checked else None
            doc = apply_to_record(doc, checked, bench_summary=summary, measured=doc["measured"])
            out["rebench"] = {k: v for k, v in checked.items() if k not in ("bench", "inputs")}
    elif is_off(rows):
        say(f"  more than {REBENCH_OFF_PCT:g}% off, but --no-rebench: the prediction was not re-measured")
    write_record(models_dir, doc)
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    """What is installed and what to expect from it (install.json), with what verify measured."""
    from local_ai_server.setup.turn import describe_comparison

    models_dir = args_models_dir(args)
    selection = read_selection(models_dir)
    if selection is None:
        raise SetupError(f"nothing is installed in {models_dir}; run ./install.sh")
    record = read_record(models_dir)
    choice = cached_or_none(detect(models_dir), no_bench=args.no_bench, cache_dir=args.cache_dir)
    now = None if record is None or record.tier != selection.tier else predicted_now(args, record, choice)
    if args.json:
        emit({"tier": selection.tier, "models_dir": str(models_dir),
               "models": {r: selection.model(r).display for r in ROLES},
               "record": None if record is None else dict(record.doc), "bench_used": choice.to_dict(),
               "predicted_now": now})
        return 0
    print(f"tier {selection.tier} in {models_dir}")
    for role in ROLES:
        print(f"  {role}: {selection.model(role).display}")
    print(f"  benchmark: {choice.describe()}")
    if record is None or record.tier != selection.tier:
        print(f"  no expectations recorded ({record_path(models_dir).name} is missing or for another tier)")
        return 0
    if record.fallback:
        print(f"  note: {record.fallback}")
    e = record.expected
    answer_tokens = record.doc.get("turn", {}).get("answer_tokens", 30)
    print(f"  expected here: first audio {e.get('first_audio_ms', 0):.0f} ms after the end of speech is detected, "
          f"a {answer_tokens}-token answer done in {e.get('voice_turn_ms', 0):.0f} ms; "
          f"decode {e.get('decode_tok_s', 0):g} tok/s, first token {e.get('ttft_ms', 0):.0f} ms, "
          f"STT {e.get('stt_ms', 0):.0f} ms" + (f"; ready {e['ready_ms'] / 1000:.1f} s after a cold start"
                                                 if e.get("ready_ms") else ""))
    bound = record.doc.get("expected_bound")
    measured_here = record.doc.get("measured_here")
    for line in expectation_lines(e, bound if isinstance(bound, Mapping) else None,
                                  measured_here if isinstance(measured_here, list) else []):
        print(f"    {line}")
    print(f"  source: {record.expected_source}")
    rebench = record.doc.get("rebench")
    if isinstance(rebench, Mapping):
        from local_ai_server.setup.verify_bench import figures_line

        print(f"  re-benchmarked by `model_setup.py verify` at {rebench.get('at')}: {rebench.get('reason')}"
              + (f"; it failed: {rebench['error']}" if rebench.get("error") else
                 f"; previous prediction: {figures_line(rebench.get('previous_expected') or {})}"))
    if now is not None:
        print(f"  note: these expectations came from {now['recorded_from']}; from the {now['from']} "
              f"this tier predicts: {now['line']}")
    if record.measured:
        print(f"  measured by `model_setup.py verify` at {record.measured.get('at')}:")
        for line in describe_comparison(record.measured.get("comparison") or {}):
            print(f"    {line}")
    return 0




def predicted_now(args: argparse.Namespace, record: InstallRecord, choice: BenchChoice) -> dict[str, Any] | None:
    """The installed tier re-predicted from `choice` when that is not the benchmark install.json's figures came
    from (a newer cache, none at all); None when they agree."""
    recorded = record.doc.get("bench")
    recorded_at = recorded.get("measured_at") if isinstance(recorded, Mapping) else None
    if choice.origin == "disabled" or recorded_at == choice.measured_at:
        return None  # --no-bench: only what install.json says, as before
    from local_ai_server.setup.plan import Constraints, make_plan
    from local_ai_server.setup.verify_bench import figures_line

    registry = args_registry(args)
    plan = make_plan(registry, detect(args_models_dir(args)), tier=record.tier, bench=choice.bench,
                     constraints=Constraints(llama_backend=record.llama_backend))
    prediction = plan.chosen.prediction.to_dict()
    return {"prediction": prediction, "line": figures_line(prediction),
            "from": "hardware alone" if choice.doc is None else f"benchmark measured_at {choice.measured_at}",
            "recorded_from": f"the benchmark measured_at {recorded_at}" if recorded_at else "the hardware alone"}
