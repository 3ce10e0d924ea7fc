"""The systemd unit: what it says, that systemd accepts it, and how installing it fails or succeeds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local_ai_server.config import from_env
from local_ai_server.setup.service import UNIT_NAME, ServiceError, UnitSpec, install_unit, render_unit, systemd_running
from tests.paths import REPO


def spec(tmp_path: Path, root: Path = REPO) -> UnitSpec:
    return UnitSpec(venv=tmp_path / "venv dir", root=root, models_dir=tmp_path / "models", user="voice")


def test_unit_runs_the_server_with_its_models_and_drains_on_stop(tmp_path: Path) -> None:
    text = render_unit(spec(tmp_path))
    lines = text.splitlines()
    assert f'ExecStart="{tmp_path}/venv dir/bin/local-ai-server"' in lines  # a space in a path is quoted
    assert f"Environment=LOCAL_MODELS_DIR={tmp_path}/models" in lines
    assert "User=voice" in lines and "KillSignal=SIGTERM" in lines and "Restart=on-failure" in lines
    assert "EnvironmentFile=-/etc/local-ai-server.env" in lines
    # The server drains for up to LOCAL_DRAIN_TIMEOUT_S after SIGTERM, then stops its workers: systemd
    # must not SIGKILL it sooner.
    stop = next(int(line.split("=")[1]) for line in lines if line.startswith("TimeoutStopSec="))
    assert stop > from_env({}, models_dir=tmp_path).drain_timeout_s + 10
    assert lines[lines.index("[Install]") + 1] == "WantedBy=multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    # Verify against a unit whose binary exists, so only the unit's own syntax can fail.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "local-ai-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / UNIT_NAME
    unit.write_text(render_unit(UnitSpec(venv=venv, root=tmp_path, models_dir=tmp_path, user="root")))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT_NAME in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_install_writes_atomically_and_reports(tmp_path: Path) -> None:
    unit, done = install_unit(spec(tmp_path), tmp_path, enable=False)
    assert unit == tmp_path / UNIT_NAME and unit.read_text() == render_unit(spec(tmp_path))
    assert done == [f"wrote {unit}"] and not list(tmp_path.glob(f".{UNIT_NAME}*"))


@pytest.mark.skipif(systemd_running(), reason="would really enable a service on this host")
def test_enable_without_systemd_says_so(tmp_path: Path) -> None:
    unit, done = install_unit(spec(tmp_path), tmp_path, enable=True)
    assert unit.is_file() and "systemd is not running" in done[-1] and "systemctl enable --now" in done[-1]


def test_missing_or_unwritable_unit_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="does not exist"):
        install_unit(spec(tmp_path), tmp_path / "nope", enable=False)
    # /proc/1 refuses new files even to root (CI runs as root, so a chmod'ed dir would not do).
    with pytest.raises(ServiceError, match="(permission denied|cannot write)"):
        install_unit(spec(tmp_path), Path("/proc/1"), enable=False)


def test_cli_writes_the_unit(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "model_setup.py"), "service", "--unit-dir", str(tmp_path),
                           "--models-dir", str(tmp_path / "m"), "--user", "voice", "--venv", str(tmp_path / "v"),
                           "--no-enable", "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / UNIT_NAME).read_text()
    assert f"ExecStart={tmp_path}/v/bin/local-ai-server" in text and "User=voice" in text
