"""Capacity: how many concurrent phone callers one box serves in `full` mode, on the local LLM pool and on a remote one.

Usage::

    .venv/bin/python bench/capacity.py [--quick] [--steps 1,2,4,8,12] [--turns 3 | --step-seconds 60]
                                       [--backends local,remote] [--scheduling fifo,priority]
                                       [--json] [--out FILE]

Each step runs N callers at once against the real server (local_ai_server.harness) over AVA's protocol in
`full` mode. A caller (bench/caller.py) starts at a seeded random offset, streams a Piper-spoken sentence in
real time as 20 ms PCM16 frames with line noise between utterances, listens to the whole answer as it would
play (it does not speak again before the audio it received has finished playing), pauses 0.5-2.5 s and speaks
again. Per step: end of speech -> first audio p50/p95, failed turns, the time work queued for STT, the LLM
and TTS (`las_queue_wait_seconds`, scraped from /metrics before and after), the server's own turn timings,
and the cores used by the server, its LLM workers, the engine, this client and processes outside the
benchmark. Calls per box = the highest N with first-audio p95 <= 1.5 s and no failed turn (every smaller step
passing too).

Scheduling: `--scheduling fifo,priority` starts one server per scheduling (LOCAL_SCHEDULING) and alternates
their steps (N callers on fifo, then N on priority, then the next N), so that both meet the same machine.

Backends: `local` (the server's own LLM worker pool) and `remote` (LOCAL_LLM_BACKEND=openai against
llama-cpp-python's own server, `python -m llama_cpp.server`, on the same box with the same model and threads:
the remote figure pays for the engine's CPU too). The remote run ends with decode-rate pairs: through our
server against a client talking straight to the engine (bench/capacity_decode.py).

It measures and reports; it never fails on a figure. Progress goes to stderr, the table to stdout, and with
--json one JSON object (settings, machine, load, every step) as the last line.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import procs  # noqa: E402
from caller import Limits, plan_callers, run_caller  # noqa: E402
from capacity_decode import DECODE_SERVER_ENV, remote_decode_pairs  # noqa: E402
from capacity_report import (  # noqa: E402
    P95_GOAL_MS,
    calls_per_box,
    render_table,
    server_figures,
    step_passes,
    summarize_step,
    turn_stages,
)
from phase_llm import wait_pool_idle  # noqa: E402
from report import json_safe, machine_info  # noqa: E402
from speech import Client, synthesize  # noqa: E402
from stats import progress, rnd  # noqa: E402
from workload import QUESTIONS, STT_SENTENCES  # noqa: E402

from local_ai_server.config import cpu_count, thread_budget  # noqa: E402
from local_ai_server.harness import ServerProc, parse_metrics  # noqa: E402
from local_ai_server.harness_engine import ALIAS, Engine, remote_env  # noqa: E402
from local_ai_server.setup.selection import read_selection  # noqa: E402

SENTENCES = QUESTIONS + STT_SENTENCES  # what callers say: questions and requests, 16 in all
STEP_REST_S = 2.0  # between steps, once the server is idle
ENGINE_BATCH = 256  # LOCAL_LLM_BATCH's default: the engine prefills as our workers do


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the workload, for the JSON."""
    return {"quick": args.quick, "steps": args.steps, "turns_per_caller": None if args.step_seconds else args.turns,
            "step_seconds": args.step_seconds, "backends": args.backends, "scheduling": args.scheduling,
            "seed": args.seed,
            "start_spread_s": args.spread, "pause_s": [0.5, 2.5], "stop_after_failure": not args.all_steps,
            "goal": f"first-audio p95 <= {P95_GOAL_MS:g} ms, no failed turn", "decode_pairs": args.decode_pairs,
            "decode_tokens": args.decode_tokens, "sentences": len(SENTENCES), "server_env": "defaults",
            "limits_s": {"first_audio": Limits().first_audio_s, "whole_answer": Limits().answer_s}}


