"""The real registry.json's invariants, schema rejections, selection files and default paths."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from local_ai_server.setup.registry import (
    OPTIONAL_ROLES,
    ROLES,
    ModelFile,
    PypiWheelSource,
    Registry,
    RegistryError,
    UrlSource,
    load_registry,
    parse_registry,
)
from local_ai_server.setup.selection import (
    SelectionError,
    default_models_dir,
    default_registry_path,
    read_selection,
    repo_root,
    write_selection,
)
from tests.installer_fixtures import registry_doc, write_json
from tests.paths import REPO

REAL_REGISTRY = REPO / "registry.json"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def real() -> Registry:
    return load_registry(REAL_REGISTRY)


# --- the real registry.json ---------------------------------------------------------------------


def test_real_registry_tiers_reference_existing_models_of_the_right_role(real: Registry) -> None:
    assert "embedded" in real.tiers
    for tier in real.tiers.values():
        assert tier.description
        assert set(ROLES) <= set(tier.models) <= set(ROLES + OPTIONAL_ROLES)
        # Every tier ships the turn detector: semantic turn detection works whichever tier is installed.
        assert tier.models.get("turn") == "smart-turn-v3.2-cpu"
        for role, model_id in tier.models.items():
            assert real.models[model_id].role == role


def test_real_registry_files_are_well_formed(real: Registry) -> None:
    seen: set[str] = set()
    wheel_hashes: dict[tuple[str, str], str] = {}
    for model in real.models.values():
        assert model.files
        paths = [f.path for f in model.files]
        assert model.dest in paths or all(p.startswith(model.dest + "/") for p in paths)
        for f in model.files:
            assert HEX64.match(f.sha256)
            assert f.size_bytes > 0
            assert f.path not in seen
            seen.add(f.path)
            assert f.sources
            for source in f.sources:
                if isinstance(source, PypiWheelSource):
                    assert HEX64.match(source.wheel_sha256)
                    # One package version is one wheel: every file from it must agree on its hash.
                    key = (source.package, source.version)
                    assert wheel_hashes.setdefault(key, source.wheel_sha256) == source.wheel_sha256
                else:
                    assert isinstance(source, UrlSource)
                    assert source.url.startswith("https://")


def test_embedded_tier_layout(real: Registry) -> None:
    models = real.tier_models("embedded")
    assert models["stt"].dest == "stt/whisper-tiny.en"
    assert models["llm"].dest == "llm/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models["tts"].dest == "tts/en_US-joe-medium.onnx"
    assert models["turn"].dest == "turn/smart-turn-v3.2-cpu.onnx"
    assert [f.path for f in real.tier_files("embedded")] == [
        "stt/whisper-tiny.en/model.bin",
        "stt/whisper-tiny.en/config.json",
        "stt/whisper-tiny.en/tokenizer.json",
        "stt/whisper-tiny.en/vocabulary.txt",
        "llm/SmolLM2-135M-Instruct.Q4_1.gguf",
        "tts/en_US-joe-medium.onnx",
        "tts/en_US-joe-medium.onnx.json",
        "turn/smart-turn-v3.2-cpu.onnx",
    ]
    assert models["tts"].sample_rate_hz == 22050
    assert models["llm"].chat_format == "gguf-template"
    assert models["llm"].quantization == "Q4_1"
    assert sum(m.size_bytes for m in models.values()) == 248_338_296
    assert real.tier("embedded").requirements["min_ram_gb"] > 0


def test_tier_lookup_is_case_insensitive(real: Registry) -> None:
    assert real.tier("EMBEDDED") is real.tier("embedded") is real.tier(" Embedded ")
    assert real.tier("light_cpu") is real.tier("LIGHT_CPU")
    # The message lists every tier; the registry grew CPU and GPU tiers beside embedded.
    with pytest.raises(RegistryError, match=r"unknown tier 'nope' \(known tiers: embedded, LIGHT_CPU, .*HEAVY_GPU\)"):
        real.tier("nope")


# --- rejected registries -----------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _llm_file(doc: dict[str, Any]) -> dict[str, Any]:
    file: dict[str, Any] = doc["models"]["tiny-llm"]["files"][0]
    return file


def _set(path: list[Any], value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _duplicate_path(doc: dict[str, Any]) -> None:
    doc["models"]["tiny-tts"]["files"][1]["path"] = "tts/tiny.onnx"


def _cross_model_duplicate(doc: dict[str, Any]) -> None:
    extra = copy.deepcopy(_llm_file(doc))
    doc["models"]["tiny-tts"]["files"].append(extra)


def _file_under_file(doc: dict[str, Any]) -> None:
    extra = copy.deepcopy(doc["models"]["tiny-tts"]["files"][1])
    extra["path"] = "tts/tiny.onnx/inner"
    doc["models"]["tiny-tts"]["files"].append(extra)


def _case_twin_tier(doc: dict[str, Any]) -> None:
    doc["tiers"]["TINY"] = copy.deepcopy(doc["tiers"]["tiny"])


LLM_FILE = ["models", "tiny-llm", "files", 0]
BAD: dict[str, tuple[Mutation, str]] = {
    "schema version": (_set(["schema_version"], 2), "schema_version must be 1"),
    "missing tiers": (_delete(["tiers"]), "top level is missing tiers"),
    "unknown top key": (_set(["extra"], 1), "unknown key"),
    "missing sha256": (_delete([*LLM_FILE, "sha256"]), "is missing sha256"),
    "short sha256": (_set([*LLM_FILE, "sha256"], "abc"), "sha256 must be 64 lower-case hex"),
    "upper sha256": (_set([*LLM_FILE, "sha256"], "A" * 64), "sha256 must be 64 lower-case hex"),
    "bad wheel sha256": (_set([*LLM_FILE, "sources", 0, "wheel_sha256"], "z" * 64), "wheel_sha256"),
    "zero size": (_set([*LLM_FILE, "size_bytes"], 0), "size_bytes must be a positive integer"),
    "bool size": (_set([*LLM_FILE, "size_bytes"], True), "size_bytes must be a positive integer"),
    "string size": (_set([*LLM_FILE, "size_bytes"], "12"), "size_bytes must be a positive integer"),
    "no sources": (_set([*LLM_FILE, "sources"], []), "sources must be a non-empty list"),
    "unknown source kind": (_set([*LLM_FILE, "sources", 0, "kind"], "torrent"), "kind must be 'url' or"),
    "ftp url": (_set([*LLM_FILE, "sources"], [{"kind": "url", "url": "ftp://x/y"}]), "url must start with"),
    "version range": (_set([*LLM_FILE, "sources", 0, "version"], ">=1"), "must be one exact version"),
    "bad package": (_set([*LLM_FILE, "sources", 0, "package"], "bad pkg"), "not a valid package name"),
    "absolute path": (_set([*LLM_FILE, "path"], "/etc/passwd"), "normalized relative path"),
    "escaping path": (_set([*LLM_FILE, "path"], "../outside.gguf"), "normalized relative path"),
    "unnormalized path": (_set([*LLM_FILE, "path"], "llm/./tiny.gguf"), "normalized relative path"),
    "backslash path": (_set([*LLM_FILE, "path"], "llm\\tiny.gguf"), "normalized relative path"),
    "reserved path": (_set([*LLM_FILE, "path"], "selected.json"), "reserved"),
    "part path": (_set([*LLM_FILE, "path"], "llm/tiny.gguf.part"), "reserved"),
    "duplicate path": (_duplicate_path, "is used by both"),
    "duplicate across models": (_cross_model_duplicate, "is used by both 'tiny-llm' and 'tiny-tts'"),
    "file under file": (_file_under_file, "lies under file"),
    "dest not a file": (_set(["models", "tiny-llm", "dest"], "llm/other.gguf"), "dest 'llm/other.gguf'"),
    "dest dir mismatch": (_set(["models", "tiny-stt", "dest"], "stt/other"), "dest 'stt/other'"),
    "id mismatch": (_set(["models", "tiny-llm", "id"], "other"), "does not match its key"),
    "bad role": (_set(["models", "tiny-llm", "role"], "vision"), "role must be one of"),
    "tts without rate": (_delete(["models", "tiny-tts", "sample_rate_hz"]), "needs sample_rate_hz"),
    "llm without chat format": (_delete(["models", "tiny-llm", "chat_format"]), "needs chat_format"),
    "typo key": (_set(["models", "tiny-llm", "lisence"], "MIT"), "unknown key(s) lisence"),
    "unknown model": (_set(["tiers", "tiny", "models", "llm"], "ghost"), "unknown model 'ghost'"),
    "role mismatch": (_set(["tiers", "tiny", "models", "llm"], "tiny-tts"), "which is a tts model"),
    "missing role": (_delete(["tiers", "tiny", "models", "tts"]), "models is missing tts"),
    "negative requirement": (_set(["tiers", "tiny", "requirements", "min_ram_gb"], -1), "non-negative"),
    "case twin tier": (_case_twin_tier, "differ only in case"),
    "empty models": (_set(["models"], {}), "models is empty"),
    "not an object": (_set(["tiers"], []), "tiers must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_registry_is_rejected(case: str, tmp_path: Path) -> None:
    mutate, fragment = BAD[case]
    doc = registry_doc("ab" * 32)
    parse_registry(copy.deepcopy(doc))  # the base document itself is valid
    mutate(doc)
    path = write_json(tmp_path / "registry.json", doc)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_registries(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="registry not found"):
        load_registry(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1,')
    with pytest.raises(RegistryError, match="is not valid JSON"):
        load_registry(broken)


# --- selection ------------------------------------------------------------------------------------


def test_selection_round_trip_and_atomic_write(tmp_path: Path) -> None:
    registry = parse_registry(registry_doc("ab" * 32))
    models_dir = tmp_path / "models"
    assert read_selection(models_dir) is None

    written = write_selection(models_dir, registry, "Tiny")

    assert written == models_dir / "selected.json"
    assert sorted(p.name for p in models_dir.iterdir()) == ["selected.json"]  # no temp file left
    raw = json.loads(written.read_text())
    assert raw == {
        "schema_version": 1,
        "tier": "tiny",
        "stt": {"id": "tiny-stt", "path": "stt/tiny", "display": "Tiny STT"},
        "llm": {"id": "tiny-llm", "path": "llm/tiny.gguf", "display": "Tiny LLM"},
        "tts": {"id": "tiny-tts", "path": "tts/tiny.onnx", "display": "Tiny TTS"},
    }
    selection = read_selection(models_dir)
    assert selection is not None
    assert selection.path("llm") == models_dir / "llm/tiny.gguf"
    assert selection.model("stt").id == "tiny-stt"
    assert "turn" not in selection.paths()  # a tier without the optional turn detector
    with pytest.raises(KeyError):
        selection.model("turn")


def test_the_real_embedded_selection_names_the_turn_detector(tmp_path: Path, real: Registry) -> None:
    write_selection(tmp_path, real, "embedded")
    selection = read_selection(tmp_path)
    assert selection is not None and selection.turn is not None
    assert selection.paths()["turn"] == tmp_path / "turn/smart-turn-v3.2-cpu.onnx"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{oops", "corrupt selection"),
        ("[]", "not a JSON object"),
        ('{"schema_version": 9}', "schema_version 9"),
        ('{"schema_version": 1, "tier": "t"}', "missing stt"),
        (
            json.dumps({"schema_version": 1, "tier": "t", **{
                r: {"id": "x", "path": "../../etc/passwd", "display": "d"} for r in ROLES}}),
            "must be relative to the models dir",
        ),
        (
            json.dumps({"schema_version": 1, "tier": "t", **{r: {"id": "x", "path": "p"} for r in ROLES}}),
            "stt.display must be a non-empty string",
        ),
    ],
)
def test_corrupt_selection_is_a_clear_error(tmp_path: Path, content: str, fragment: str) -> None:
    (tmp_path / "selected.json").write_text(content)
    with pytest.raises(SelectionError, match=re.escape(fragment)):
        read_selection(tmp_path)


def test_default_paths(tmp_path: Path) -> None:
    assert default_models_dir({"LOCAL_MODELS_DIR": str(tmp_path)}) == tmp_path
    assert default_registry_path({"LOCAL_REGISTRY_PATH": str(tmp_path / "r.json")}) == tmp_path / "r.json"
    # In this checkout registry.json sits beside the package, so the repo's models/ is the default.
    assert repo_root() == REPO
    assert default_models_dir({}) == REPO / "models"
    assert default_registry_path({}) == REAL_REGISTRY


# --- the tiered registry: schema honesty ------------------------------------------------------------

TIERS = ("embedded", "LIGHT_CPU", "MEDIUM_CPU", "HEAVY_CPU", "MEDIUM_GPU", "HEAVY_GPU")


def test_real_registry_has_every_tier_with_requirements(real: Registry) -> None:
    assert [t.name for t in real.tiers.values()] == list(TIERS)
    ranks = [real.tier(name).rank for name in TIERS]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    for tier in real.tiers.values():
        req = tier.requirements
        for key in ("min_ram_gb", "min_cpu_cores", "min_disk_gb"):
            assert isinstance(req[key], (int, float)) and req[key] > 0, (tier.name, key)
        assert req["gpu"] is tier.name.endswith("_GPU")
        if tier.name.endswith("_GPU"):
            assert req["min_vram_gb"] > 0
        if tier.name != "embedded":
            assert req["min_decode_tok_s"] > 0 and req["max_first_audio_ms"] > 0
            # The disk requirement must cover what the tier downloads.
            assert req["min_disk_gb"] * 1e9 > sum(f.size_bytes for f in real.tier_files(tier.name))


def test_real_registry_models_state_their_facts(real: Registry) -> None:
    for model in real.models.values():
        assert model.license and model.sha256_source, model.id
        assert model.params_b is not None and model.params_b > 0, model.id
        assert model.file_bytes == max(f.size_bytes for f in model.files)
        if model.role == "llm":
            assert model.quantization and model.chat_format and model.context_length, model.id
            assert model.params_b < 13  # nothing in this registry is a 13B-class model


def test_real_registry_every_file_is_verifiable(real: Registry) -> None:
    for model in real.models.values():
        for f in model.files:
            assert f.size_bytes > 0
            if f.verify == "sha256":
                assert HEX64.match(f.sha256), f.path
            else:
                # No pinned hash is allowed only with a stated way to get one before downloading.
                assert f.verify == "hf-lfs-metadata" and f.sha256 == "" and f.hf_location() is not None
            for source in f.sources:
                if isinstance(source, UrlSource):
                    assert source.url.startswith("https://huggingface.co/")
                    assert "/resolve/main/" in source.url


def test_real_registry_llm_sizes_grow_with_tiers(real: Registry) -> None:
    cpu = [real.tier_models(t)["llm"].file_bytes for t in ("embedded", "LIGHT_CPU", "MEDIUM_CPU", "HEAVY_CPU")]
    assert cpu == sorted(cpu)
    assert real.tier_models("HEAVY_GPU")["llm"].file_bytes > real.tier_models("MEDIUM_GPU")["llm"].file_bytes


def _unpinned_doc() -> dict[str, Any]:
    doc = registry_doc("ab" * 32)
    f = _llm_file(doc)
    f["sha256"] = None
    f["verify"] = "hf-lfs-metadata"
    f["sources"] = [{"kind": "url", "url": "https://huggingface.co/org/repo/resolve/main/sub/tiny.gguf"}]
    return doc


def test_unpinned_file_needs_an_explicit_verify_method_and_resolves() -> None:
    registry = parse_registry(_unpinned_doc())
    [f] = registry.unpinned_files("tiny")
    assert f.verify == "hf-lfs-metadata" and not f.pinned
    assert f.hf_location() == ("org/repo", "main", "sub/tiny.gguf")
    seen: list[ModelFile] = []

    def lookup(file: ModelFile) -> tuple[str, int]:
        seen.append(file)
        return "CD" * 32, file.size_bytes

    resolved = registry.with_resolved_hashes("tiny", lookup)
    assert seen == [f]
    assert resolved.unpinned_files("tiny") == []
    assert resolved.models["tiny-llm"].files[0].sha256 == "cd" * 32
    assert registry.unpinned_files("tiny") == [f]  # the original is untouched
    assert resolved.with_resolved_hashes("tiny", lookup) is resolved


@pytest.mark.parametrize(("answer", "fragment"), [(("zz", 0), "not a sha256"), (("ab" * 32, 1), "registry says")])
def test_resolved_hash_must_be_well_formed_and_agree_on_size(answer: tuple[str, int], fragment: str) -> None:
    registry = parse_registry(_unpinned_doc())
    size = registry.unpinned_files("tiny")[0].size_bytes
    sha, delta = answer
    with pytest.raises(RegistryError, match=fragment):
        registry.with_resolved_hashes("tiny", lambda f: (sha, size + delta))


UNPINNED_BAD: dict[str, tuple[Mutation, str]] = {
    "null sha256 without verify": (_set([*LLM_FILE, "verify"], "sha256"), "sha256 must be 64 lower-case hex"),
    "unknown verify kind": (_set([*LLM_FILE, "verify"], "trust-me"), "verify must be one of"),
    "verify with a pinned hash": (_set([*LLM_FILE, "sha256"], "ab" * 32), "must be null when verify"),
    "verify without a hub source": (
        _set([*LLM_FILE, "sources"], [{"kind": "url", "url": "https://example.com/tiny.gguf"}]),
        "needs a https://huggingface.co/",
    ),
    "bad rank": (_set(["tiers", "tiny", "rank"], -1), "rank must be a non-negative integer"),
    "bad params": (_set(["models", "tiny-llm", "params_b"], 0), "params_b must be a positive number"),
}


@pytest.mark.parametrize("case", sorted(UNPINNED_BAD))
def test_bad_verification_schema_is_rejected(case: str) -> None:
    mutate, fragment = UNPINNED_BAD[case]
    doc = _unpinned_doc()
    mutate(doc)
    with pytest.raises(RegistryError, match=re.escape(fragment)):
        parse_registry(doc)


def test_hf_lfs_lookup_reads_the_tree_api(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import urllib.request

    import model_setup

    requested: list[str] = []
    listing = [
        {"type": "file", "path": "sub/tiny.gguf", "size": 9, "lfs": {"oid": "ef" * 32, "size": 9}},
        {"type": "file", "path": "sub/config.json", "size": 2},
    ]

    def fake_urlopen(request: urllib.request.Request, timeout: float) -> io.BytesIO:
        requested.append(request.full_url)
        return io.BytesIO(json.dumps(listing).encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    f = parse_registry(_unpinned_doc()).unpinned_files("tiny")[0]
    assert model_setup.hf_lfs_lookup(f) == ("ef" * 32, 9)
    assert requested == ["https://huggingface.co/api/models/org/repo/tree/main/sub"]
    listing[0].pop("lfs")
    with pytest.raises(Exception, match="refusing to download it unverified"):
        model_setup.hf_lfs_lookup(f)
