"""model_setup.py verify, summary and service: check the installed tier, report it, run it as a service."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from local_ai_server.setup.cli_common import args_models_dir, args_registry, emit
from local_ai_server.setup.fetch import verify_tier
from local_ai_server.setup.installation import now_iso, read_record, record_path, write_record
from local_ai_server.setup.registry import ROLES, SetupError
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
    if not args.json:
        for problem in problems:
            print(problem)
        if not problems:
            print(f"ok: {len(files)} files of tier {tier} verified in {models_dir}")
    turn: dict[str, Any] | None = None
    if not problems and selection is not None and not args.hash_only:
        turn = verify_turn(models_dir, selection, quiet=args.json)
    if args.json:
        emit({"ok": not problems, "tier": tier, "models_dir": str(models_dir), "files": len(files),
               "problems": problems, "turn": turn})
    if problems:
        print(f"error: {len(problems)} problem(s) with tier {tier} in {models_dir}; "
              "re-run `model_setup.py download` to repair", file=sys.stderr)
        return 1
    return 0


def verify_turn(models_dir: Path, selection: Any, *, quiet: bool) -> dict[str, Any]:
    """Run one voice turn on the selected models; compare with install.json and record the result there."""
    from local_ai_server.config import cpu_count, thread_budget
    from local_ai_server.setup.turn import compare, describe_comparison, run_turn

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
    out: dict[str, Any] = {"measured": measured, "transcript": result.transcript, "answer": result.answer,
                           "comparison": None}
    if record is None or record.tier != selection.tier:
        say("  measured: " + ", ".join(f"{k} {v:g}" for k, v in measured.items()))
        say("  no installation record for this tier (install.json): nothing to compare with; run ./install.sh")
        return out
    rows = compare(measured, record.expected)
    out["comparison"] = rows
    for line in describe_comparison(rows):
        say("  " + line)
    doc = dict(record.doc)
    doc["measured"] = {"at": now_iso(), "figures": measured, "comparison": rows, "transcript": result.transcript}
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
    if args.json:
        emit({"tier": selection.tier, "models_dir": str(models_dir),
               "models": {r: selection.model(r).display for r in ROLES},
               "record": None if record is None else dict(record.doc)})
        return 0
    print(f"tier {selection.tier} in {models_dir}")
    for role in ROLES:
        print(f"  {role}: {selection.model(role).display}")
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
          f"STT {e.get('stt_ms', 0):.0f} ms")
    print(f"  source: {record.expected_source}")
    if record.measured:
        print(f"  measured by `model_setup.py verify` at {record.measured.get('at')}:")
        for line in describe_comparison(record.measured.get("comparison") or {}):
            print(f"    {line}")
    return 0


