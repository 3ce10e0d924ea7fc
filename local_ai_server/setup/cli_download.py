"""model_setup.py download: fetch and verify a tier's files, select it, record what its plan expects."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from local_ai_server.setup.cli_common import args_models_dir, args_registry, emit, line_logger, mb, read_json
from local_ai_server.setup.download import progress_printer
from local_ai_server.setup.fetch import fetch_tier
from local_ai_server.setup.hardware import detect
from local_ai_server.setup.installation import now_iso, write_record
from local_ai_server.setup.plan import PlanError, resolve_tier
from local_ai_server.setup.registry import ModelFile, Registry, RegistryError, SetupError, Tier
from local_ai_server.setup.selection import write_selection
from local_ai_server.setup.sources import unavailable_tiers

HF_API = "https://huggingface.co/api/models"
HF_API_TIMEOUT_S = 30.0

DEFAULT_TIER = "embedded"


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch and verify a tier (--tier, the --plan's, else the default), then select it unless --no-select."""
    registry = args_registry(args)
    models_dir = args_models_dir(args)
    plan_doc = read_json(args.plan) if args.plan is not None else None
    if plan_doc is not None and not isinstance(plan_doc.get("tier"), str):
        raise SetupError(f"{args.plan} is not a `plan --json` document (no tier)")
    name = args.tier or (plan_doc["tier"] if plan_doc is not None else DEFAULT_TIER)
    tier = download_tier(registry, name, models_dir)
    if args.offline:
        blocked = unavailable_tiers(registry, models_dir, offline=True, mirror=args.mirror).get(tier.name.lower())
        if blocked:
            raise SetupError(f"tier {tier.name} cannot be installed offline: {blocked}")
    if registry.unpinned_files(tier.name):
        # The registry pins no hash for these: take it from the hub's LFS metadata first, so the
        # fetch below verifies every byte exactly as it does for pinned files.
        registry = registry.with_resolved_hashes(tier.name, hf_lfs_lookup)
    pip_args = [*(["--index-url", args.index_url] if args.index_url else []), *args.pip_arg]
    # With --json stdout carries only the result document, so progress goes to stderr.
    progress = line_logger(sys.stderr if args.json else sys.stdout)
    paths = fetch_tier(registry, tier.name, models_dir, pip_args=pip_args, log=progress, mirror=args.mirror,
                       progress=progress_printer(sys.stderr if args.json else sys.stdout))
    if args.no_select:
        print(f"ok: the {len(paths)} files of tier {tier.name} are present and verified in {models_dir}",
              file=sys.stderr if args.json else sys.stdout)
        if args.json:
            emit({"ok": True, "tier": tier.name, "models_dir": str(models_dir), "files": [str(p) for p in paths]})
        return 0
    selection_file = write_selection(models_dir, registry, tier.name)
    record_file = None
    if plan_doc is not None:
        record_file = write_record(models_dir, record_doc(registry, tier, plan_doc))
    models = registry.tier_models(tier.name)
    total = sum(m.size_bytes for m in models.values())
    if args.json:
        emit({
            "ok": True,
            "tier": tier.name,
            "models_dir": str(models_dir),
            "selection": str(selection_file),
            "install_record": None if record_file is None else str(record_file),
            "files": [str(p) for p in paths],
            "models": {role: {"id": m.id, "path": str(models_dir / m.dest)} for role, m in models.items()},
        })
    else:
        print(f"ok: tier {tier.name} installed in {models_dir} ({len(paths)} files, {mb(total)} MB); "
              f"selection written to {selection_file}"
              + (f"; expectations recorded in {record_file}" if record_file else ""))
    return 0


