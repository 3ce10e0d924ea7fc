"""What model_setup.py's commands share: arguments to registry, models dir and inputs, JSON out, log lines."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from local_ai_server.setup.bench_cache import BenchChoice, cached_or_none, from_file
from local_ai_server.setup.fetch import LogFn
from local_ai_server.setup.hardware import Hardware, detect
from local_ai_server.setup.jsonfile import write_json_atomic
from local_ai_server.setup.registry import Registry, SetupError, load_registry
from local_ai_server.setup.selection import default_models_dir


def default_registry(root: Path) -> Path:
    """$LOCAL_REGISTRY_PATH, else registry.json in `root`, the checkout holding model_setup.py."""
    configured = os.environ.get("LOCAL_REGISTRY_PATH", "").strip()
    return Path(configured).expanduser() if configured else root / "registry.json"


def args_registry(args: argparse.Namespace) -> Registry:
    """The registry --registry names, else the default one (`args.root` is set by model_setup.py's parser)."""
    return load_registry(args.registry or default_registry(args.root))


def args_models_dir(args: argparse.Namespace) -> Path:
    """The models dir --models-dir names, else the default one, absolute."""
    return Path(args.models_dir or default_models_dir()).expanduser().absolute()


def args_hardware(args: argparse.Namespace) -> Hardware:
    """The machine --hardware describes (a `detect --json` file), else this one."""
    if args.hardware is None:
        return detect(args_models_dir(args) if hasattr(args, "models_dir") else None)
    try:
        return Hardware.from_dict(read_json(args.hardware))
    except ValueError as exc:
        raise SetupError(f"{args.hardware}: {exc}") from None


def args_bench(args: argparse.Namespace, hw: Hardware) -> BenchChoice:
    """The benchmark to predict from: --bench FILE, none with --no-bench, else the one cached for `hw`."""
    if getattr(args, "bench", None) is not None:
        return from_file(args.bench, read_json(args.bench))
    return cached_or_none(hw, no_bench=bool(getattr(args, "no_bench", False)),
                          cache_dir=getattr(args, "cache_dir", None))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; SetupError if it is not valid JSON or not an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SetupError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SetupError(f"{path} must hold a JSON object")
    return doc


def save(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """Write `doc` to --out (atomically), when given."""
    target = getattr(args, "out", None)
    if target is None:
        return
    write_json_atomic(Path(target), doc)


def line_logger(stream: TextIO) -> LogFn:
    """A progress log printing `event key=value ...` lines on `stream`."""

    def log(event: str, **fields: object) -> None:
        parts = [event]
        for key, value in fields.items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if ' ' in text else text}")
        print(" ".join(parts), file=stream, flush=True)

    return log


def emit(doc: dict[str, Any]) -> None:
    """Print the command's JSON document on stdout."""
    print(json.dumps(doc, indent=2))


def mb(n: int) -> float:
    """Bytes as MB with one decimal."""
    return round(n / 1_000_000, 1)



# The predicted figures as printed: key, label, unit.
FIGURE_LABELS = (
    ("decode_tok_s", "decode (the LLM alone)", "tok/s"),
    ("prefill_tok_s", "prefill", "tok/s"),
    ("ttft_ms", "first token", "ms"),
    ("stt_ms", "STT of a 3 s question", "ms"),
    ("tts_first_sentence_ms", "first sentence spoken", "ms"),
    ("first_audio_ms", "first audio", "ms"),
    ("turn_decode_tok_s", "decode during a voice turn", "tok/s"),
    ("voice_turn_ms", "voice turn", "ms"),
    ("ready_ms", "cold start to /ready", "ms"),
)


def expectation_lines(expected: Mapping[str, Any], bound: Mapping[str, Any] | None,
                      measured: Sequence[str] = ()) -> list[str]:
    """One line per figure: its p50, the pessimistic end of its range, and whether it was measured here."""
    lines = []
    for key, label, unit in FIGURE_LABELS:
        if key not in expected:
            continue
        p50 = float(expected[key])
        worst = None if not bound or key not in bound else float(bound[key])
        text = f"{p50:g} {unit}" + ("" if worst is None or worst == p50 else f" (at worst {worst:g})")
        origin = "measured here" if key in measured else "estimate"
        lines.append(f"{label + ':':<29}{text:<32}{origin}")
    return lines