async def run_step(srv: ServerProc, backend: str, n: int, speech: dict[str, Any], args: argparse.Namespace,
                   engine_pid: int | None) -> dict[str, Any]:
    """N callers at once; the step's client and server figures."""
    turns = args.turns if not args.step_seconds else max(1, int(args.step_seconds / 4) + 1)
    plans = plan_callers(n, args.seed, SENTENCES, turns, args.spread)
    tag = f"cap-{backend}-n{n}-"
    outs: list[dict[str, Any]] = [{} for _ in plans]
    before = parse_metrics(await asyncio.to_thread(srv.metrics))
    cpu = procs.CpuWindow(srv.proc.pid, engine_pid)
    cpu.start()
    t0 = time.perf_counter()
    stop_at = t0 + args.step_seconds if args.step_seconds else None
    limits = Limits()

    async def caller(i: int) -> None:
        await run_caller(srv.url, plans[i], speech, f"{tag}{i}", outs[i], stop_at=stop_at, limits=limits)
        outs[i]["done"] = True

    cap = args.spread + (args.step_seconds + limits.answer_s if args.step_seconds else turns * 60.0) + 30.0
    tasks = [asyncio.ensure_future(caller(i)) for i in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=cap)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for i, t in enumerate(tasks):
        if not t.cancelled() and t.exception() is not None:
            # A bug or surprise on the client's side still shows in the step, as a failed turn with its cause.
            progress(f"  caller {i} crashed: {t.exception()!r}")
            outs[i].setdefault("turns", []).append({"failure": "client_error", "error": repr(t.exception())[:300]})
            outs[i]["done"] = True
    wall = time.perf_counter() - t0
    cores = cpu.stop()
    after = parse_metrics(await asyncio.to_thread(srv.metrics))
    step = summarize_step(n, outs, timed_out=bool(pending))
    kind = "openai" if backend.startswith("remote") else "local"
    step.update(wall_s=round(wall, 1), cpu=cores, server=server_figures(before, after, kind),
                server_turns=turn_stages(await asyncio.to_thread(srv.log_events), tag))
    step["passed"] = step_passes(step)
    step["callers_detail"] = outs
    w = step["server"]["queue_wait"]
    progress(f"  {backend} N={n}: {step['turns_ok']}/{step['turns']} turns ok, failed {step['failed']} "
             f"{step['failures'] or ''}, v2fa p50 {step['v2fa_ms']['p50']} p95 {step['v2fa_ms']['p95']} ms, "
             f"wait p95 stt/llm/tts {w['stt']['p95_ms']}/{w['llm']['p95_ms']}/{w['tts']['p95_ms']} ms, "
             f"cores server {cores.get('server_main')} workers {cores.get('llm_workers')} engine "
             f"{cores.get('engine')} client {cores.get('client')} outside {cores.get('outside')} "
             f"-> {'pass' if step['passed'] else 'FAIL'}")
    return step


async def warm_up(srv: ServerProc, speech: dict[str, Any], backend: str) -> dict[str, Any]:
    """One caller, one turn, not counted: the first transcription and answer pay one-off costs."""
    plan = plan_callers(1, 0, SENTENCES, 1, 0.0)[0]
    out: dict[str, Any] = {}
    await run_caller(srv.url, plan, speech, f"warm-{backend}", out)
    return {"turns": out.get("turns"), "ok": bool(out.get("turns")) and out["turns"][0].get("failure") is None}


async def start_backend(name: str, srv: ServerProc, speech: dict[str, Any], args: argparse.Namespace,
                        res: dict[str, Any]) -> dict[str, Any]:
    """The server's status and one warm-up turn, before its steps."""
    out: dict[str, Any] = {"steps": []}
    res["backends"][name] = out
    c = await Client.connect(srv.url)
    status, _ = await c.request({"type": "status", "request_id": "st"}, "status_response")
    await c.close()
    out["server"] = {"port_open_s": rnd(srv.port_open_s, 2), "ready_s": rnd(srv.ready_s, 2),
                     "llm": status.get("models", {}).get("llm", {}), "pool": status.get("pool")}
    if res["machine"].get("models") is None:
        res["machine"] = {**machine_info(status, args.quick), "loadavg_at_start": res["machine"]["loadavg_at_start"]}
    progress(f"{name}: warm-up turn ...")
    out["warm_up"] = await warm_up(srv, speech, name)
    return out


