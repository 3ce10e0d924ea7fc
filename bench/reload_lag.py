"""Event-loop lag while the LLM reloads, with enough samples to tell 5 ms from 10 ms.

Per round, a server answers `--reloads` reload_llm requests back to back while a second connection asks
`status` every 20 ms. Over all rounds it reports the server's own loop-lag histogram (its sampler wakes every
50 ms) for the reload windows: the samples, the p99 bucket, and how many samples were over 5 and over 10 ms;
and the status round-trips during the reloads. Each reload window is followed by an idle window as long (the
status probe still running): on a shared machine that window of the same minute is the baseline. With
`--against CHECKOUT` the other checkout's server (its code, this tree's models) runs the same rounds,
alternating with this one, so both see the same machine.

    .venv/bin/python bench/reload_lag.py [--rounds 4] [--reloads 8] [--against /path/to/main] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402 - the benchmark's own server processes
from speech import Client  # noqa: E402
from stats import histogram_buckets, histogram_quantile, pct, progress, rnd  # noqa: E402

from local_ai_server.harness import ServerProc, parse_metrics  # noqa: E402

LAG = "las_event_loop_lag_seconds"
PROBE_S = 0.02


async def probe_status(url: str, stop: asyncio.Event, rtts: list[float]) -> None:
    """`status` round-trips (ms), one every PROBE_S, until `stop`."""
    c = await Client.connect(url)
    try:
        i = 0
        while not stop.is_set():
            _, rtt = await c.request({"type": "status", "request_id": f"p{i}"}, "status_response", timeout=15)
            rtts.append(rtt * 1000)
            i += 1
            if i % 50 == 0:
                c.trim()
            await asyncio.sleep(PROBE_S)
    finally:
        await c.close()


async def window(srv: ServerProc, body: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """Run `body` with the status probe going: the lag histogram's bucket deltas, status times, outside load."""
    stop = asyncio.Event()
    rtts: list[float] = []
    sys0, own0, t0 = procs.system_busy_seconds(), procs.own_tree_seconds(), time.perf_counter()
    before = parse_metrics(await asyncio.to_thread(srv.metrics))
    prober = asyncio.ensure_future(probe_status(srv.url, stop, rtts))
    try:
        await body()
    finally:
        stop.set()
        await asyncio.gather(prober, return_exceptions=True)
    after = parse_metrics(await asyncio.to_thread(srv.metrics))
    wall = time.perf_counter() - t0
    sys1, own1 = procs.system_busy_seconds(), procs.own_tree_seconds()
    own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
    outside = max(0.0, (sys1 - sys0 - own) / wall) if sys0 is not None and sys1 is not None else None
    deltas = {key: value - before.get(key, 0.0) for key, value in after.items() if key.startswith(f"{LAG}_bucket")}
    return {"lag_buckets": deltas, "status_ms": rtts, "outside_cores": rnd(outside, 2), "seconds": wall}


