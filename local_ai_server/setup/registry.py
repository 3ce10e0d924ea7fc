"""The model registry: registry.json read and validated against its schema into the typed registry_model.

Every schema violation is a RegistryError naming the registry and the offending field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from local_ai_server.setup.llm_shape import ShapeError, shape_from_dict
from local_ai_server.setup.registry_model import (
    HF_RESOLVE_RE,
    OPTIONAL_ROLES,
    RESERVED_PATHS,
    ROLES,
    SHA256_RE,
    VERIFY_HF_LFS,
    VERIFY_KINDS,
    VERIFY_PINNED,
    Model,
    ModelFile,
    PypiWheelSource,
    Registry,
    RegistryError,
    SetupError,
    Source,
    Tier,
    UrlSource,
)

# The registry's names, with those of its data model that callers import from here.
__all__ = [
    "HF_RESOLVE_RE", "OPTIONAL_ROLES", "RESERVED_PATHS", "ROLES", "SCHEMA_VERSION", "VERIFY_HF_LFS", "VERIFY_KINDS",
    "VERIFY_PINNED",
    "Model", "ModelFile", "PypiWheelSource", "Registry", "RegistryError", "SetupError", "Source", "Tier", "UrlSource",
    "load_registry", "parse_registry",
]

SCHEMA_VERSION = 1
# PEP 508 project names; versions are only checked for being non-empty and free of spaces
# because pip, not us, is the authority on what a version string means.
_PACKAGE_RE = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_URL_SCHEMES = ("https://", "http://", "file://")

_TOP_KEYS = {"schema_version", "tiers", "models"}
_TIER_KEYS = {"description", "requirements", "models"}
_TIER_OPTIONAL = {"rank"}
_MODEL_REQUIRED = {"id", "role", "display", "license", "dest", "files"}
_MODEL_OPTIONAL = {
    "architecture",
    "params_b",
    "sha256_source",
    "format",
    "language",
    "quantization",
    "quality",
    "sample_rate_hz",
    "chat_format",
    "context_length",
    "homepage",
    "notes",
}
_OPT_INT = ("sample_rate_hz", "context_length")
_OPT_STR = tuple(sorted(_MODEL_OPTIONAL - set(_OPT_INT) - {"params_b", "architecture"}))
_FILE_KEYS = {"path", "size_bytes", "sha256", "sources"}
_FILE_OPTIONAL = {"verify"}
_URL_KEYS = {"kind", "url"}
_WHEEL_KEYS = {"kind", "package", "version", "wheel_sha256", "member"}


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry.json file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"registry not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read registry {p}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"registry {p} is not valid JSON: {exc}") from None
    return parse_registry(data, source=str(p))


def parse_registry(data: Any, *, source: str = "<memory>") -> Registry:
    """Validate already-decoded registry JSON; every problem raises RegistryError naming `source`."""
    try:
        return _parse(data, source)
    except _Invalid as exc:
        raise RegistryError(f"invalid registry {source}: {exc}") from None


class _Invalid(Exception):
    """Internal: a schema violation, wrapped into RegistryError with the registry's name."""


