"""install.json: written atomically, validated, and read by the server (settings under the environment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from local_ai_server.__main__ import load_config
from local_ai_server.config import cpu_count, thread_budget
from local_ai_server.setup.installation import (
    InstallRecordError,
    parse_record,
    read_record,
    record_path,
    write_record,
)
from local_ai_server.setup.registry import load_registry
from local_ai_server.setup.selection import write_selection
from tests.paths import REPO


def record(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "installed_at": "2026-12-01T00:00:00Z",
        "tier": "embedded",
        "expected": {"decode_tok_s": 100.0, "first_audio_ms": 600, "voice_turn_ms": 800},
        "expected_source": "predicted by `model_setup.py plan` from this machine's benchmark",
        "hardware": {"cpu_model": "Test CPU", "cpu_cores": 2, "ram_gb": 8.0, "gpu": None},
        "llama_backend": "cpu",
        "settings": {"LOCAL_LLM_THREADS": "1", "LOCAL_STT_THREADS": "1"},
        "measured": None,
    }
    doc.update(overrides)
    return doc


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    write_selection(d, load_registry(REPO / "registry.json"), "embedded")
    return d


def test_round_trip(tmp_path: Path) -> None:
    path = write_record(tmp_path, record())
    assert path == record_path(tmp_path) and not list(tmp_path.glob(".install-*"))
    rec = read_record(tmp_path)
    assert rec is not None and rec.tier == "embedded" and rec.expected["first_audio_ms"] == 600.0
    assert rec.settings == {"LOCAL_LLM_THREADS": "1", "LOCAL_STT_THREADS": "1"}
    status = rec.status()
    assert status["figures"]["decode_tok_s"] == 100.0 and status["source"].startswith("predicted")
    assert status["hardware"]["cpu_model"] == "Test CPU"


def test_missing_record_is_none(tmp_path: Path) -> None:
    assert read_record(tmp_path) is None


@pytest.mark.parametrize("bad, message", [
    ({"schema_version": 2}, "schema_version"),
    ({"tier": ""}, "missing tier"),
    ({"expected": {}}, "missing expected"),
    ({"expected": {"decode_tok_s": "fast"}}, "must be a number"),
    ({"settings": {"LOCAL_WS_AUTH_TOKEN": "x"}}, "unknown setting"),
    ({"settings": {"LOCAL_LLM_THREADS": "1; rm -rf /"}}, "unusable value"),
    ({"measured": [1]}, "measured must be an object"),
])
def test_invalid_records_are_refused(bad: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(InstallRecordError) as info:
        parse_record(record(**bad), source="t")
    assert message in str(info.value)
    with pytest.raises(InstallRecordError):
        write_record(tmp_path, record(**bad))  # never written, so never read back
    assert not record_path(tmp_path).exists()


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    record_path(tmp_path).write_text("{not json")
    with pytest.raises(InstallRecordError) as info:
        read_record(tmp_path)
    assert "corrupt installation record" in str(info.value)


def test_server_applies_the_record_under_the_environment(models_dir: Path) -> None:
    write_record(models_dir, record())
    cfg = load_config(["--models-dir", str(models_dir)], env={})
    assert cfg.llm.threads == 1 and cfg.stt.threads == 1
    assert cfg.expected is not None and cfg.expected["figures"]["first_audio_ms"] == 600.0
    # The operator's environment wins over the installer's choice.
    cfg = load_config(["--models-dir", str(models_dir)], env={"LOCAL_LLM_THREADS": "2"})
    assert cfg.llm.threads == 2 and cfg.stt.threads == 1


def test_gpu_settings_reach_the_config(models_dir: Path) -> None:
    write_record(models_dir, record(settings={"LOCAL_LLM_GPU_LAYERS": "-1", "LOCAL_STT_DEVICE": "cuda"}))
    cfg = load_config(["--models-dir", str(models_dir)], env={})
    assert cfg.llm.gpu_layers == -1
    assert cfg.stt.device == "cuda" and cfg.stt.compute_type == "int8_float16"


def test_a_stale_or_corrupt_record_is_a_warning_not_a_stop(models_dir: Path) -> None:
    write_record(models_dir, record(tier="LIGHT_CPU"))
    warnings: list[str] = []
    cfg = load_config(["--models-dir", str(models_dir)], env={}, warnings=warnings)
    # Nothing of the stale record applies: threads are the defaults for this machine.
    assert cfg.expected is None and cfg.llm.threads == thread_budget(cpu_count())[0]
    assert len(warnings) == 1 and "for tier LIGHT_CPU" in warnings[0]
    record_path(models_dir).write_text(json.dumps({"schema_version": 1}))
    warnings.clear()
    cfg = load_config(["--models-dir", str(models_dir)], env={}, warnings=warnings)
    assert cfg.expected is None and "ignoring the installation record" in warnings[0]
