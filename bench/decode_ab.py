"""Decode rate of this tree's server against bare llama-cpp-python and, optionally, another checkout's server.

Usage: .venv/bin/python bench/decode_ab.py [--rounds 9] [--against /path/to/other/checkout]

Each round runs one 800-token generation on every side, in an order that rotates from round to round
(on a drifting VM the position in a round matters more than the code). Prints every round and the
median and mean of the per-round ratios. `--against` is for telling a regression from noise: check
out the older commit with `git worktree add /tmp/old <commit>`; its server runs on this tree's models
and virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402 - the benchmark's own server processes
from phase_llm import BareLlm, bare_decode_run, server_decode_run  # noqa: E402
from speech import Client  # noqa: E402
from workload import LONG_ENV  # noqa: E402

from local_ai_server.harness import ServerProc  # noqa: E402

TOKENS = 800


def start_other(root: Path, tmp: Path) -> ServerProc:
    """Start the server of another checkout (its code, this tree's models)."""
    own = procs.ROOT
    procs.ROOT = root  # start_server runs `python -m local_ai_server` from ROOT
    try:
        return procs.start_server("other", tmp, {**LONG_ENV, "LOCAL_MODELS_DIR": str(own / "models")})
    finally:
        procs.ROOT = own


def server_side(srv: ServerProc, threads: int, tag: str) -> Callable[[int], Awaitable[dict[str, Any]]]:
    """One generation through `srv`, timed from the client as bench/run.py does."""
    async def go(i: int) -> dict[str, Any]:
        return await server_decode_run(srv.url, threads, TOKENS, f"{tag}{i}")
    return go


async def main_async(rounds: int, against: Path | None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="decode-ab-"))
    this = await asyncio.to_thread(procs.start_server, "this", tmp, LONG_ENV)
    other = await asyncio.to_thread(start_other, against, tmp) if against is not None else None
    bare: BareLlm | None = None
    try:
        c = await Client.connect(this.url)
        status, _ = await c.request({"type": "status", "request_id": "st"}, "status_response")
        await c.close()
        llm = status["models"]["llm"]
        threads = int(llm["config"]["threads"])
        bare = BareLlm(str(llm["path"]), threads, int(llm["config"].get("batch") or 256), TOKENS,
                             llm["config"])
        await bare.start()

        async def bare_side(_i: int) -> dict[str, Any]:
            assert bare is not None
            return await bare_decode_run(bare, threads)

        sides: list[tuple[str, Callable[[int], Awaitable[dict[str, Any]]]]] = [
            ("bare", bare_side), ("this", server_side(this, threads, "t"))]
        if other is not None:
            sides.append(("other", server_side(other, threads, "o")))
        ratios: dict[str, list[float]] = {}
        for i in range(rounds):
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            raw = {name: (await fn(i)).get("tok_s") for name, fn in order}
            if not all(raw.values()):
                print(f"round {i + 1}: a side produced no rate {raw}", flush=True)
                continue
            rate = {name: float(v or 0.0) for name, v in raw.items()}
            pairs = {"this/bare": rate["this"] / rate["bare"]}
            if other is not None:
                pairs["other/bare"] = rate["other"] / rate["bare"]
                pairs["this/other"] = rate["this"] / rate["other"]
            for k, v in pairs.items():
                ratios.setdefault(k, []).append(v)
            print(f"round {i + 1} ({' -> '.join(n for n, _ in order)}): "
                  + ", ".join(f"{n} {r} tok/s" for n, r in rate.items()) + "; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in pairs.items()), flush=True)
        for k, vs in ratios.items():
            print(f"{k}: median {statistics.median(vs):.3f}, mean {statistics.mean(vs):.3f}, "
                  f"range {min(vs):.3f}-{max(vs):.3f} ({len(vs)} rounds)")
        return 0 if ratios else 1
    finally:
        if bare is not None:
            await bare.close()
        for srv in (this, other):
            if srv is not None:
                await asyncio.to_thread(srv.stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--against", type=Path, default=None, help="another checkout whose server to compare")
    args = ap.parse_args(argv)
    if args.against is not None and not (args.against / "local_ai_server").is_dir():
        ap.error(f"{args.against} is not a checkout of local-ai-server")
    return asyncio.run(main_async(args.rounds, args.against))


if __name__ == "__main__":
    sys.exit(main())