def _parse(data: Any, source: str) -> Registry:
    obj = _object(data, "top level")
    _keys(obj, "top level", required=_TOP_KEYS, optional=set())
    version = obj["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise _Invalid(f"schema_version must be {SCHEMA_VERSION}, got {version!r}")

    models_obj = _object(obj["models"], "models")
    if not models_obj:
        raise _Invalid("models is empty")
    models: dict[str, Model] = {}
    for key, raw in models_obj.items():
        models[key] = _model(key, raw)
    _check_unique_paths(models.values())

    tiers_obj = _object(obj["tiers"], "tiers")
    if not tiers_obj:
        raise _Invalid("tiers is empty")
    tiers: dict[str, Tier] = {}
    for name, raw in tiers_obj.items():
        tier = _tier(name, raw, models)
        folded = name.lower()
        if folded in tiers:
            raise _Invalid(f"tier names {tiers[folded].name!r} and {name!r} differ only in case")
        tiers[folded] = tier
    return Registry(
        schema_version=version,
        tiers=MappingProxyType(tiers),
        models=MappingProxyType(models),
        source=source,
    )


def _tier(name: str, raw: Any, models: Mapping[str, Model]) -> Tier:
    where = f"tier {name!r}"
    if not _ID_RE.match(name):
        raise _Invalid(f"{where}: name must be letters, digits, '.', '_' or '-'")
    obj = _object(raw, where)
    _keys(obj, where, required=_TIER_KEYS, optional=_TIER_OPTIONAL)
    rank = obj.get("rank", 0)
    if type(rank) is not int or rank < 0:
        raise _Invalid(f"{where}.rank must be a non-negative integer, got {rank!r}")
    description = _string(obj["description"], f"{where}.description")
    req_obj = _object(obj["requirements"], f"{where}.requirements")
    requirements: dict[str, float | int | bool] = {}
    for key, value in req_obj.items():
        # bool is checked apart because it is an int subclass yet must not need to be >= 0.
        if not (isinstance(value, bool) or (isinstance(value, (int, float)) and value >= 0)):
            raise _Invalid(f"{where}.requirements.{key} must be a non-negative number or a boolean")
        requirements[key] = value
    roles_obj = _object(obj["models"], f"{where}.models")
    _keys(roles_obj, f"{where}.models", required=set(ROLES), optional=set(OPTIONAL_ROLES))
    roles: dict[str, str] = {}
    for role in (r for r in ROLES + OPTIONAL_ROLES if r in roles_obj):
        model_id = _string(roles_obj[role], f"{where}.models.{role}")
        model = models.get(model_id)
        if model is None:
            raise _Invalid(f"{where}.models.{role} refers to unknown model {model_id!r}")
        if model.role != role:
            raise _Invalid(f"{where}.models.{role} refers to {model_id!r}, which is a {model.role} model")
        roles[role] = model_id
    return Tier(
        name=name,
        description=description,
        requirements=MappingProxyType(requirements),
        models=MappingProxyType(roles),
        rank=rank,
    )


def _model(key: str, raw: Any) -> Model:
    where = f"model {key!r}"
    obj = _object(raw, where)
    _keys(obj, where, required=_MODEL_REQUIRED, optional=_MODEL_OPTIONAL)
    model_id = _string(obj["id"], f"{where}.id")
    if model_id != key:
        raise _Invalid(f"{where}: id {model_id!r} does not match its key")
    if not _ID_RE.match(model_id):
        raise _Invalid(f"{where}: id must be letters, digits, '.', '_' or '-'")
    role = _string(obj["role"], f"{where}.role")
    if role not in ROLES + OPTIONAL_ROLES:
        raise _Invalid(f"{where}.role must be one of {', '.join(ROLES + OPTIONAL_ROLES)}, got {role!r}")
    dest = _relpath(obj["dest"], f"{where}.dest")
    files_raw = obj["files"]
    if not isinstance(files_raw, list) or not files_raw:
        raise _Invalid(f"{where}.files must be a non-empty list")
    files = tuple(_file(item, f"{where}.files[{i}]") for i, item in enumerate(files_raw))

    # dest is what the server loads: either exactly one of the files (llm, tts) or a
    # directory holding every file of the model (stt's CTranslate2 dir).
    paths = [f.path for f in files]
    if dest not in paths and not all(p.startswith(dest + "/") for p in paths):
        raise _Invalid(f"{where}.dest {dest!r} is neither one of its files nor a directory holding all of them")

    opt_str = {k: _string(obj[k], f"{where}.{k}") for k in _OPT_STR if k in obj}
    opt_int = {k: _positive_int(obj[k], f"{where}.{k}") for k in _OPT_INT if k in obj}
    if role == "tts" and "sample_rate_hz" not in opt_int:
        raise _Invalid(f"{where}: a tts model needs sample_rate_hz")
    if role == "llm" and "chat_format" not in opt_str:
        raise _Invalid(f"{where}: an llm model needs chat_format")
    params_b = obj.get("params_b")
    if params_b is not None and (isinstance(params_b, bool) or not isinstance(params_b, (int, float))
                                 or params_b <= 0):
        raise _Invalid(f"{where}.params_b must be a positive number (billions of parameters), got {params_b!r}")
    shape = None
    if "architecture" in obj:
        if role != "llm" or opt_str.get("format") != "gguf":
            raise _Invalid(f"{where}.architecture describes a GGUF LLM; this is a {role} model")
        try:
            shape = shape_from_dict(model_id, obj["architecture"])
        except ShapeError as exc:
            raise _Invalid(f"{where}.architecture: {exc}") from None
    return Model(
        id=model_id,
        role=role,
        display=_string(obj["display"], f"{where}.display"),
        license=_string(obj["license"], f"{where}.license"),
        dest=dest,
        files=files,
        format=opt_str.get("format"),
        language=opt_str.get("language"),
        quantization=opt_str.get("quantization"),
        quality=opt_str.get("quality"),
        sample_rate_hz=opt_int.get("sample_rate_hz"),
        chat_format=opt_str.get("chat_format"),
        context_length=opt_int.get("context_length"),
        homepage=opt_str.get("homepage"),
        notes=opt_str.get("notes"),
        params_b=None if params_b is None else float(params_b),
        sha256_source=opt_str.get("sha256_source"),
        shape=shape,
    )


def _file(raw: Any, where: str) -> ModelFile:
    obj = _object(raw, where)
    _keys(obj, where, required=_FILE_KEYS, optional=_FILE_OPTIONAL)
    path = _relpath(obj["path"], f"{where}.path")
    if path in RESERVED_PATHS or path.endswith(".part") or path.startswith("."):
        # .part files and dot-dirs are the fetcher's scratch space; selected.json is the selection.
        raise _Invalid(f"{where}.path {path!r} is reserved for the installer")
    where = f"{where} ({path})"
    sources_raw = obj["sources"]
    if not isinstance(sources_raw, list) or not sources_raw:
        raise _Invalid(f"{where}.sources must be a non-empty list")
    sources = tuple(_source(s, f"{where}.sources[{i}]") for i, s in enumerate(sources_raw))
    verify = obj.get("verify", VERIFY_PINNED)
    if verify not in VERIFY_KINDS:
        raise _Invalid(f"{where}.verify must be one of {', '.join(VERIFY_KINDS)}, got {verify!r}")
    if verify == VERIFY_PINNED:
        sha = _sha256(obj["sha256"], f"{where}.sha256")
    else:
        # Never silently unverified: no pinned hash is allowed only where the hub can supply one.
        if obj["sha256"] is not None:
            raise _Invalid(f"{where}.sha256 must be null when verify is {verify!r} (or drop verify to pin it)")
        if not any(isinstance(s, UrlSource) and HF_RESOLVE_RE.match(s.url) for s in sources):
            raise _Invalid(f"{where}: verify {verify!r} needs a https://huggingface.co/.../resolve/... source")
        sha = ""
    return ModelFile(
        path=path,
        size_bytes=_positive_int(obj["size_bytes"], f"{where}.size_bytes"),
        sha256=sha,
        sources=sources,
        verify=verify,
    )


def _source(raw: Any, where: str) -> Source:
    obj = _object(raw, where)
    kind = obj.get("kind")
    if kind == "url":
        _keys(obj, where, required=_URL_KEYS, optional=set())
        url = _string(obj["url"], f"{where}.url")
        if not url.startswith(_URL_SCHEMES):
            raise _Invalid(f"{where}.url must start with one of {', '.join(_URL_SCHEMES)}")
        return UrlSource(url=url)
    if kind == "pypi_wheel":
        _keys(obj, where, required=_WHEEL_KEYS, optional=set())
        package = _string(obj["package"], f"{where}.package")
        if not _PACKAGE_RE.match(package):
            raise _Invalid(f"{where}.package {package!r} is not a valid package name")
        version = _string(obj["version"], f"{where}.version")
        if any(c.isspace() for c in version) or any(c in version for c in "=<>!~;,"):
            raise _Invalid(f"{where}.version {version!r} must be one exact version")
        return PypiWheelSource(
            package=package,
            version=version,
            wheel_sha256=_sha256(obj["wheel_sha256"], f"{where}.wheel_sha256"),
            member=_relpath(obj["member"], f"{where}.member"),
        )
    raise _Invalid(f"{where}.kind must be 'url' or 'pypi_wheel', got {kind!r}")


def _check_unique_paths(models: Iterable[Model]) -> None:
    owner: dict[str, str] = {}
    for model in models:
        for f in model.files:
            if f.path in owner:
                raise _Invalid(f"file path {f.path!r} is used by both {owner[f.path]!r} and {model.id!r}")
            owner[f.path] = model.id
    # A file cannot also be a directory on disk: `a` and `a/b` would collide.
    for path in owner:
        for parent in PurePosixPath(path).parents:
            if str(parent) in owner:
                raise _Invalid(f"file path {path!r} lies under file {str(parent)!r}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be a JSON object")
    return value


def _keys(obj: Mapping[str, Any], where: str, *, required: set[str], optional: set[str]) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise _Invalid(f"{where} is missing {', '.join(missing)}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise _Invalid(f"{where} has unknown key(s) {', '.join(unknown)}")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"{where} must be a non-empty string")
    return value


def _positive_int(value: Any, where: str) -> int:
    # bool is an int subclass in Python; `true` must not pass as a size.
    if type(value) is not int or value <= 0:
        raise _Invalid(f"{where} must be a positive integer, got {value!r}")
    return value


def _sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise _Invalid(f"{where} must be 64 lower-case hex digits, got {value!r}")
    return value


def _relpath(value: Any, where: str) -> str:
    """A normalized relative POSIX path that cannot escape the directory it is joined to."""
    text = _string(value, where)
    pure = PurePosixPath(text)
    if (
        "\\" in text
        or pure.is_absolute()
        or text != str(pure)
        or not pure.parts
        or any(part in ("..", ".", "") for part in pure.parts)
    ):
        raise _Invalid(f"{where} {text!r} must be a normalized relative path without '..'")
    return text