def record_doc(registry: Registry, tier: Tier, plan_doc: dict[str, Any]) -> dict[str, Any]:
    """The install.json document for `tier`, installed following `plan_doc`."""
    rows = {str(row.get("tier", "")).lower(): row for row in plan_doc.get("tiers", []) if isinstance(row, dict)}
    row = rows.get(tier.name.lower())
    if row is None or not isinstance(row.get("prediction"), dict):
        raise SetupError(f"the plan has no prediction for tier {tier.name}; re-run `model_setup.py plan`")
    raw_inputs = plan_doc.get("inputs")
    inputs: dict[str, Any] = raw_inputs if isinstance(raw_inputs, dict) else {}
    device = inputs.get("device", {}) if tier.name == plan_doc.get("tier") else {}
    constraints = inputs.get("constraints", {}) if isinstance(inputs.get("constraints"), dict) else {}
    settings: dict[str, str] = {}
    if row.get("llm_device") == "gpu":
        settings["LOCAL_LLM_GPU_LAYERS"] = "-1"  # the GPU tiers are sized to hold every layer
        if "CUDA" in str(device.get("stt", "")):
            settings["LOCAL_STT_DEVICE"] = "cuda"
    measured = isinstance(inputs.get("measured"), dict)
    source = ("predicted by `model_setup.py plan` from "
              + ("this machine's benchmark" if measured else "the hardware alone (no benchmark was run)")
              + (": " + "; ".join(f"{k}: {v}" for k, v in device.items()) if device else ""))
    models = registry.tier_models(tier.name)
    return {
        "schema_version": 1,
        "installed_at": now_iso(),
        "tier": tier.name,
        "requested_tier": plan_doc.get("requested"),
        "why": plan_doc.get("why", []),
        "fallback": plan_doc.get("fallback") if tier.name == plan_doc.get("tier") else None,
        "preferred_tier": plan_doc.get("preferred_tier"),
        "llm_device": row.get("llm_device", "cpu"),
        "llama_backend": constraints.get("llama_backend") or "cpu",
        "hardware": inputs.get("hardware", {}),
        "bench": plan_doc.get("bench_summary"),
        "models": {role: {"id": m.id, "display": m.display} for role, m in models.items()},
        "turn": plan_doc.get("turn", {}),
        "expected": row["prediction"],
        # The pessimistic end of each range, which figures were measured here, and how each was got.
        "expected_bound": row.get("prediction_bound") or {},
        "measured_here": plan_doc.get("measured_here", []) if tier.name == plan_doc.get("tier") else [],
        "how": plan_doc.get("how", {}) if tier.name == plan_doc.get("tier") else {},
        "expected_source": source,
        "prediction_inputs": inputs,
        "settings": settings,
        "measured": None,
    }


def download_tier(registry: Registry, name: str, models_dir: Path) -> Tier:
    """An exact tier name, else an alias resolved against this machine's hardware."""
    if name.strip().lower() in registry.tiers:
        return registry.tier(name)
    try:
        return resolve_tier(registry, name, detect(models_dir))
    except PlanError as exc:
        raise RegistryError(str(exc)) from None


def hf_lfs_lookup(f: ModelFile) -> tuple[str, int]:
    """(sha256, size) of `f` from Hugging Face's LFS metadata (`lfs.oid`, `lfs.size` of the tree API)."""
    location = f.hf_location()
    if location is None:
        raise SetupError(f"{f.path}: no Hugging Face source to read its hash from")
    repo, rev, path = location
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    url = f"{HF_API}/{repo}/tree/{urllib.parse.quote(rev, safe='')}"
    url += f"/{urllib.parse.quote(parent)}" if parent else ""
    request = urllib.request.Request(url, headers={"User-Agent": "local-ai-server-model-setup/1"})
    try:
        with urllib.request.urlopen(request, timeout=HF_API_TIMEOUT_S) as response:
            entries = json.loads(response.read(8 << 20))
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise SetupError(f"{f.path}: cannot read its hash from {url}: {exc}") from None
    for entry in entries if isinstance(entries, list) else []:
        lfs = entry.get("lfs") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and entry.get("path") == path and isinstance(lfs, dict):
            return str(lfs.get("oid", "")), int(lfs.get("size", -1))
    raise SetupError(f"{f.path}: {url} lists no LFS hash for {path}; refusing to download it unverified")

