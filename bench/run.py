"""End-to-end benchmark of local-ai-server: the real server, the real socket, real speech.

Usage::

    .venv/bin/python bench/run.py [--quick] [--json] [--turns N] [--out FILE] [--keep-logs]

It starts its own server subprocesses (``python -m local_ai_server``) on free 127.0.0.1 ports with
JSON logs, drives them as a telephony client would (speech synthesized by Piper from known sentences,
streamed in real time as 20 ms PCM16 frames), reads the servers' ``turn.done`` / ``stt.final`` log
events and ``/metrics`` for the server-side breakdown, and stops every process it started.

Phases (each bounded by timeouts):

1. Speech for every sentence is synthesized once, before any server runs.
2. Server A (default settings): start-up times, idle ``status`` round-trip, idle RSS and RSS per idle
   connection (100 connections), voice-to-first-audio over ``full``-mode turns, and (full run only)
   the number of concurrent real-time ``stt`` sessions.
3. Server B (long generations: ``LOCAL_LLM_MAX_TOKENS=1500 LOCAL_LLM_CONTEXT=4096
   LOCAL_LLM_TEMPERATURE=0 LOCAL_LLM_REPEAT_PENALTY=1.0``, plus ``LOCAL_LLM_INFER_TIMEOUT_SEC=600`` so a
   slow machine does not cut them): bare llama-cpp-python decode rate in a separate process vs the rate
   through the server (alternating pairs), event-loop lag and ``status`` round-trip while generations run
   back to back, STT and TTS latency alone and beside a long generation, loop lag during ``reload_llm``.

Every phase also records how many cores processes outside the benchmark used meanwhile
(``details.external_load_cores``), because the figures are only as quiet as the machine.

The human-readable table goes to stdout; progress goes to stderr. With ``--json`` the last line of
stdout is one JSON object with every figure, its goal and whether it was met, and a ``machine`` block.
It measures and reports; it never fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from phase_llm import (  # noqa: E402
    BareLlm,
    LlmHog,
    bare_decode_run,
    loop_lag_window,
    measure_reload_lag,
    server_decode_run,
    status_probe,
    tts_round_trips,
    wait_pool_idle,
)
from phase_voice import measure_idle_connections, measure_stt_sessions, measure_v2fa, stt_utterances  # noqa: E402
from procs import (  # noqa: E402
    CLEAN_EXTERNAL_CORES,
    interrupt_children,
    own_tree_seconds,
    rss_mb,
    start_server,
    stop_all_servers,
    system_busy_seconds,
)
from report import ALL_KEYS, add_notes, goal_checks, json_safe, lag_value, machine_info, render_table  # noqa: E402
from speech import Client, synthesize  # noqa: E402
from stats import pct, progress, rnd, summary  # noqa: E402
from workload import LONG_ENV, QUESTIONS, RATE, STT_SENTENCES, Plan, make_plan  # noqa: E402


async def guarded(res: dict[str, Any], name: str, fn: Callable[[], Awaitable[None]]) -> bool:
    """Run one phase; a failure is recorded in res['errors'] and the run goes on.

    Also records how many cores processes outside this benchmark used during the phase (noise).
    """
    sys0, own0, t0 = system_busy_seconds(), own_tree_seconds(), time.perf_counter()
    try:
        await fn()
        return True
    except Exception as exc:  # noqa: BLE001 - a broken phase must not lose the others' figures
        msg = f"{name}: {type(exc).__name__}: {exc}"
        progress(f"PHASE FAILED {msg}")
        res["errors"].append(msg[:2000])
        return False
    finally:
        sys1, own1, wall = system_busy_seconds(), own_tree_seconds(), time.perf_counter() - t0
        if sys0 is not None and sys1 is not None and wall > 0:
            own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
            res["details"].setdefault("external_load_cores", {})[name] = rnd(
                max(0.0, (sys1 - sys0 - own) / wall), 2)


async def run_benchmark(plan: Plan, tmp: Path) -> dict[str, Any]:
    """Every phase, in order; returns the result object (missing figures stay None)."""
    res: dict[str, Any] = {k: None for k in ALL_KEYS}
    res.update({"quick": plan.quick, "notes": [], "errors": []})
    details: dict[str, Any] = {}
    res["details"] = details
    loadavg = list(os.getloadavg())
    res["machine"] = machine_info(None, plan.quick)
    res["machine"]["loadavg_at_start"] = loadavg
    if not plan.stt_sessions:
        res["stt_sessions_realtime_max_skipped"] = "--quick skips the concurrent stt-session ramp"
        details["stt_sessions"] = {"skipped": "--quick skips the concurrent stt-session ramp"}

    progress("synthesizing caller speech with Piper ...")
    speech = await asyncio.to_thread(synthesize, QUESTIONS + STT_SENTENCES)
    details["speech_s"] = {s: round(len(a) / RATE, 2) for s, a in speech.items()}

    # ------------------------------------------------------------ server A: default settings
    progress("starting server A (default settings) ...")
    a = await asyncio.to_thread(start_server, "default", tmp)
    try:
        res["port_open_s"] = rnd(a.port_open_s, 3)
        res["ready_s"] = rnd(a.ready_s, 3)
        progress(f"  port open {a.port_open_s:.3f}s, ready {a.ready_s:.3f}s")
        c = await Client.connect(a.url)
        status_a, _ = await c.request({"type": "status", "request_id": "st"}, "status_response")
        await c.close()
        res["machine"] = machine_info(status_a, plan.quick)
        res["machine"]["loadavg_at_start"] = loadavg

        async def idle_status() -> None:
            progress("idle status round-trips ...")
            await asyncio.sleep(0.5)
            idle = await status_probe(a.url, plan.status_idle_samples, tag="idle")
            res["status_p50_ms_idle"] = rnd(pct(idle, 50), 2)
            details["status_idle_ms"] = summary(idle, 2)

        async def memory() -> None:
            progress(f"RSS idle and with {plan.idle_connections} idle connections ...")
            pids = [int(p) for p in status_a.get("pool", {}).get("pids", [])]
            res["rss_mb_idle"] = rnd(rss_mb(a.proc.pid), 1)
            res["rss_mb_llm_workers"] = [rnd(rss_mb(p), 1) for p in pids]
            conn = await measure_idle_connections(a, plan.idle_connections)
            res["rss_mb_per_idle_connection"] = conn["rss_mb_per_idle_connection"]
            details["idle_connections"] = conn

        async def v2fa() -> None:
            progress(f"voice-to-first-audio: {plan.v2fa_turns} full-mode turns ...")
            v = await measure_v2fa(a, plan, speech)
            details["v2fa"] = v
            res["v2fa_p50_ms"] = v["v2fa"]["p50"]
            res["v2fa_p95_ms"] = v["v2fa"]["p95"]
            res["v2fa_samples"] = v["ok"]
            res["stt_ms"] = v["stt_ms"]["p50"]
            res["llm_first_token_ms"] = v["llm_first_token_ms"]["p50"]
            res["first_audio_ms"] = v["first_audio_ms"]["p50"]
            res["server_p50_ms"] = v["first_audio_ms"]["p50"]
            res["endpoint_delay_ms"] = (v["endpoint_delay_ms"]["p50"] if v["endpoint_delay_pairs"]
                                        else v["endpoint_delay_ms_from_p50s"])

        async def sessions() -> None:
            progress("concurrent real-time stt sessions ...")
            sess = await measure_stt_sessions(a, speech, plan.stt_session_utterances)
            res["stt_sessions_realtime_max"] = sess["max"]
            details["stt_sessions"] = sess

        await guarded(res, "idle status", idle_status)
        await guarded(res, "memory", memory)
        await guarded(res, "v2fa", v2fa)
        if plan.stt_sessions:
            await guarded(res, "stt sessions", sessions)
        res["rss_mb_after_phase_a"] = rnd(rss_mb(a.proc.pid), 1)
    finally:
        progress("stopping server A ...")
        details["server_a_exit_code"] = await asyncio.to_thread(a.stop)

    # ------------------------------------------------------------ server B: long generations
    progress("starting server B (long generations) ...")
    b = await asyncio.to_thread(start_server, "long", tmp, LONG_ENV)
    try:
        details["server_b_start"] = {"port_open_s": rnd(b.port_open_s, 3), "ready_s": rnd(b.ready_s, 3)}
        c = await Client.connect(b.url)
        status_b, _ = await c.request({"type": "status", "request_id": "st"}, "status_response")
        await c.close()
        llm_cfg = status_b.get("models", {}).get("llm", {}).get("config", {})
        threads = int(llm_cfg.get("threads") or 1)
        model_path = status_b.get("models", {}).get("llm", {}).get("path")

        async def decode_rate() -> None:
            progress(f"decode rate: bare llama-cpp-python vs through the server (threads={threads}, "
                     f"{plan.rate_token_cap} tokens, {plan.rate_runs} alternating pairs) ...")
            bare_runs: list[dict[str, Any]] = []
            server_runs: list[dict[str, Any]] = []
            ratios: list[dict[str, Any]] = []
            details["decode_rate"] = {"bare_runs": bare_runs, "server_runs": server_runs,
                                      "pair_ratios": ratios, "threads": threads,
                                      "token_cap": plan.rate_token_cap, "pairs": plan.rate_runs}
            await wait_pool_idle(b.url)
            bare = BareLlm(str(model_path), threads, int(llm_cfg.get("batch") or 256), plan.rate_token_cap,
                           llm_cfg)
            try:
                await bare.start()
                assert bare.proc is not None
                async def bare_run() -> dict[str, Any]:
                    return await bare_decode_run(bare, threads)

                async def server_run(i: int) -> dict[str, Any]:
                    return await server_decode_run(b.url, threads, plan.rate_token_cap, str(i))

                for i in range(plan.rate_runs):
                    # Alternate which side goes first: on this kind of VM the second of two back-to-back
                    # generations is measurably slower, which would otherwise always count against one side.
                    if i % 2 == 0:
                        br = await bare_run()
                        sr = await server_run(i)
                    else:
                        sr = await server_run(i)
                        br = await bare_run()
                    bare_runs.append(br)
                    server_runs.append(sr)
                    progress(f"  pair {i + 1}: bare {br.get('tok_s')} tok/s (cpu share {br.get('cpu_share')},"
                             f" external {br.get('external_cores')} cores), server {sr.get('tok_s')} tok/s "
                             f"(worker cpu share {sr.get('cpu_share')}, server main + client "
                             f"{sr.get('other_own_cores')} cores, external {sr.get('external_cores')} cores)"
                             + (f" ({sr['error']})" if sr.get("error") else ""))
                    if br.get("tok_s") and sr.get("tok_s"):
                        ext = max(br.get("external_cores") or 0.0, sr.get("external_cores") or 0.0)
                        clean = ext < CLEAN_EXTERNAL_CORES
                        ratios.append({"ratio": round(sr["tok_s"] / br["tok_s"], 3), "clean": clean})
                    else:
                        ratios.append({"ratio": None, "clean": False})
            finally:
                await bare.close()
            # Each pair ran back to back: the figures are medians over the pairs in which no other work on
            # the machine competed for the cores (external_cores), or over all pairs if there is none.
            use = [i for i, r in enumerate(ratios) if r["clean"]] or list(range(len(ratios)))
            clean = [r["ratio"] for r in ratios if r["clean"]]
            res["llm_tok_s_bare"] = rnd(pct([bare_runs[i]["tok_s"] for i in use], 50), 2)
            res["llm_tok_s_server"] = rnd(pct([server_runs[i]["tok_s"] for i in use], 50), 2)
            res["llm_tok_s_ratio_vs_bare"] = rnd(pct([ratios[i]["ratio"] for i in use], 50), 3)
            details["decode_rate"]["ratio_from"] = (f"{len(clean)} clean pair(s)" if clean else
                                                    "all pairs (none clean: the machine was busy)")

        alone: dict[str, Any] = {}

        async def stt_tts_alone() -> None:
            progress("STT and TTS alone ...")
            await wait_pool_idle(b.url)
            alone["stt"] = await stt_utterances(b, speech, STT_SENTENCES[:plan.stt_samples], "stt-alone")
            res["stt_ms_alone"] = alone["stt"]["stt_ms"]["p50"]
            details["stt_alone"] = alone["stt"]
            alone["tts"] = await tts_round_trips(b.url, plan.tts_samples, "alone")
            res["tts_ms_alone"] = alone["tts"]["tts_ms"]["p50"]
            details["tts_alone"] = alone["tts"]

        async def under_llm() -> None:
            progress(f"loop lag and status round-trip ({plan.status_llm_samples} at 20 Hz) while the LLM "
                     "generates back to back ...")
            await wait_pool_idle(b.url)
            hog = LlmHog(b.url)
            try:
                await hog.start()
                under, lag = await loop_lag_window(b, lambda: status_probe(b.url, plan.status_llm_samples,
                                                                            tag="llm"))
                res["status_p99_ms_under_llm"] = rnd(pct(under, 99), 2)
                details["status_under_llm_ms"] = summary(under, 2)
                res["loop_lag_p99_ms"] = lag_value(lag)
                details["loop_lag_under_llm"] = lag
                progress("STT and TTS beside a long generation ...")
                stt_llm, lag_stt = await loop_lag_window(
                    b, lambda: stt_utterances(b, speech, STT_SENTENCES[:plan.stt_samples], "stt-llm"))
                res["stt_ms_with_llm"] = stt_llm["stt_ms"]["p50"]
                details["stt_with_llm"] = stt_llm
                details["loop_lag_stt_beside_llm"] = lag_stt
                tts_llm = await tts_round_trips(b.url, plan.tts_samples, "llm")
                res["tts_ms_with_llm"] = tts_llm["tts_ms"]["p50"]
                details["tts_with_llm"] = tts_llm
            finally:
                await hog.stop()
                details["llm_hog"] = {"generations_completed": hog.generations, "errors": hog.errors}

        async def reload_lag() -> None:
            progress(f"loop lag during {plan.reloads} reload_llm ...")
            await wait_pool_idle(b.url)
            rl = await measure_reload_lag(b, plan.reloads)
            res["loop_lag_p99_ms_reload"] = lag_value(rl["lag"])
            details["loop_lag_reload"] = rl

        await guarded(res, "decode rate", decode_rate)
        await guarded(res, "stt/tts alone", stt_tts_alone)
        await guarded(res, "under llm", under_llm)
        await guarded(res, "reload", reload_lag)
    finally:
        b.remember_children()
        progress("stopping server B ...")
        details["server_b_exit_code"] = await asyncio.to_thread(b.stop)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller samples, no stt-session ramp (~3 min)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--turns", type=int, default=None, help="voice turns for v2fa (min 20, quick min 10)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' log files (path printed)")
    args = p.parse_args(argv)
    plan = make_plan(args.quick, args.turns)
    tmp = Path(tempfile.mkdtemp(prefix="las-bench-"))

    def on_signal(signum: int, _frame: Any) -> None:
        interrupt_children()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    budget = 420 if plan.quick else 1800

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(run_benchmark(plan, tmp), budget)

    res: dict[str, Any] | None = None
    try:
        res = asyncio.run(bounded())
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except asyncio.TimeoutError:
        progress(f"the benchmark did not finish within {budget} s: aborted")
        return 3
    finally:
        stop_all_servers()
        if args.keep_logs:
            progress(f"server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["duration_s"] = round(time.monotonic() - started, 1)
    goal_checks(res)
    add_notes(res)
    print(render_table(res))
    print(f"\n(run took {res['duration_s']} s)")
    out = json_safe({k: res[k] for k in res})
    text = json.dumps(out, separators=(",", ":"))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
