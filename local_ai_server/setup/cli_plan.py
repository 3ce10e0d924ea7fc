"""model_setup.py detect, bench, plan and list: describe and measure this machine, choose a tier for it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from local_ai_server.setup.bench_cache import bench_summary, default_cache_dir
from local_ai_server.setup.cli_common import (
    args_bench,
    args_hardware,
    args_models_dir,
    args_registry,
    emit,
    expectation_lines,
    line_logger,
    mb,
    save,
)
from local_ai_server.setup.download import DownloadError, apply_mirror, download, progress_printer
from local_ai_server.setup.fetch import LogFn
from local_ai_server.setup.hardware import Hardware, detect
from local_ai_server.setup.plan import Constraints, make_plan
from local_ai_server.setup.registry import Registry, SetupError, UrlSource
from local_ai_server.setup.selection import read_selection
from local_ai_server.setup.sources import reachable, unavailable_tiers

PROBE_MODEL = "tinyllama-1.1b-chat-v1.0-q4_k_m"


def cmd_detect(args: argparse.Namespace) -> int:
    """Describe this machine's CPU, RAM, GPUs and disk."""
    hw = detect(args_models_dir(args))
    save(args, hw.to_dict())
    if args.json:
        emit(hw.to_dict())
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure this machine (or report its cached result): the LLM probe, STT and TTS."""
    registry = args_registry(args)
    models_dir = args_models_dir(args)
    cache_dir = Path(args.cache_dir or default_cache_dir()).expanduser().absolute()
    stream = sys.stderr if args.json else sys.stdout
    doc = measure_bench(registry, detect(models_dir), models_dir, cache_dir, probe=args.probe, offline=args.offline,
                        mirror=args.mirror, refresh=args.refresh, stream=stream)
    save(args, doc)
    if args.json:
        emit(doc)
        return 0
    p = doc["probe"]
    print(f"probe: {p.get('model', '?')} ({p.get('source', '?')}), {p.get('threads', '?')} threads: "
          f"prefill {p['prefill_tok_s']:.0f} tok/s, decode {p['decode_tok_s']:.1f} tok/s, "
          f"first token {p['ttft_ms']:.0f} ms, peak memory {p.get('rss_mb', '?')} MB")
    print(f"stt:   {doc.get('stt_model')}: {doc.get('stt_ms')} ms for a 3 s utterance")
    print(f"tts:   {doc.get('tts_model')}: {doc.get('tts_ms')} ms for one sentence")
    return 0


def measure_bench(registry: Registry, hw: Hardware, models_dir: Path, cache_dir: Path, *, probe: Path | None,
                  offline: bool, mirror: str | None, refresh: bool, stream: TextIO) -> dict[str, Any]:
    """`bench`'s measurement (cached for `hw` under `cache_dir`): `probe`, else the real TinyLlama, else its shape."""
    from local_ai_server.setup.bench import run_bench

    say = line_logger(stream)
    probe = probe or tinyllama_probe(registry, models_dir, cache_dir, offline=offline, mirror=mirror, say=say,
                                     stream=stream)
    return run_bench(hardware=hw, models_dir=models_dir, registry=registry, cache_dir=cache_dir,
                     probe_path=probe, refresh=refresh, log=say)


def tinyllama_probe(registry: Registry, models_dir: Path, cache_dir: Path, *, offline: bool, mirror: str | None,
                    say: LogFn, stream: TextIO) -> Path | None:
    """The real TinyLlama probe: present, or downloaded into the cache; None when it cannot be had."""
    model = registry.models.get(PROBE_MODEL)
    if model is None:
        return None
    f = model.files[0]
    dest = cache_dir / "probes" / Path(f.path).name
    for candidate in (models_dir / f.path, dest):
        if candidate.is_file() and candidate.stat().st_size == f.size_bytes:
            return candidate
    if offline:
        say("bench.probe", model=PROBE_MODEL, note="--offline: not downloading it; a same-shaped probe is built")
        return None
    urls = [s.url for s in f.sources if isinstance(s, UrlSource)]
    if mirror:
        urls = [apply_mirror(u, mirror) for u in urls] + urls
    errors = {u: reachable(u) for u in dict.fromkeys(urls)}
    live = [u for u, err in errors.items() if err is None]
    if not live:
        why = next(iter(errors.values()), None) or "no URL"
        say("bench.probe", model=PROBE_MODEL, note=f"unreachable ({why}); a same-shaped probe is built instead")
        return None
    try:
        return download(live, dest, size=f.size_bytes, sha256=f.sha256, label=f.path,
                        progress=progress_printer(stream))
    except DownloadError as exc:
        say("bench.probe", model=PROBE_MODEL, note=f"download failed ({exc}); a same-shaped probe is built instead")
        return None


