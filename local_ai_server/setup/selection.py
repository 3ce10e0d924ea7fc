"""The installed selection (models_dir/selected.json) and the default models dir and registry path."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from local_ai_server.setup.jsonfile import write_json_atomic
from local_ai_server.setup.registry import OPTIONAL_ROLES, ROLES, Registry, SetupError

SELECTION_FILENAME = "selected.json"
SELECTION_SCHEMA_VERSION = 1
REGISTRY_FILENAME = "registry.json"


class SelectionError(SetupError):
    """selected.json exists but cannot be trusted (corrupt, wrong schema, unsafe path)."""


@dataclass(frozen=True)
class SelectedModel:
    """One selected model: its registry id, its path relative to the models dir, its display name."""

    id: str
    path: str
    display: str


@dataclass(frozen=True)
class Selection:
    """The tier installed in a models dir and where each role's model lives."""

    tier: str
    stt: SelectedModel
    llm: SelectedModel
    tts: SelectedModel
    models_dir: Path
    turn: SelectedModel | None = None  # optional: selections written before the turn detector lack it

    def model(self, role: str) -> SelectedModel:
        """The selected model for `role` (stt, llm, tts, or turn when the tier has one)."""
        model: SelectedModel | None = getattr(self, role) if role in ROLES + OPTIONAL_ROLES else None
        if model is None:
            raise KeyError(role)
        return model

    def path(self, role: str) -> Path:
        """Absolute path of the model for `role` (a directory for stt, a file for llm and tts)."""
        return self.models_dir / self.model(role).path

    def paths(self) -> dict[str, Path]:
        """Absolute model paths keyed by role, as config.from_env(selection_paths=...) takes them."""
        return {role: self.path(role) for role in ROLES + OPTIONAL_ROLES if getattr(self, role) is not None}


def repo_root() -> Path | None:
    """The source checkout holding this package, recognised by a registry.json beside the package dir."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / REGISTRY_FILENAME).is_file() else None


def default_models_dir(env: Mapping[str, str] | None = None) -> Path:
    """$LOCAL_MODELS_DIR, else <repo root>/models in a checkout, else the per-user data dir."""
    env = os.environ if env is None else env
    configured = env.get("LOCAL_MODELS_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    root = repo_root()
    if root is not None:
        return root / "models"
    data_home = env.get("XDG_DATA_HOME", "").strip()
    base = Path(data_home).expanduser() if data_home else Path.home() / ".local" / "share"
    return base / "local-ai-server" / "models"


def default_registry_path(env: Mapping[str, str] | None = None) -> Path:
    """$LOCAL_REGISTRY_PATH, else the registry.json beside the package directory."""
    env = os.environ if env is None else env
    configured = env.get("LOCAL_REGISTRY_PATH", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[2] / REGISTRY_FILENAME


def selection_path(models_dir: Path) -> Path:
    """Where the selection of `models_dir` is stored."""
    return Path(models_dir) / SELECTION_FILENAME


def write_selection(models_dir: Path, registry: Registry, tier: str) -> Path:
    """Atomically record `tier` (any case) as the installed selection of `models_dir`; return the file."""
    tier_obj = registry.tier(tier)
    data: dict[str, Any] = {"schema_version": SELECTION_SCHEMA_VERSION, "tier": tier_obj.name}
    for role, model in registry.tier_models(tier).items():
        data[role] = {"id": model.id, "path": model.dest, "display": model.display}
    # Write-then-rename: a server starting mid-write sees the old file or the new one, never half.
    return write_json_atomic(selection_path(models_dir), data)


def read_selection(models_dir: Path) -> Selection | None:
    """The selection of `models_dir`; None when none was written, SelectionError when it is unusable."""
    path = selection_path(models_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SelectionError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SelectionError(f"corrupt selection {path}: {exc}; re-run `model_setup.py download`") from None
    if not isinstance(data, dict):
        raise SelectionError(f"corrupt selection {path}: not a JSON object")
    if data.get("schema_version") != SELECTION_SCHEMA_VERSION:
        raise SelectionError(
            f"selection {path} has schema_version {data.get('schema_version')!r}, "
            f"expected {SELECTION_SCHEMA_VERSION}"
        )
    tier = data.get("tier")
    if not isinstance(tier, str) or not tier:
        raise SelectionError(f"corrupt selection {path}: missing tier")
    models = {role: _selected_model(data.get(role), role, path) for role in ROLES}
    turn = _selected_model(data["turn"], "turn", path) if data.get("turn") is not None else None
    return Selection(tier=tier, models_dir=Path(models_dir), turn=turn, **models)


def _selected_model(raw: Any, role: str, path: Path) -> SelectedModel:
    if not isinstance(raw, dict):
        raise SelectionError(f"corrupt selection {path}: missing {role}")
    fields = {}
    for key in ("id", "path", "display"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise SelectionError(f"corrupt selection {path}: {role}.{key} must be a non-empty string")
        fields[key] = value
    rel = PurePosixPath(fields["path"])
    # The server loads whatever this names: it must stay inside the models dir.
    if rel.is_absolute() or ".." in rel.parts or "\\" in fields["path"]:
        raise SelectionError(f"selection {path}: {role}.path {fields['path']!r} must be relative to the models dir")
    return SelectedModel(**fields)
