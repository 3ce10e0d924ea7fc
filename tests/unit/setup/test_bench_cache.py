"""plan, list and summary predict from the benchmark cached for this hardware fingerprint, and say which."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

import model_setup
from local_ai_server.setup.bench import BENCH_VERSION, cache_path, fingerprint
from local_ai_server.setup.bench_cache import load_cached
from local_ai_server.setup.hardware import Hardware, detect
from local_ai_server.setup.installation import write_record
from local_ai_server.setup.plan import Bench, make_plan
from local_ai_server.setup.registry import Registry, load_registry
from local_ai_server.setup.selection import write_selection
from tests.paths import INSTALLER_FIXTURES, REPO
from tests.unit.setup.test_hardware import machine

pytestmark = pytest.mark.unit

# What `model_setup.py bench` cached on the 2-core EPYC these tests were written on (2026-12-04).
RECORDED_BENCH = INSTALLER_FIXTURES / "this-machine" / "bench.json"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REPO / "registry.json")


def recorded(**changes: Any) -> dict[str, Any]:
    """The recorded bench document, with top-level `changes`."""
    doc: dict[str, Any] = json.loads(RECORDED_BENCH.read_text())
    return doc | changes


def cache_for(cache: Path, hw: Hardware, doc: dict[str, Any]) -> Path:
    """Put `doc` where `bench` caches `hw`'s result, under `hw`'s fingerprint (the fingerprint covers this
    checkout's llama.cpp and engines, so a recorded document is re-keyed to it)."""
    path = cache_path(cache, hw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc | {"fingerprint": fingerprint(hw), "bench_version": BENCH_VERSION}))
    return path


def run(argv: list[str]) -> int:
    """One model_setup.py command in process (its parser and command function; no logging set-up)."""
    args: argparse.Namespace = model_setup._parser().parse_args(argv)
    result: int = args.func(args)
    return result


def hw_file(tmp_path: Path, hw: Hardware) -> Path:
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(hw.to_dict()))
    return path


