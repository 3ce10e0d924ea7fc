"""The remote backend's decode rate through our server against a client talking straight to the engine.

Both ask the engine (llama-cpp-python's server) for the same long greedy answer with the same sampling and
max tokens: our server as a streamed `llm_request` over AVA's protocol (its rate from the `llm_token`
messages, as bench/run.py measures the local pool), the direct client as the openai SDK's streamed chat
completion (its rate from the chunks). Runs alternate which side goes first (the second of two back-to-back
generations is slower on these VMs); the figure is the median of the per-pair ratios.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from phase_llm import server_decode_rate, wait_pool_idle  # noqa: E402
from procs import CLEAN_EXTERNAL_CORES, with_cpu_share  # noqa: E402
from stats import pct, progress, rnd  # noqa: E402
from workload import LONG_ENV, LONG_SYSTEM, PAIR_REST_S  # noqa: E402

from local_ai_server.harness import ServerProc  # noqa: E402

GOAL_RATIO = 0.95
# Not workload.LONG_PROMPT: our server sends no repeat_penalty when it is the neutral 1.0 (the OpenAI API has
# none), so llama-cpp-python's server applies its own default, 1.1, under which SmolLM2 stops "hello" after
# ~8 tokens. This prompt runs past 600 tokens at temperature 0 with that penalty; both sides get it.
STORY_PROMPT = "Write a very long story about a dragon and a knight."


async def direct_decode_rate(url: str, model: str, cap: int, sampling: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s straight from the engine: one streamed chat completion, first to last chunk, `cap` tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    times: list[float] = []
    try:
        # What our server sends for this answer (llm_remote._open): the same body, so the same work.
        messages: Any = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": STORY_PROMPT}]
        stream = await client.chat.completions.create(
            model=model, messages=messages,
            stream=True, max_tokens=int(sampling["max_tokens"]), temperature=float(sampling["temperature"]),
            top_p=float(sampling["top_p"]), stream_options={"include_usage": True})
        async with stream:  # leaving it closes the response: the engine stops at its next token
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter())
                    if len(times) >= cap:
                        break
    finally:
        await client.close()
    n = len(times)
    rate = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None
    return {"tokens": n, "tok_s": rnd(rate, 2), "seconds": rnd(times[-1] - times[0] if n > 1 else None, 2)}


# For the server of the decode pairs: no health probe after the first. llama-cpp-python's server answers
# GET /models only between generations, so a probe during the direct client's generation times out (5 s) and
# our server would call the engine down and refuse the next run with not_ready.
DECODE_SERVER_ENV = {**LONG_ENV, "LOCAL_LLM_REMOTE_PROBE_S": "3600"}


async def remote_decode_pairs(srv: ServerProc, engine_url: str, model: str, engine_pid: int | None, threads: int,
                              pairs: int, cap: int, top_p: float) -> dict[str, Any]:
    """`pairs` alternating runs (direct first in even pairs); `srv` runs with DECODE_SERVER_ENV."""
    server_url = srv.url
    sampling = {"max_tokens": LONG_ENV["LOCAL_LLM_MAX_TOKENS"], "temperature": LONG_ENV["LOCAL_LLM_TEMPERATURE"],
                "top_p": top_p}
    runs: list[dict[str, Any]] = []

    async def direct() -> dict[str, Any]:
        await wait_pool_idle(server_url)  # our server's last answer has let go of the engine
        await asyncio.sleep(PAIR_REST_S)
        return await with_cpu_share(engine_pid, threads, direct_decode_rate(engine_url, model, cap, sampling))

    async def ours(i: int) -> dict[str, Any]:
        await asyncio.to_thread(srv.wait_ready, 60)  # the backend is up as our server sees it
        await wait_pool_idle(server_url)
        await asyncio.sleep(PAIR_REST_S)
        run = server_decode_rate(server_url, cap, f"remote-{i}", STORY_PROMPT)
        return await with_cpu_share(engine_pid, threads, run)

    for i in range(pairs):
        if i % 2 == 0:
            d = await direct()
            s = await ours(i)
        else:
            s = await ours(i)
            d = await direct()
        ratio = s["tok_s"] / d["tok_s"] if s.get("tok_s") and d.get("tok_s") else None
        runs.append({"direct": d, "server": s, "ratio": rnd(ratio, 3), "direct_first": i % 2 == 0})
        progress(f"  pair {i + 1}: direct {d.get('tok_s')} tok/s, through our server {s.get('tok_s')} tok/s "
                 f"(ratio {rnd(ratio, 3)}; outside load {d.get('external_cores')}/{s.get('external_cores')} cores)"
                 + (f" ({s['error']})" if s.get("error") else ""))
    # As bench/run.py: the medians are over the pairs no outside work competed with, if there are any.
    for r in runs:
        r["clean"] = r["ratio"] is not None and max(r["direct"].get("external_cores") or 0.0, r["server"].get(
            "external_cores") or 0.0) < CLEAN_EXTERNAL_CORES
    use = [r for r in runs if r["clean"]] or runs
    median = pct([r["ratio"] for r in use], 50)
    return {"pairs": pairs, "token_cap": cap, "goal": f">= {GOAL_RATIO}", "ratio": rnd(median, 3),
            "ratio_from": f"{len(use)} clean pair(s)" if use is not runs else "all pairs (none clean: the machine "
                          "was busy)" if runs else "no pair",
            "short_runs": sum(1 for r in runs for side in ("direct", "server") if (r[side].get("tokens") or 0) < cap),
            "server_tok_s": rnd(pct([r["server"].get("tok_s") for r in use], 50), 2),
            "direct_tok_s": rnd(pct([r["direct"].get("tok_s") for r in use], 50), 2),
            "goal_met": None if median is None else median >= GOAL_RATIO, "runs": runs,
            "method": "median of per-pair ratios; our side: llm_request stream tokens/s at the WebSocket client, "
                      "direct: openai SDK chunks/s; same prompt, sampling and max_tokens"}