async def run_backends(servers: dict[str, ServerProc], speech: dict[str, Any], args: argparse.Namespace,
                       engine_pid: int | None, res: dict[str, Any]) -> None:
    """Warm-up, then the steps in order, alternating between the servers (one per scheduling) at each step;
    a server stops after its first failing step unless --all-steps."""
    outs = {name: await start_backend(name, srv, speech, args, res) for name, srv in servers.items()}
    stopped: set[str] = set()
    for n in args.steps:
        for name, srv in servers.items():
            if name in stopped:
                continue
            await wait_pool_idle(srv.url)
            await asyncio.sleep(STEP_REST_S)
            progress(f"{name}: {n} caller(s) ...")
            step = await run_step(srv, name, n, speech, args, engine_pid)
            outs[name]["steps"].append(step)
            if not step["passed"] and not args.all_steps:
                progress(f"{name}: step {n} failed; the ramp stops here (--all-steps runs the rest)")
                stopped.add(name)
    for out in outs.values():
        out["verdict"] = calls_per_box(out["steps"])


def start_engine(tmp: Path, threads: int) -> Engine:
    """llama-cpp-python's server on the embedded GGUF, with the threads and batch our LLM workers get."""
    sel = read_selection(ROOT / "models")
    if sel is None:
        raise RuntimeError(f"no models installed in {ROOT / 'models'}: run ./install.sh")
    engine = Engine(sel.path("llm"), tmp, threads=threads, batch=ENGINE_BATCH)
    engine.start(timeout=120)
    assert engine.proc is not None
    procs._CHILDREN.append(engine.proc)  # killed on a signal with the other helpers
    return engine


