"""The installation record (models_dir/install.json): what was installed, for which machine, and what to expect.

The installer writes it after choosing and fetching a tier; the server reads it at start-up for the
settings the installer chose (GPU offload, threads) and reports its expectations in `status`, so an
operator can compare what the installer promised with what the server does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from local_ai_server.setup.jsonfile import write_json_atomic
from local_ai_server.setup.registry import SetupError

INSTALL_FILENAME = "install.json"
INSTALL_SCHEMA_VERSION = 1
# The only settings an installation record may carry: the ones whose right value depends on the
# machine the installer measured. Everything else stays the operator's (environment, flags).
SETTING_NAMES = frozenset({
    "LOCAL_LLM_GPU_LAYERS",
    "LOCAL_LLM_THREADS",
    "LOCAL_STT_THREADS",
    "LOCAL_TTS_THREADS",
    "LOCAL_STT_DEVICE",
    "LOCAL_LLM_CONTEXT",
})
_SETTING_VALUE_RE = re.compile(r"^-?[A-Za-z0-9_.]{1,32}$")


class InstallRecordError(SetupError):
    """install.json exists but cannot be used (corrupt, wrong schema, unknown setting)."""


@dataclass(frozen=True)
class InstallRecord:
    """The parsed install.json: tier, hardware summary, expectations (with their source) and settings."""

    tier: str
    installed_at: str
    expected: Mapping[str, float]
    expected_source: str
    settings: Mapping[str, str] = field(default_factory=dict)
    hardware: Mapping[str, Any] = field(default_factory=dict)
    llama_backend: str = "cpu"
    fallback: str | None = None
    measured: Mapping[str, Any] | None = None
    doc: Mapping[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        """The `expected` block of the server's status_response."""
        out: dict[str, Any] = {
            "tier": self.tier,
            "installed_at": self.installed_at,
            "figures": dict(self.expected),
            "source": self.expected_source,
            "llama_backend": self.llama_backend,
            "hardware": dict(self.hardware),
        }
        if self.fallback:
            out["fallback"] = self.fallback
        if self.measured:
            out["measured_at_install"] = dict(self.measured)
        return out


def record_path(models_dir: Path) -> Path:
    """Where the installation record of `models_dir` lives."""
    return Path(models_dir) / INSTALL_FILENAME


def now_iso() -> str:
    """UTC now, second resolution, ISO 8601 with Z."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_record(models_dir: Path, doc: Mapping[str, Any]) -> Path:
    """Validate `doc` and write it atomically as models_dir/install.json; return the path."""
    parse_record(doc, source="<new record>")  # never write what the server would refuse to read
    return write_json_atomic(record_path(models_dir), doc)


def read_record(models_dir: Path) -> InstallRecord | None:
    """The record of `models_dir`; None when there is none, InstallRecordError when it is unusable."""
    path = record_path(models_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallRecordError(f"cannot read {path}: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InstallRecordError(f"corrupt installation record {path}: {exc}; re-run ./install.sh") from None
    return parse_record(doc, source=str(path))


def parse_record(doc: Any, *, source: str) -> InstallRecord:
    """Validate an install.json document."""
    if not isinstance(doc, Mapping):
        raise InstallRecordError(f"installation record {source}: not a JSON object")
    if doc.get("schema_version") != INSTALL_SCHEMA_VERSION:
        raise InstallRecordError(f"installation record {source}: schema_version {doc.get('schema_version')!r}, "
                                 f"expected {INSTALL_SCHEMA_VERSION}")
    tier = doc.get("tier")
    if not isinstance(tier, str) or not tier:
        raise InstallRecordError(f"installation record {source}: missing tier")
    expected = doc.get("expected")
    if not isinstance(expected, Mapping) or not expected:
        raise InstallRecordError(f"installation record {source}: missing expected figures")
    figures: dict[str, float] = {}
    for key, value in expected.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InstallRecordError(f"installation record {source}: expected.{key} must be a number")
        figures[str(key)] = float(value)
    settings_raw = doc.get("settings") or {}
    if not isinstance(settings_raw, Mapping):
        raise InstallRecordError(f"installation record {source}: settings must be an object")
    settings: dict[str, str] = {}
    for key, value in settings_raw.items():
        if key not in SETTING_NAMES:
            raise InstallRecordError(f"installation record {source}: unknown setting {key!r}")
        text = str(value)
        if not _SETTING_VALUE_RE.match(text):
            raise InstallRecordError(f"installation record {source}: setting {key} has an unusable value")
        settings[key] = text
    measured = doc.get("measured")
    if measured is not None and not isinstance(measured, Mapping):
        raise InstallRecordError(f"installation record {source}: measured must be an object")
    hardware = doc.get("hardware") or {}
    if not isinstance(hardware, Mapping):
        raise InstallRecordError(f"installation record {source}: hardware must be an object")
    fallback = doc.get("fallback")
    return InstallRecord(
        tier=tier,
        installed_at=str(doc.get("installed_at", "")),
        expected=figures,
        expected_source=str(doc.get("expected_source", "")),
        settings=settings,
        hardware=dict(hardware),
        llama_backend=str(doc.get("llama_backend", "cpu")),
        fallback=str(fallback) if fallback else None,
        measured=dict(measured) if measured else None,
        doc=dict(doc),
    )
