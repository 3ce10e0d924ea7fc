"""Soak benchmark: N sessions doing full voice turns for a while; reports RSS and file-descriptor growth.

    python bench/soak.py [--minutes 30] [--sessions 10] [--warmup-s 150] [--settle-s 35] [--no-fill] [--json]

Each session streams real-time 20 ms frames of line noise, says a question (Piper speech) and waits for
the answer's `llm_response`, again and again, on one connection; every few turns it reconnects (a new
call), so connection set-up and tear-down are soaked too.

Memory and descriptors of the server (main process plus LLM workers) are compared at rest: after the
warm-up every caller hangs up and the server is left idle for `--settle-s` (longer than its 30 s
malloc_trim cycle), then sampled; after the soak, the same again. What the idle server holds after the
soak and did not hold before is what leaked; the figures sampled while calls run (which swing with the
work in flight and the freed memory not yet trimmed) are reported as the peak. Before the warm-up, one
request per LLM worker nearly fills its context window, so the buffers a worker allocated for its whole
context are resident before the first sample (see `fill_llm_context`). Goals: RSS growth < 5 %, no
descriptor growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs  # noqa: E402  (the benchmark's server processes)
from speech import Client, Streamer, synthesize  # noqa: E402  (its client and speech)
from workload import QUESTIONS  # noqa: E402

from local_ai_server import harness  # noqa: E402

TURNS_PER_CALL = 4


def fd_count(pid: int) -> int | None:
    """Open file descriptors of `pid`."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sample(srv: harness.ServerProc) -> dict[str, Any]:
    """RSS (MB) and descriptors of the server and its LLM workers now."""
    pids = [srv.proc.pid, *harness.descendants(srv.proc.pid)]
    rss = {pid: procs.rss_mb(pid) for pid in pids}
    fds = {pid: fd_count(pid) for pid in pids}
    return {
        "rss_mb_main": rss[srv.proc.pid],
        "rss_mb_total": round(sum(v for v in rss.values() if v), 1),
        "fds_main": fds[srv.proc.pid],
        "fds_total": sum(v for v in fds.values() if v),
        "processes": len(pids),
    }


async def caller(srv: harness.ServerProc, idx: int, speech: dict[str, Any], deadline: float,
                 stats: dict[str, Any]) -> None:
    """One session: calls of TURNS_PER_CALL turns each, until the deadline."""
    rng = random.Random(idx)
    call = 0
    while time.monotonic() < deadline:
        call += 1
        client = await Client.connect(srv.url)
        streamer = Streamer(client, seed=idx)
        try:
            call_id = f"soak-{idx}-{call}"
            await client.request({"type": "set_mode", "mode": "full", "call_id": call_id}, "mode_ready")
            streamer.start()
            for _ in range(TURNS_PER_CALL):
                if time.monotonic() >= deadline:
                    break
                start = len(client.items)
                await streamer.say(speech[rng.choice(QUESTIONS)])
                try:
                    await client.wait_json(lambda m: m.get("type") in ("llm_response", "error"), start,
                                           timeout=120)
                    stats["turns"] += 1
                except (TimeoutError, ConnectionError) as exc:
                    stats["errors"].append(f"{call_id}: {exc}")
                errors = [m for _, kind, m in client.items[start:] if kind == "json" and m.get("type") == "error"]
                stats["error_replies"] += len(errors)
                client.trim()
        finally:
            await streamer.stop()
            await client.close()
        stats["calls"] += 1


async def fill_llm_context(srv: harness.ServerProc) -> dict[str, Any]:
    """One request per LLM worker that nearly fills its context window; returns what was sent and answered.

    A worker allocates its KV cache and attention buffers for the whole context at load, but their pages
    become resident only as far as the longest conversation so far has reached, and stay (in-process:
    RSS 136 -> 166 MB as prompts grow to 1200 words, not a byte back for shorter ones). Without this, the
    first long conversation after the warm-up reads as growth; with it, growth at rest is what leaked.
    """
    client = await Client.connect(srv.url)
    try:
        status, _ = await client.request({"type": "status"}, "status_response")
        llm = status["models"]["llm"]["config"]
        workers = int(status["config"]["llm_workers"])
        # "apple banana " is two tokens for the embedded model's tokenizer; aim at 80 % of the window and
        # come down if the server says the prompt does not fit.
        pairs = int((llm["context"] - llm["max_tokens"]) * 0.8 / 2)
        for attempt in range(6):
            start = len(client.items)
            ids = [f"fill-{attempt}-{w}" for w in range(workers)]
            for rid in ids:
                await client.send({"type": "llm_request", "request_id": rid, "text": "Say OK.", "context": [
                    {"role": "user", "content": "apple banana " * pairs}, {"role": "assistant", "content": "OK."}]})
            replies = []
            for rid in ids:

                def answered(m: dict[str, Any], rid: str = rid) -> bool:
                    return m.get("request_id") == rid and m.get("type") in ("llm_response", "error")

                _, _, reply = await client.wait_json(answered, start, timeout=300)
                replies.append(reply)
            if all(r["type"] == "llm_response" for r in replies):
                return {"tokens_sent": pairs * 2, "workers": workers, "attempts": attempt + 1}
            pairs = int(pairs * 0.8)
        return {"tokens_sent": None, "workers": workers, "attempts": 6, "error": replies[0].get("message")}
    finally:
        await client.close()