async def benchmark(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every backend's ramp, then the remote decode pairs."""
    res: dict[str, Any] = {"settings": settings(args), "machine": machine_info(None, args.quick), "backends": {},
                           "errors": []}
    res["machine"]["loadavg_at_start"] = list(os.getloadavg())
    sys0, own0, t0 = procs.system_busy_seconds(), procs.own_tree_seconds(), time.perf_counter()
    progress("synthesizing caller speech with Piper ...")
    speech = await asyncio.to_thread(synthesize, SENTENCES)
    threads = thread_budget(cpu_count())[0]
    for backend in args.backends:
        engine: Engine | None = None
        srv: ServerProc | None = None
        servers: dict[str, ServerProc] = {}
        name = backend
        try:
            if backend == "remote":
                progress(f"starting llama_cpp.server ({threads} threads) ...")
                engine = await asyncio.to_thread(start_engine, tmp, threads)
            for sched in args.scheduling:
                # One server per scheduling, all up at once, so that their steps can alternate.
                name = backend if len(args.scheduling) == 1 else f"{backend}-{sched}"
                progress(f"starting the server ({backend} LLM backend, {sched} scheduling) ...")
                env = {**(remote_env(engine.url) if engine is not None else {}), "LOCAL_SCHEDULING": sched}
                servers[name] = await asyncio.to_thread(procs.start_server, f"cap-{name}", tmp, env)
            await run_backends(servers, speech, args, engine.pid if engine else None, res)
            for s in servers.values():
                await asyncio.to_thread(s.stop, 20, reap=True)
            servers.clear()
            if engine is not None and args.decode_pairs > 0:
                srv = await asyncio.to_thread(procs.start_server, "cap-decode", tmp,
                                              remote_env(engine.url, **DECODE_SERVER_ENV))
                top_p = float(res["backends"][name]["server"]["llm"].get("config", {}).get("top_p") or 0.9)
                progress(f"remote decode rate: {args.decode_pairs} alternating pairs of {args.decode_tokens} tokens")
                res["remote_decode"] = await remote_decode_pairs(srv, engine.url, ALIAS, engine.pid, threads,
                                                                 args.decode_pairs, args.decode_tokens, top_p)
        except Exception as exc:  # noqa: BLE001 - one backend failing must not lose the other's figures
            msg = f"{name}: {type(exc).__name__}: {exc}"[:2000]  # several schedulings: the last one started
            progress(f"BACKEND FAILED {msg}")
            res["errors"].append(msg)
            res["backends"].setdefault(name, {})["error"] = msg
            res["backends"][name].setdefault("verdict", calls_per_box(res["backends"][name].get("steps", [])))
        finally:
            for s in [*servers.values(), *([srv] if srv is not None else [])]:
                await asyncio.to_thread(s.stop, 20, reap=True)
            if engine is not None:
                await asyncio.to_thread(engine.stop)
    sys1, own1, wall = procs.system_busy_seconds(), procs.own_tree_seconds(), time.perf_counter() - t0
    if sys0 is not None and sys1 is not None:
        own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
        res["outside_load_cores"] = rnd(max(0.0, (sys1 - sys0 - own) / wall), 2)
    res["calls_per_box"] = {k: v.get("verdict", {}).get("calls_per_box") for k, v in res["backends"].items()}
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="steps 1,2,4, 2 turns a caller, 3 decode pairs (~6 min)")
    p.add_argument("--steps", default=None, help="comma-separated caller counts (default 1,2,4,8,12)")
    p.add_argument("--turns", type=int, default=None, help="turns per caller in each step (default 3, quick 2)")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="run each step this long instead (callers start no turn after it)")
    p.add_argument("--backends", default="local,remote", help="local, remote or both (default local,remote)")
    p.add_argument("--scheduling", default="priority",
                   help="priority, fifo or both (fifo,priority: one server each, their steps alternating)")
    p.add_argument("--all-steps", action="store_true", help="run every step even after one failed")
    p.add_argument("--seed", type=int, default=1, help="the callers' schedule (offsets, sentences, pauses)")
    p.add_argument("--spread", type=float, default=4.0, help="callers start within this many seconds")
    p.add_argument("--decode-pairs", type=int, default=None, help="remote decode pairs (default 6, quick 3; 0: none)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode run (default 400, quick 200)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object (indented) to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' and the engine's logs")
    args = p.parse_args(argv)
    args.steps = [int(x) for x in (args.steps or ("1,2,4" if args.quick else "1,2,4,8,12")).split(",") if x.strip()]
    if not args.steps or min(args.steps) < 1:
        p.error("--steps: positive caller counts")
    args.turns = max(1, args.turns or (2 if args.quick else 3))
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - {"local", "remote"}:
        p.error("--backends: local, remote or both")
    args.scheduling = [s.strip() for s in args.scheduling.split(",") if s.strip()]
    if not args.scheduling or set(args.scheduling) - {"priority", "fifo"} or len(set(args.scheduling)) > 2 \
            or len(set(args.scheduling)) < len(args.scheduling):
        p.error("--scheduling: priority, fifo or both")
    args.decode_pairs = (3 if args.quick else 6) if args.decode_pairs is None else max(0, args.decode_pairs)
    args.decode_tokens = args.decode_tokens or (200 if args.quick else 400)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="las-capacity-"))

    def on_signal(signum: int, _frame: Any) -> None:
        procs.interrupt_children()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    budget = (20 * 60 if args.quick else 60 * 60) * len(args.scheduling)
    try:
        res = asyncio.run(asyncio.wait_for(benchmark(args, tmp), budget))
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except asyncio.TimeoutError:
        progress(f"the benchmark did not finish within {budget} s: aborted")
        return 3
    finally:
        procs.interrupt_children()
        procs.stop_all_servers()
        if args.keep_logs:
            progress(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["duration_s"] = round(time.monotonic() - started, 1)
    print(render_table(res))
    print(f"\n(run took {res['duration_s']} s)")
    out = json_safe(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