async def one_round(srv: ServerProc, reloads: int) -> dict[str, dict[str, Any]]:
    """`reloads` back-to-back reloads, then as long idle (the baseline of the same minute), both probed."""
    c = await Client.connect(srv.url)
    durations: list[float] = []
    errors: list[str] = []

    async def reload_all() -> None:
        for i in range(reloads):
            reply, rtt = await c.request({"type": "reload_llm", "request_id": f"r{i}"}, "reload_response", 180)
            if reply.get("status") != "success":
                errors.append(str(reply.get("message")))
            durations.append(rtt * 1000)

    try:
        busy = await window(srv, reload_all)
    finally:
        await c.close()
    busy.update(reload_ms=durations, errors=errors)
    idle = await window(srv, lambda: asyncio.sleep(busy["seconds"]))
    idle.update(reload_ms=[], errors=[])
    return {"reload": busy, "idle": idle}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """All rounds of one server together."""
    buckets: dict[str, float] = {}
    for r in rounds:
        for key, value in r["lag_buckets"].items():
            buckets[key] = buckets.get(key, 0.0) + value
    cumulative = dict(histogram_buckets(buckets, LAG))
    total = max(cumulative.values(), default=0.0)
    p99 = histogram_quantile({}, buckets, LAG, 0.99)
    status = [x for r in rounds for x in r["status_ms"]]
    reload_ms = [x for r in rounds for x in r["reload_ms"]]
    return {
        "lag_samples": int(total),
        "lag_p99_bucket_ms": p99["upper_ms"] if not p99.get("upper_inf") else float("inf"),
        "lag_p99_interp_ms": p99["interp_ms"],
        "lag_over_5ms": int(total - cumulative.get(0.005, total)),
        "lag_over_10ms": int(total - cumulative.get(0.01, total)),
        "lag_max_bucket_ms": p99["max_bucket_ms"],
        "status_n": len(status), "status_p50_ms": rnd(pct(status, 50), 1), "status_p99_ms": rnd(pct(status, 99), 1),
        "status_max_ms": rnd(max(status, default=0.0), 1),
        "reloads": len(reload_ms), "reload_p50_ms": rnd(pct(reload_ms, 50), 0),
        "errors": [e for r in rounds for e in r["errors"]],
        "outside_cores": [r["outside_cores"] for r in rounds],
    }


def start_other(root: Path, tmp: Path) -> ServerProc:
    """Start the server of another checkout (its code, this tree's models)."""
    own = procs.ROOT
    procs.ROOT = root  # start_server runs `python -m local_ai_server` from ROOT
    try:
        return procs.start_server("other", tmp, {"LOCAL_MODELS_DIR": str(own / "models")})
    finally:
        procs.ROOT = own


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="reload-lag-"))
    servers = {"this": await asyncio.to_thread(procs.start_server, "this", tmp)}
    if args.against is not None:
        servers["other"] = await asyncio.to_thread(start_other, args.against.resolve(), tmp)
    rounds: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name in servers}
    load0 = os.getloadavg()
    try:
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                progress(f"round {i + 1}/{args.rounds}: {args.reloads} reloads on {name}")
                rounds[name].append(await one_round(servers[name], args.reloads))
    finally:
        await asyncio.to_thread(procs.stop_all_servers)
    return {"rounds": args.rounds, "reloads_per_round": args.reloads, "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "servers": {f"{name} {kind}": summarize([r[kind] for r in rs])
                        for name, rs in rounds.items() for kind in ("reload", "idle")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reloads", type=int, default=8)
    ap.add_argument("--against", type=Path, default=None, help="another checkout whose server runs the same rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    print(f"loop lag during reload_llm ({args.rounds} rounds x {args.reloads} reloads; status every "
          f"{PROBE_S * 1000:.0f} ms); load average {out['loadavg_start'][0]:.2f} -> {out['loadavg_end'][0]:.2f}")
    print(f"{'server, window':<14} {'samples':>7} {'p99 bucket':>10} {'interp':>7} {'>5 ms':>6} {'>10 ms':>6} "
          f"{'max bucket':>10} {'status p50/p99/max ms':>22} {'reload p50':>10} {'outside cores':>14}")
    for name, s in out["servers"].items():
        status = f"{s['status_p50_ms']}/{s['status_p99_ms']}/{s['status_max_ms']}"
        cells = [str(s[k]) for k in ("lag_samples", "lag_p99_bucket_ms", "lag_p99_interp_ms", "lag_over_5ms",
                                     "lag_over_10ms", "lag_max_bucket_ms")]
        print(f"{name:<14} {cells[0]:>7} {cells[1]:>10} {cells[2]:>7} {cells[3]:>6} {cells[4]:>6} {cells[5]:>10} "
              f"{status:>22} {str(s['reload_p50_ms'] or '-'):>10} {str(s['outside_cores']):>14}")
        if s["errors"]:
            print(f"  errors: {s['errors'][:3]}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