def cmd_plan(args: argparse.Namespace) -> int:
    """Choose a tier for this machine (or explain --tier) and print or save the plan."""
    registry = args_registry(args)
    hw = args_hardware(args)
    models_dir = args_models_dir(args)
    unavailable: dict[str, str] = {}
    if args.offline or args.check_sources:
        unavailable = unavailable_tiers(registry, models_dir, offline=args.offline, mirror=args.mirror)
    constraints = Constraints(gpu="off" if args.cpu_only else "require" if args.gpu else "auto",
                              llama_backend=args.llama_backend, unavailable=unavailable)
    choice = args_bench(args, hw)
    plan = make_plan(registry, hw, tier=args.tier, bench=choice.bench, constraints=constraints)
    doc = plan.to_dict(registry)
    doc["bench_used"] = choice.to_dict()
    summary = bench_summary(choice)
    if summary is not None:
        doc["bench_summary"] = summary
    save(args, doc)
    if args.json:
        print(f"benchmark: {choice.describe()}", file=sys.stderr)
        emit(doc)
        return 0
    print(f"tier {plan.tier} (LLM on {doc['llm_device']})")
    for line in plan.why:
        print(f"  {line}")
    for role, m in doc["models"].items():
        params = f", {m['params_b']:g}B params" if m["params_b"] else ""
        print(f"  {role}: {m['display']} ({mb(m['size_bytes'])} MB{params})")
    print(f"  predicted here (p50, and the pessimistic end of the range the tier was chosen by), for a "
          f"{doc['turn']['question_words']}-word question and a {doc['turn']['answer_tokens']}-token answer:")
    for line in expectation_lines(doc["prediction"], doc["prediction_bound"], doc["measured_here"]):
        print(f"    {line}")
    for key, value in doc["how"].items():
        print(f"    {key}: {value}")
    print(f"  benchmark: {choice.describe()}")
    print(f"  inputs: bench: {doc['inputs']['bench']}")
    for key, value in doc["inputs"]["device"].items():
        print(f"          {key}: {value}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List tiers and models with sizes and what each tier would do on this machine."""
    registry = args_registry(args)
    try:
        selection = read_selection(args_models_dir(args))
    except SetupError:
        selection = None  # listing must work even when the installed selection is broken
    selected = selection.tier.lower() if selection else None
    hw = args_hardware(args)
    choice = args_bench(args, hw)
    plan = make_plan(registry, hw, bench=choice.bench)
    predicted = {a.tier: a for a in plan.assessments}
    if args.json:
        emit({
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
            "bench_used": choice.to_dict(),
        })
        return 0
    print(f"benchmark: {choice.describe()}")
    for t in registry.tiers.values():
        size = sum(f.size_bytes for f in registry.tier_files(t.name))
        mark = " (selected)" if t.name.lower() == selected else ""
        mark += " (recommended here)" if t.name == plan.tier else ""
        reqs = ", ".join(f"{k}={v}" for k, v in t.requirements.items())
        print(f"tier {t.name}{mark}: {mb(size)} MB; {t.description}")
        if reqs:
            print(f"  requirements: {reqs}")
        a = predicted[t.name]
        p = a.prediction.to_dict()
        w = a.prediction.bounds_dict()
        print(f"  here ({a.device.kind}): decode {p['decode_tok_s']} tok/s (at worst {w.get('decode_tok_s')}), "
              f"prefill {p['prefill_tok_s']} tok/s, first audio {p['first_audio_ms']} ms (at worst "
              f"{w.get('first_audio_ms')}), voice turn {p['voice_turn_ms']} ms, cold start {p.get('ready_ms')} ms"
              + ("" if a.fits and a.meets_targets else f" [{'; '.join(a.reasons)}]"))
        for role, model_id in t.models.items():
            m = registry.models[model_id]
            print(f"  {role}: {m.id} - {m.display} [{m.license}] {mb(m.size_bytes)} MB")
    return 0