def test_plan_uses_the_cached_bench_by_default_and_says_so(tmp_path: Path, registry: Registry,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    hw = machine("this-machine")
    cached = cache_for(tmp_path / "cache", hw, recorded())
    common = ["--hardware", str(hw_file(tmp_path, hw)), "--cache-dir", str(tmp_path / "cache"),
              "--models-dir", str(tmp_path / "models")]
    assert run(["plan", *common]) == 0
    out = capsys.readouterr().out
    assert f"benchmark: cached {cached} (measured_at 2026-12-04T18:06:46+00:00)" in out
    assert "inputs: bench: two measured LLMs" in out

    assert run(["plan", "--json", *common]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert f"benchmark: cached {cached}" in captured.err  # stdout holds only the document
    assert doc["bench_used"] == {"origin": "cache", "path": str(cached), "measured_at": "2026-12-04T18:06:46+00:00",
                                 "fingerprint": fingerprint(hw)}
    assert doc["bench_summary"]["measured_at"] == "2026-12-04T18:06:46+00:00"
    assert doc["bench_summary"]["probe_path"] == recorded()["probe"]["path"]
    # The same figures `plan --bench FILE` gives: the default and the install agree.
    expected = make_plan(registry, hw, bench=Bench.from_dict(recorded())).to_dict(registry)["prediction"]
    assert doc["prediction"] == expected
    assert doc["prediction"] != make_plan(registry, hw).to_dict(registry)["prediction"]


def test_a_bench_of_another_fingerprint_is_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hw, other = machine("this-machine"), machine("xeon-e5-2660v3")
    cache = tmp_path / "cache"
    cache_for(cache, other, recorded())  # the Xeon's result, under the Xeon's name
    # A file under this machine's name whose content says it was measured elsewhere (copied, or stale).
    cache_path(cache, hw).write_text(json.dumps(recorded(fingerprint="0123456789abcdef")))
    assert load_cached(cache, hw).origin == "none"
    assert run(["plan", "--json", "--hardware", str(hw_file(tmp_path, hw)), "--cache-dir", str(cache),
                "--models-dir", str(tmp_path / "models")]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["bench_used"]["origin"] == "none" and "bench_summary" not in doc
    assert doc["inputs"]["bench"].startswith("none: predicted from hardware alone")
    assert (f"none cached for this hardware (fingerprint {fingerprint(hw)}): from hardware alone; "
            "run `model_setup.py bench`") in captured.err
    assert load_cached(cache, other).origin == "cache"  # the Xeon's own is found for the Xeon


def test_no_bench_predicts_from_hardware_alone(tmp_path: Path, registry: Registry,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    hw = machine("this-machine")
    cache_for(tmp_path / "cache", hw, recorded())
    common = ["--hardware", str(hw_file(tmp_path, hw)), "--cache-dir", str(tmp_path / "cache"),
              "--models-dir", str(tmp_path / "models")]
    assert run(["plan", "--json", "--no-bench", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench_used"]["origin"] == "disabled" and "bench_summary" not in doc
    assert doc["prediction"] == make_plan(registry, hw).to_dict(registry)["prediction"]
    assert run(["list", "--no-bench", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("benchmark: none (--no-bench): from hardware alone\n")
    with pytest.raises(SystemExit):
        model_setup._parser().parse_args(["plan", "--no-bench", "--bench", "b.json"])


def test_list_uses_the_cached_bench(tmp_path: Path, registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    hw = machine("this-machine")
    cached = cache_for(tmp_path / "cache", hw, recorded())
    assert run(["list", "--json", "--hardware", str(hw_file(tmp_path, hw)), "--cache-dir", str(tmp_path / "cache"),
                "--models-dir", str(tmp_path / "models")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench_used"]["path"] == str(cached)
    embedded = next(t for t in doc["tiers"] if t["name"] == "embedded")
    plan = make_plan(registry, hw, bench=Bench.from_dict(recorded()))
    assert embedded["predicted"] == next(a for a in plan.assessments if a.tier == "embedded").prediction.to_dict()


def test_summary_names_the_cached_bench_and_a_newer_one(tmp_path: Path, registry: Registry,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    models, cache = tmp_path / "models", tmp_path / "cache"
    write_selection(models, registry, "embedded")
    old = recorded()
    prediction = make_plan(registry, detect(models), tier="embedded", bench=Bench.from_dict(old)).chosen.prediction
    write_record(models, {"schema_version": 1, "tier": "embedded", "expected": prediction.to_dict(),
                          "expected_source": "predicted by `model_setup.py plan` from this machine's benchmark",
                          "bench": {"measured_at": old["measured_at"]}})
    hw = detect(models)  # summary describes this machine: its own fingerprint
    cached = cache_for(cache, hw, old)
    assert run(["summary", "--models-dir", str(models), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"benchmark: cached {cached} (measured_at {old['measured_at']})" in out
    assert "note:" not in out  # the record came from the cached benchmark

    newer = recorded(measured_at="2026-12-05T09:00:00+00:00", stt_ms=old["stt_ms"] * 2)
    cache_for(cache, hw, newer)
    assert run(["summary", "--models-dir", str(models), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "benchmark: cached" in out and "(measured_at 2026-12-05T09:00:00+00:00)" in out
    assert (f"note: these expectations came from the benchmark measured_at {old['measured_at']}; from the "
            "benchmark measured_at 2026-12-05T09:00:00+00:00 this tier predicts:") in out
    assert run(["summary", "--json", "--models-dir", str(models), "--cache-dir", str(cache)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["predicted_now"]["prediction"]["stt_ms"] > prediction.stt_ms  # the newer, slower STT
    assert run(["summary", "--no-bench", "--models-dir", str(models), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "benchmark: none (--no-bench)" in out and "note:" not in out
