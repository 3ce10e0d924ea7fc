"""The real server reads the installer's record: its settings apply and `status` reports its expectations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from local_ai_server.setup.installation import record_path, write_record
from local_ai_server.setup.selection import read_selection, selection_path

from .conftest import connect, start_server


def linked_models(src: Path, dst: Path) -> Path:
    """A models dir holding symlinks to the installed models and a copy of their selection."""
    selection = read_selection(src)
    assert selection is not None
    dst.mkdir()
    for role in ("stt", "llm", "tts"):
        rel = Path(selection.model(role).path)
        (dst / rel.parent).mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to(src / rel)
        if role == "tts":
            (dst / f"{rel}.json").symlink_to(src / f"{rel}.json")
    shutil.copy(selection_path(src), selection_path(dst))
    return dst


async def test_status_reports_the_record_and_its_settings_apply(models_dir: Path, tmp_path: Path) -> None:
    models = linked_models(models_dir, tmp_path / "models")
    expected = {"decode_tok_s": 101.5, "ttft_ms": 48, "stt_ms": 410, "first_audio_ms": 760, "voice_turn_ms": 1150}
    write_record(models, {
        "schema_version": 1, "installed_at": "2026-12-01T07:00:00Z", "tier": "embedded",
        "expected": expected, "expected_source": "predicted by `model_setup.py plan` from this machine's benchmark",
        "hardware": {"cpu_model": "Recorded CPU", "cpu_cores": 2, "ram_gb": 23.5, "gpu": None},
        "llama_backend": "cpu", "fallback": "LIGHT_CPU suits this machine, but ...; installing embedded instead",
        "settings": {"LOCAL_LLM_THREADS": "1"},
        "measured": {"at": "2026-12-01T07:01:00Z", "figures": {"first_audio_ms": 800}},
    })
    srv = start_server(tmp_path, models)
    try:
        c = await connect(srv)
        s = await c.request({"type": "status"}, "status_response")
        await c.close()
        assert s["models"]["llm"]["config"]["threads"] == 1  # the installer's choice was applied
        e = s["expected"]
        assert e["tier"] == "embedded" and e["figures"] == {k: float(v) for k, v in expected.items()}
        assert e["source"].startswith("predicted by") and e["llama_backend"] == "cpu"
        assert e["fallback"].startswith("LIGHT_CPU suits") and e["measured_at_install"]["figures"]
        assert s["hardware"]["cpu_model"] == "Recorded CPU" and s["hardware"]["llm_gpu_layers"] == 0
        assert s["hardware"]["stt_device"] == "cpu"
    finally:
        assert srv.stop() == 0


async def test_a_stale_record_is_ignored_with_a_warning(models_dir: Path, tmp_path: Path) -> None:
    models = linked_models(models_dir, tmp_path / "models")
    record_path(models).write_text(json.dumps({"schema_version": 1, "tier": "HEAVY_GPU",
                                               "expected": {"decode_tok_s": 90}, "settings": {}}))
    srv = start_server(tmp_path, models)
    try:
        c = await connect(srv)
        s = await c.request({"type": "status"}, "status_response")
        await c.close()
        assert s["status"] == "ok" and s["expected"] is None and s["models"]["llm"]["loaded"] is True
        warnings = [e for e in srv.log_events() if e.get("event") == "server.config_warning"]
        assert len(warnings) == 1 and "for tier HEAVY_GPU" in warnings[0]["warning"]
    finally:
        assert srv.stop() == 0
