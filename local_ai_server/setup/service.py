"""The systemd unit that runs the server as a service (written by `install.sh --service`)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from local_ai_server.setup.registry import SetupError

UNIT_NAME = "local-ai-server.service"
# Optional operator settings (LOCAL_WS_HOST, LOCAL_WS_AUTH_TOKEN, ...); the leading "-" makes it optional.
ENV_FILE = "/etc/local-ai-server.env"
# The server drains calls for up to LOCAL_DRAIN_TIMEOUT_S (30 s by default) on SIGTERM, then stops its workers;
# systemd must wait longer than both before SIGKILL.
STOP_TIMEOUT_S = 45


class ServiceError(SetupError):
    """The unit could not be written or enabled."""


@dataclass(frozen=True)
class UnitSpec:
    """Everything the unit names: who runs what, where."""

    venv: Path
    root: Path
    models_dir: Path
    user: str
    env_file: str = ENV_FILE


def _quote(value: str) -> str:
    # systemd accepts C-style quoting; any whitespace or quote in a path must be quoted.
    if value and all(c.isalnum() or c in "/._-+:@=" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(spec: UnitSpec) -> str:
    """The unit file text."""
    exec_start = _quote(str(spec.venv / "bin" / "local-ai-server"))
    return "\n".join([
        "[Unit]",
        "Description=local-ai-server: self-hosted voice AI over WebSocket (STT -> LLM -> TTS)",
        "Documentation=file://" + str(spec.root / "README.md"),
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={spec.user}",
        f"WorkingDirectory={_quote(str(spec.root))}",
        f"Environment={_quote('LOCAL_MODELS_DIR=' + str(spec.models_dir))}",
        "Environment=LOCAL_LOG_JSON=1",
        f"EnvironmentFile=-{spec.env_file}",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=2",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "LimitNOFILE=65536",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def systemd_running() -> bool:
    """True when systemd is PID 1 here (containers and CI runners usually have no systemd)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def install_unit(spec: UnitSpec, unit_dir: Path, *, enable: bool) -> tuple[Path, list[str]]:
    """Write the unit atomically into `unit_dir`; with `enable`, reload systemd and start it.

    Returns the unit path and what was done (or why enabling was skipped).
    """
    unit_dir = Path(unit_dir)
    target = unit_dir / UNIT_NAME
    if not unit_dir.is_dir():
        raise ServiceError(f"{unit_dir} does not exist; is systemd installed?")
    if not os.access(unit_dir, os.W_OK):
        raise ServiceError(f"cannot write {target}: permission denied (run the installer with sudo for --service)")
    tmp = unit_dir / f".{UNIT_NAME}.tmp"
    try:
        tmp.write_text(render_unit(spec), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"cannot write {target}: {exc.strerror or exc}") from None
    done = [f"wrote {target}"]
    if not enable:
        return target, done
    if not systemd_running():
        done.append("systemd is not running on this machine: the unit was written but not enabled; "
                    f"on a systemd host run: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}")
        return target, done
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0:
            raise ServiceError(f"`{shlex.join(cmd)}` failed: {' '.join(proc.stderr.split())}")
        done.append(f"ran {shlex.join(cmd)}")
    return target, done
