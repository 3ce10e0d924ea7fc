"""Side by side with the reference Wyoming servers: wyoming-bench against ours, wyoming-faster-whisper, wyoming-piper.

Usage::

    .venv/bin/python bench/peers.py [--rounds N] [--skip-background] [--ours-env LOCAL_X=V] [--out FILE]

It installs wyoming-faster-whisper, wyoming-piper and wyoming-bench (pinned, from PyPI) into a venv of their
own (~/.cache/local-ai-server/peers-venv; reused while its versions match), points the reference servers at
the very model files our server loads (no download), and runs `wyoming-bench` (a Wyoming benchmark none of
us wrote) against both sides in one command per service, on the same corpus and texts:

1. `generate-corpus` from the reference Piper server (the built-in texts), so our TTS makes no test audio.
2. `stt` against our Wyoming front, wyoming-faster-whisper as shipped (beam 5 on x86) and with
   `--beam-size 1` (ours decodes greedily), non-streaming (the reference does not stream transcripts).
3. `tts` against our front and wyoming-piper, non-streaming and streaming.
4. Unless `--skip-background`: steps 2 and 3 again on our server alone, while a WebSocket call keeps its LLM
   generating (a new long generation whenever one ends). The reference servers have no LLM to share, so
   this run is ours alone: it shows what the shared pool costs.

The markdown table (every figure as ours / theirs, with the goals) goes to stdout, progress to stderr, and
everything (settings, versions, the parsed reports and wyoming-bench's raw output) to a JSON file. Every
process it starts is stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
import wave
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from peers_procs import (  # noqa: E402
    LIBS,
    PINS,
    STT_TRAILING_SILENCE_S,
    VENV_DIR,
    LoadWindow,
    RefServer,
    ensure_venv,
    machine,
    piper_argv,
    piper_data_dir,
    run_tool,
    transcripts,
    whisper_argv,
)
from peers_report import Report, parse_report  # noqa: E402
from peers_table import build_rows, markdown, rows_json  # noqa: E402
from phase_llm import LlmHog  # noqa: E402
from stats import progress  # noqa: E402
from workload import LONG_ENV  # noqa: E402

from local_ai_server import config  # noqa: E402
from local_ai_server.harness import ServerProc, free_port, start_server  # noqa: E402
from local_ai_server.setup.selection import default_models_dir, read_selection  # noqa: E402

# 5 rounds x 4 samples per server and mode. Measured on the 2-core machine this was built on, with another job
# taking about a core: 1 round 90 s, 3 rounds 214 s, 5 rounds 381 s (both runs), plus 22 s to create the venv
# from pip's cache the first time: under the 12 minutes allowed, with room for a slower first download.
DEFAULT_ROUNDS = 5
TOOL_TIMEOUT_S = 600.0
WHISPER_SHIPPED = "wyoming-faster-whisper as shipped (beam 5)"
WHISPER_BEAM1 = "wyoming-faster-whisper --beam-size 1"
PIPER = "wyoming-piper as shipped"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help=f"wyoming-bench rounds per sample, mode and server (default {DEFAULT_ROUNDS})")
    p.add_argument("--skip-background", action="store_true",
                   help="skip the second run (ours while an LLM generation runs)")
    p.add_argument("--ours-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra setting for our server (repeatable), e.g. LOCAL_TTS_THREADS=2 to match the threads "
                        "onnxruntime gives wyoming-piper")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default bench/results/peers-<UTC date>.json)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if any("=" not in kv or not kv.startswith("LOCAL_") for kv in args.ours_env):
        p.error("--ours-env takes LOCAL_NAME=VALUE")
    args.ours_env = dict(kv.split("=", 1) for kv in args.ours_env)
    return args


def corpus_info(corpus: Path) -> list[dict[str, Any]]:
    out = []
    for wav in sorted(corpus.glob("*.wav")):
        with wave.open(str(wav), "rb") as wf:
            seconds = wf.getnframes() / wf.getframerate()
            fmt = f"{wf.getframerate()} Hz, {wf.getsampwidth() * 8}-bit, {wf.getnchannels()} ch"
        text = wav.with_suffix(".txt").read_text(encoding="utf-8").strip()
        out.append({"sample": wav.stem, "seconds": round(seconds, 2), "format": fmt, "text": text})
    return out


def our_settings(cfg: config.ServerConfig, srv: ServerProc, wyoming_port: int, env: dict[str, str]) -> dict[str, Any]:
    """What our server ran with: its config and the thread counts its start-up log line reports."""
    started = next((e for e in srv.log_events() if e.get("event") == "server.starting"), {})
    libs: dict[str, str | None] = {}
    for lib in LIBS:
        try:
            libs[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            libs[lib] = None
    return {
        "wyoming_uri": f"tcp://127.0.0.1:{wyoming_port}",
        "stt": {"model": str(cfg.stt.model_path), "device": cfg.stt.device, "compute_type": cfg.stt.compute_type,
                "threads": started.get("stt_threads", cfg.stt.threads), "beam_size": cfg.stt.beam_size,
                "language": cfg.stt.language,
                "decoding": f"one encoder window sized to the utterance + {cfg.stt.pad_s} s, no timestamps"},
        "tts": {"voice": str(cfg.tts.model_path), "threads": started.get("tts_threads", cfg.tts.threads),
                "onnxruntime": "intra-op threads as above, spinning off"},
        "llm": {"model": str(cfg.llm.model_path), "threads": started.get("llm_threads", cfg.llm.threads)},
        "env": {**env, "GOMP_SPINCOUNT": "1000 (the server's own default)"},
        "versions": libs,
    }


async def bench(venv: Path, task: str, servers: list[int], extra: list[str], rounds: int) -> tuple[Report, str]:
    """One `wyoming-bench` command against `servers` (ports on 127.0.0.1): the parsed report and its text."""
    argv = [str(venv / "bin" / "wyoming-bench"), task, *(f"127.0.0.1:{p}" for p in servers),
            "--rounds", str(rounds), *extra]
    progress(" ".join(argv[1:]))
    rc, text = await run_tool(argv, TOOL_TIMEOUT_S)
    if rc != 0:
        raise RuntimeError(f"wyoming-bench {task} exited {rc}:\n{text[-3000:]}")
    report = parse_report(text)
    missing = [p for p in servers if report.by_port(p) is None]
    if missing:
        raise RuntimeError(f"wyoming-bench {task} printed no figures for port(s) {missing}:\n{text[-3000:]}")
    return report, text


async def measure(res: dict[str, Any], key: str, venv: Path, task: str, servers: list[int], extra: list[str],
                  rounds: int) -> Report | None:
    """bench(), recorded under res[...][key]; a failure is recorded in res['errors'] and the run goes on."""
    window = LoadWindow()
    try:
        report, text = await bench(venv, task, servers, extra, rounds)
    except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
        res["errors"].append(f"{key}: {exc}")
        progress(f"{key} failed: {str(exc)[:500]}")
        return None
    finally:
        res["external_load_cores"][key] = window.external_cores()
    res["runs"][key] = report.as_dict()
    res["raw"][key] = text
    return report


async def run(args: argparse.Namespace, res: dict[str, Any]) -> None:
    progress(f"side venv {VENV_DIR} ({', '.join(f'{p}=={v}' for p, v in PINS.items())})")
    versions, action, secs = await asyncio.to_thread(ensure_venv, VENV_DIR)
    res["venv"] = {"path": str(VENV_DIR), "action": action, "seconds": round(secs, 1), "versions": versions}
    progress(f"side venv {action} in {secs:.1f}s")

    models_dir = default_models_dir()
    selection = read_selection(models_dir)
    if selection is None:
        raise RuntimeError(f"no models installed in {models_dir} (run model_setup.py first)")
    paths = selection.paths()
    ours_env = {**LONG_ENV, **args.ours_env}
    cfg = config.from_env(ours_env, models_dir=models_dir, selection_paths=paths, tier=selection.tier)
    stt_threads = cfg.stt.threads

    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    wyoming_port = free_port()
    voice = paths["tts"].stem  # what wyoming-piper calls the voice whose files are <data-dir>/<voice>.onnx(.json)
    piper_port, shipped_port, beam1_port = free_port(), free_port(), free_port()
    whisper_data = tmp / "whisper-data"  # required by wyoming-faster-whisper; stays empty (the model is a path)
    refs = {
        PIPER: RefServer(PIPER, piper_argv(VENV_DIR, piper_port, voice, tmp / "piper-data"), piper_port,
                         tmp / "piper.log"),
        WHISPER_SHIPPED: RefServer(WHISPER_SHIPPED, whisper_argv(VENV_DIR, shipped_port, paths["stt"], whisper_data,
                                                                 threads=stt_threads, beam_size=None),
                                   shipped_port, tmp / "whisper-shipped.log"),
        WHISPER_BEAM1: RefServer(WHISPER_BEAM1, whisper_argv(VENV_DIR, beam1_port, paths["stt"], whisper_data,
                                                             threads=stt_threads, beam_size=1),
                                 beam1_port, tmp / "whisper-beam1.log"),
    }
    ours: ServerProc | None = None
    hog: LlmHog | None = None
    try:
        piper_data_dir(paths["tts"], tmp / "piper-data")
        whisper_data.mkdir()
        for ref in refs.values():
            ref.start()
        ours = start_server(tmp, models_dir, env={**ours_env, "LOCAL_WYOMING_URI": f"tcp://127.0.0.1:{wyoming_port}"},
                            wait="none", name="ours")
        await asyncio.to_thread(ours.wait_listening, 60)
        await asyncio.to_thread(ours.wait_ready, 120)
        for ref in refs.values():
            await asyncio.to_thread(ref.wait_listening, 120)
        progress(f"servers up: ours ready in {ours.ready_s:.1f}s; "
                 + ", ".join(f"{r.name} listening in {r.ready_s:.1f}s" for r in refs.values()))
        res["settings"] = {"ours": our_settings(cfg, ours, wyoming_port, ours_env),
                           "theirs": {name: {"argv": r.argv[1:], "port": r.port} for name, r in refs.items()}}

        corpus = tmp / "corpus"
        rc, text = await run_tool([str(VENV_DIR / "bin" / "wyoming-bench"), "generate-corpus",
                                   f"127.0.0.1:{piper_port}", "--out", str(corpus)], TOOL_TIMEOUT_S)
        if rc != 0:
            raise RuntimeError(f"generate-corpus failed ({rc}):\n{text[-3000:]}")
        res["corpus"] = corpus_info(corpus)
        progress(f"corpus: {len(res['corpus'])} samples, {sum(c['seconds'] for c in res['corpus']):.1f}s of speech")

        try:
            res["transcripts"] = await transcripts(VENV_DIR, corpus, tmp, {"ours": wyoming_port,
                                                                          WHISPER_SHIPPED: shipped_port,
                                                                          WHISPER_BEAM1: beam1_port})
        except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
            res["errors"].append(f"transcripts: {exc}")
        stt_extra = ["--corpus", str(corpus), "--mode", "non_streaming",
                     "--trailing-silence", str(STT_TRAILING_SILENCE_S)]
        stt = await measure(res, "stt", VENV_DIR, "stt", [wyoming_port, shipped_port, beam1_port], stt_extra,
                            args.rounds)
        ours_stt = stt.by_port(wyoming_port) if stt is not None else None
        words = ours_stt.modes["non_streaming"].ref_words if ours_stt and "non_streaming" in ours_stt.modes else None
        if words:
            n = words // args.rounds
            res["notes"].append(f"The corpus has {n} words: one word is {100 / n:.2f} % of WER. Piper samples noise, "
                                "so each run makes a slightly different corpus and the WERs move by a word or two.")
        tts = await measure(res, "tts", VENV_DIR, "tts", [wyoming_port, piper_port], [], args.rounds)
        for ref in refs.values():  # idle from here on; stopped so that the second run has the machine
            ref.stop()

        stt_bg = tts_bg = None
        if not args.skip_background:
            srv = ours
            tokens0 = await asyncio.to_thread(srv.metric, "las_llm_tokens_total")
            hog = LlmHog(srv.url)
            await hog.start()
            progress("LLM generating in the background")
            # Sampled around each run: 1 means the pool's worker was generating then.
            busy = [await asyncio.to_thread(srv.metric, "las_llm_pool_busy")]
            stt_bg = await measure(res, "stt_with_llm", VENV_DIR, "stt", [wyoming_port], stt_extra, args.rounds)
            busy.append(await asyncio.to_thread(srv.metric, "las_llm_pool_busy"))
            tts_bg = await measure(res, "tts_with_llm", VENV_DIR, "tts", [wyoming_port], [], args.rounds)
            busy.append(await asyncio.to_thread(srv.metric, "las_llm_pool_busy"))
            await hog.stop()
            # The pool counts a generation's tokens when it ends: the one cut by barge_in ends just after.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and await asyncio.to_thread(srv.metric, "las_llm_pool_busy") > 0:
                await asyncio.sleep(0.2)
            tokens = await asyncio.to_thread(srv.metric, "las_llm_tokens_total") - tokens0
            res["background"] = {"generations_completed": hog.generations, "pool_busy_samples": busy,
                                 "tokens_generated": tokens, "errors": hog.errors}
            hog = None

        rows = build_rows(stt, tts, stt_bg, tts_bg, ours_port=wyoming_port,
                          whisper={WHISPER_SHIPPED: shipped_port, WHISPER_BEAM1: beam1_port},
                          piper=(PIPER, piper_port))
        res["rows"] = rows_json(rows)
        res["table"] = markdown(rows)
    finally:
        if hog is not None:
            await hog.stop()
        for ref in refs.values():
            code = ref.stop()
            if code not in (None, 0, -signal.SIGTERM):
                res["notes"].append(f"{ref.name} exited {code}: {ref.tail(500)}")
        if ours is not None:
            code = ours.stop(20, reap=True)
            if code != 0:
                res["errors"].append(f"our server exited {code}: {ours.tail(1000)}")
        shutil.rmtree(tmp, ignore_errors=True)


NOTES = [
    "STT latency is wyoming-bench's Total: from sending `transcribe` to receiving `transcript`. The audio is sent "
    "as fast as the socket takes it (chunk delay 0) with 0.5 s of trailing silence, so it is the wait after "
    "`audio-stop` plus the few ms of sending.",
    "wyoming-faster-whisper's beam size defaults to 5 on x86 (1 on ARM); ours decodes with beam 1. It runs as "
    "shipped and with --beam-size 1; both with our CTranslate2 model dir, int8 on CPU and our STT thread count.",
    "wyoming-faster-whisper transcribes through faster-whisper's own 30 s window with timestamps; ours encodes one "
    "window sized to the utterance, without timestamps.",
    "wyoming-piper has no thread setting: onnxruntime picks its default intra-op thread count (one per physical "
    "core), ours runs Piper on the TTS threads listed under settings.",
    "TTS texts are wyoming-bench's built-in four (1 to 4 sentences), each with a random nonce appended (its "
    "--unique default), sent sentence by sentence in streaming mode.",
    "The second run is ours only: the reference servers cannot share an LLM. Its ratios are against the "
    "reference figures of the first run.",
]


def print_settings(res: dict[str, Any]) -> None:
    s = res.get("settings", {})
    if "ours" in s:
        o = s["ours"]
        stt, tts = o["stt"], o["tts"]
        print(f"- ours (local-ai-server, Wyoming on {o['wyoming_uri']}): STT {stt['model']} on {stt['device']}, "
              f"{stt['compute_type']}, {stt['threads']} threads, beam {stt['beam_size']}, language {stt['language']}, "
              f"{stt['decoding']}; TTS {tts['voice']}, {tts['threads']} onnxruntime thread(s), spinning off; "
              f"env {o['env']}; versions {o['versions']}")
    for name, t in s.get("theirs", {}).items():
        print(f"- {name}: {' '.join(t['argv'])}")
    if "venv" in res:
        v = res["venv"]
        print(f"- reference venv {v['path']} ({v['action']} in {v['seconds']} s): versions {v['versions']}")
    if "corpus" in res:
        print(f"- corpus (by {PIPER}, built-in texts): " + "; ".join(f"{c['sample']} {c['seconds']} s"
                                                                    for c in res["corpus"]))
    print(f"- cores used by processes outside the benchmark, per run: {res['external_load_cores']}")
    if "background" in res:
        print(f"- background LLM: {res['background']}")


def print_report(res: dict[str, Any]) -> None:
    print(f"# bench/peers.py: ours vs the reference Wyoming servers ({res['started_at']}, {res['rounds']} rounds)\n")
    print_settings(res)
    print()
    if "table" in res:
        print(res["table"])
    if res.get("transcripts"):
        print("\nSTT transcripts, one pass each on the audio `stt` sends (wyoming-bench seed-corpus):")
        refs = {c["sample"]: c["text"] for c in res.get("corpus", [])}
        for sample, texts in res["transcripts"].items():
            print(f"- {sample} reference: {refs.get(sample)}")
            for name, text in texts.items():
                print(f"  - {name}: {text}")
    print("\nNotes:")
    for note in [*NOTES, *res["notes"]]:
        print(f"- {note}")
    for err in res["errors"]:
        print(f"- ERROR: {err[:2000]}")
    print(f"\nTook {res.get('duration_s')} s.")


async def amain(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    now = datetime.datetime.now(datetime.timezone.utc)
    res: dict[str, Any] = {"schema": "peers/1", "started_at": now.isoformat(timespec="seconds"),
                           "rounds": args.rounds, "skip_background": args.skip_background, "machine": machine(),
                           "pins": PINS, "notes": [], "errors": [], "runs": {}, "raw": {}, "external_load_cores": {}}
    code = 0
    t0 = time.monotonic()
    try:
        await run(args, res)
    except Exception as exc:  # noqa: BLE001 - recorded with what was measured; the traceback goes to stderr
        traceback.print_exc()
        res["errors"].append(f"fatal: {type(exc).__name__}: {exc}")
        code = 1
    res["duration_s"] = round(time.monotonic() - t0, 1)
    res["notes"] = [*NOTES, *res["notes"]]
    print_report({**res, "notes": res["notes"][len(NOTES):]})
    out = args.out or ROOT / "bench" / "results" / f"peers-{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    progress(f"wrote {out}")
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process this run started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