async def soak(minutes: float, sessions: int, warmup_s: float, tmp: Path, settle_s: float,
               fill_context: bool = True) -> dict[str, Any]:
    """Run the soak and return its figures."""
    speech = synthesize(list(QUESTIONS))
    srv = procs.start_server("soak", tmp)
    stats: dict[str, Any] = {"turns": 0, "calls": 0, "errors": [], "error_replies": 0}
    samples: list[dict[str, Any]] = []

    async def calls_until(deadline: float) -> None:
        """Every session calls until the deadline; sample every 30 s meanwhile; wait until all hung up."""
        tasks = [asyncio.ensure_future(caller(srv, i, speech, deadline, stats)) for i in range(sessions)]
        while time.monotonic() < deadline:
            await asyncio.sleep(min(30.0, max(0.1, deadline - time.monotonic())))
            samples.append(sample(srv))
        await asyncio.gather(*tasks, return_exceptions=True)

    fill: dict[str, Any] | None = None
    try:
        if fill_context:
            fill = await fill_llm_context(srv)
        await calls_until(time.monotonic() + warmup_s)
        await asyncio.sleep(settle_s)
        start = sample(srv)
        turns_at_start = stats["turns"]
        samples.clear()
        await calls_until(time.monotonic() + minutes * 60)
        # Every session has hung up and the server has trimmed its heap: what it still holds leaked.
        await asyncio.sleep(settle_s)
        end = sample(srv)
    finally:
        code = srv.stop(20, reap=True)
    rss_growth = (end["rss_mb_total"] - start["rss_mb_total"]) / start["rss_mb_total"] * 100
    return {
        "minutes": minutes,
        "sessions": sessions,
        "warmup_s": warmup_s,
        "turns": stats["turns"],
        "turns_measured": stats["turns"] - turns_at_start,
        "calls": stats["calls"],
        "errors": stats["errors"][:20],
        "error_replies": stats["error_replies"],
        "start": start,
        "end": end,
        "rss_growth_pct": round(rss_growth, 2),
        "fd_growth": end["fds_total"] - start["fds_total"],
        "settle_s": settle_s,
        "llm_context_fill": fill,
        "rss_mb_peak_under_load": max((s["rss_mb_total"] for s in samples), default=None),
        "rss_mb_samples": [s["rss_mb_total"] for s in samples],
        "rss_mb_samples_main": [round(s["rss_mb_main"], 1) for s in samples],
        "server_exit_code": code,
        "goals": {"rss_growth_pct": "< 5", "fd_growth": "<= 0"},
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--warmup-s", type=float, default=150.0,
                   help="calls before the first sample: long enough for every session to finish a call")
    p.add_argument("--settle-s", type=float, default=35.0,
                   help="idle time before each memory sample (longer than the server's 30 s trim cycle)")
    p.add_argument("--no-fill", action="store_true",
                   help="skip the near-full-context request before the warm-up (see fill_llm_context)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="las-soak-") as tmp:
        res = asyncio.run(soak(args.minutes, args.sessions, args.warmup_s, Path(tmp), args.settle_s,
                               fill_context=not args.no_fill))
    print(f"soak: {res['sessions']} sessions x {res['minutes']} min: {res['turns_measured']} turns measured "
          f"({res['turns']} total, {res['calls']} calls), {len(res['errors'])} failed turns, "
          f"{res['error_replies']} error replies")
    print(f"  RSS at rest (server + workers) {res['start']['rss_mb_total']} -> {res['end']['rss_mb_total']} MB "
          f"({res['rss_growth_pct']:+.2f} %, goal < 5 %); peak under load {res['rss_mb_peak_under_load']} MB")
    start, end = res["start"], res["end"]
    print(f"  main process {start['rss_mb_main']:.1f} -> {end['rss_mb_main']:.1f} MB, LLM workers (and "
          f"multiprocessing's resource tracker) {start['rss_mb_total'] - start['rss_mb_main']:.1f} -> "
          f"{end['rss_mb_total'] - end['rss_mb_main']:.1f} MB; context fill: {res['llm_context_fill']}")
    print(f"  file descriptors {res['start']['fds_total']} -> {res['end']['fds_total']} "
          f"({res['fd_growth']:+d}, goal <= 0)")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
