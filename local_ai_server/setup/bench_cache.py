"""Which benchmark a command predicts from: a `--bench FILE`, this machine's cached one, or none (`--no-bench`).

`plan`, `list` and `summary` read the result `bench` cached for this hardware fingerprint by default, so
they predict what the installer predicted, and say which benchmark (path, measured_at) they used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_ai_server.setup.hardware import Hardware
from local_ai_server.setup.plan_bench import Bench, PlanError

ORIGINS = ("file", "cache", "none", "disabled")


def default_cache_dir() -> Path:
    """$LOCAL_AI_CACHE, else $XDG_CACHE_HOME/local-ai-server (~/.cache/local-ai-server)."""
    configured = os.environ.get("LOCAL_AI_CACHE", "").strip()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "local-ai-server"


@dataclass(frozen=True)
class BenchChoice:
    """The benchmark a prediction uses and where it came from (origin is one of ORIGINS)."""

    origin: str
    doc: dict[str, Any] | None = None
    path: Path | None = None
    fingerprint: str | None = None

    @property
    def bench(self) -> Bench | None:
        """The validated rates, or None when predicting from hardware alone."""
        return None if self.doc is None else Bench.from_dict(self.doc)

    @property
    def measured_at(self) -> str | None:
        """When the benchmark was measured, if it says."""
        value = None if self.doc is None else self.doc.get("measured_at")
        return None if value is None else str(value)

    def describe(self) -> str:
        """One line: which benchmark the figures come from."""
        if self.origin == "file":
            return f"{self.path} (--bench; measured_at {self.measured_at or '?'})"
        if self.origin == "cache":
            return f"cached {self.path} (measured_at {self.measured_at or '?'})"
        if self.origin == "disabled":
            return "none (--no-bench): from hardware alone"
        return (f"none cached for this hardware (fingerprint {self.fingerprint}): from hardware alone; "
                "run `model_setup.py bench`")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: origin, path, measured_at, fingerprint."""
        return {"origin": self.origin, "path": None if self.path is None else str(self.path),
                "measured_at": self.measured_at, "fingerprint": self.fingerprint}


def load_cached(cache_dir: Path, hw: Hardware) -> BenchChoice:
    """The benchmark cached for `hw`'s fingerprint in `cache_dir`; origin "none" when there is no usable one.

    Only the file named by this fingerprint is read, and its own fingerprint and version must agree:
    a result measured on other hardware, another llama.cpp or other engines never predicts for this one.
    """
    from local_ai_server.setup.bench import BENCH_VERSION, cache_path, fingerprint

    fp = fingerprint(hw)
    path = cache_path(cache_dir, hw)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return BenchChoice("none", fingerprint=fp)
    if not isinstance(doc, dict) or doc.get("fingerprint") != fp or doc.get("bench_version") != BENCH_VERSION:
        return BenchChoice("none", fingerprint=fp)
    try:
        Bench.from_dict(doc)
    except PlanError:
        return BenchChoice("none", fingerprint=fp)
    return BenchChoice("cache", doc=doc, path=path, fingerprint=fp)


def from_file(path: Path, doc: dict[str, Any]) -> BenchChoice:
    """The benchmark a `--bench FILE` holds (`doc`, already read); PlanError when it is unusable."""
    Bench.from_dict(doc)  # a bad file is an error, never a silent "from hardware alone"
    fp = doc.get("fingerprint")
    return BenchChoice("file", doc=doc, path=Path(path), fingerprint=None if fp is None else str(fp))


def cached_or_none(hw: Hardware, *, no_bench: bool, cache_dir: Path | None) -> BenchChoice:
    """No benchmark with `no_bench` (--no-bench), else the one cached for `hw` in `cache_dir` (or the default)."""
    if no_bench:
        return BenchChoice("disabled")
    return load_cached(Path(cache_dir or default_cache_dir()).expanduser().absolute(), hw)


def bench_summary(choice: BenchChoice) -> dict[str, Any] | None:
    """The plan's (and install.json's) `bench_summary`: the probe's rates, STT, TTS, when and where measured."""
    doc = choice.doc
    if doc is None:
        return None
    probe = doc.get("probe", {})
    summary = {k: probe.get(k) for k in ("model", "source", "decode_tok_s", "prefill_tok_s", "ttft_ms",
                                         "rss_mb", "threads")}
    summary |= {"stt_ms": doc.get("stt_ms"), "tts_ms": doc.get("tts_ms"), "measured_at": doc.get("measured_at"),
                "origin": choice.origin, "path": None if choice.path is None else str(choice.path),
                "fingerprint": doc.get("fingerprint"), "probe_path": probe.get("path")}
    return summary
