"""Time to first audio through the Realtime front vs the AVA front: one server, the same questions, one run.

Usage::

    .venv/bin/python bench/realtime_ab.py [--turns 10] [--out bench/results/realtime-ab.json] [--no-speculate]

One real server (local_ai_server.harness, default settings) and two connections that stream at real-time
pace in 20 ms frames all along, line noise between questions, as phone lines do: an AVA connection in
`full` mode (16 kHz PCM16 binary frames) and a Realtime connection (`server_vad` with `create_response`,
24 kHz `audio/pcm` input, `audio/pcmu` output: the same 8 kHz mu-law as AVA's default). The same questions,
spoken by the installed Piper voice (bench/speech.py), are asked on each in turn, alternating which front
goes first in each pair so drift over the run falls on both. Per turn the client measures from the send of
the last speech frame to the first audio: AVA's first binary `tts_audio` frame, Realtime's first
`response.output_audio.delta`. It also measures the arrival of the final transcript on each, so a gap can
be told apart: before the transcript (segmentation, STT) or after it (the answer).

Prints p50/p95 per front and the ratio realtime/ava of the p50s against the goal (<= 1.05); writes the
JSON to --out. `--no-speculate` runs the server with LOCAL_LLM_SPECULATE=0, so both fronts answer only
after the final transcript (by default both start early, held): the two runs show what early answers are
worth. The figures are only as quiet as the machine: `external_cores` says how busy the rest of it was.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402 - the benchmark's own server processes
from speech import Client, Streamer, synthesize  # noqa: E402
from stats import progress, rnd, summary  # noqa: E402
from workload import QUESTIONS, RATE  # noqa: E402

from local_ai_server.audio import resample  # noqa: E402
from local_ai_server.harness import ServerProc  # noqa: E402

GOAL_RATIO = 1.05
RT_RATE = 24000
TURN_TIMEOUT_S = 60
DEFAULT_OUT = procs.ROOT / "bench" / "results" / "realtime-ab.json"
Turn = Callable[[int], Awaitable[dict[str, Any]]]


def appender(client: Client) -> Callable[[bytes], Awaitable[None]]:
    """A 20 ms PCM16 frame as Realtime's `input_audio_buffer.append`."""
    async def send(frame: bytes) -> None:
        await client.ws.send(json.dumps({"type": "input_audio_buffer.append",
                                         "audio": base64.b64encode(frame).decode("ascii")}))
    return send


async def ava_turn(c: Client, streamer: Streamer, audio: Any) -> dict[str, Any]:
    """One question on the AVA connection: end of speech -> first binary audio frame."""
    mark = len(c.items)
    t_end = await asyncio.wait_for(streamer.say(audio), 30)
    _, t_final, final = await c.wait_json(lambda m: m.get("type") == "error" or (
        m.get("type") == "stt_result" and bool(m.get("is_final"))), mark, TURN_TIMEOUT_S)
    _, t_audio, first = await c.wait_item(lambda k, v: k == "bin" or (k == "json" and v.get("type") == "error"),
                                          mark, TURN_TIMEOUT_S)
    if isinstance(first, dict) or final.get("type") == "error":
        raise RuntimeError(f"server error: {first if isinstance(first, dict) else final}")
    _, _, answer = await c.wait_json(lambda m: m.get("type") == "llm_response", mark, TURN_TIMEOUT_S)
    return {"first_audio_ms": (t_audio - t_end) * 1000, "final_ms": (t_final - t_end) * 1000,
            "heard": final.get("text"), "answer": answer.get("text", "")}


async def realtime_turn(c: Client, streamer: Streamer, audio: Any) -> dict[str, Any]:
    """One question on the Realtime connection: end of speech -> first response.output_audio.delta."""
    mark = len(c.items)
    t_end = await asyncio.wait_for(streamer.say(audio), 30)
    _, t_final, final = await c.wait_json(lambda m: m.get("type") in (
        "error", "conversation.item.input_audio_transcription.completed"), mark, TURN_TIMEOUT_S)
    _, t_audio, first = await c.wait_json(lambda m: m.get("type") in ("error", "response.output_audio.delta"),
                                          mark, TURN_TIMEOUT_S)
    if first.get("type") == "error" or final.get("type") == "error":
        raise RuntimeError(f"server error: {first if first.get('type') == 'error' else final}")
    _, _, done = await c.wait_json(lambda m: m.get("type") == "response.done", mark, TURN_TIMEOUT_S)
    output = done["response"].get("output") or [{}]
    content = (output[0].get("content") or [{}])[0]
    return {"first_audio_ms": (t_audio - t_end) * 1000, "final_ms": (t_final - t_end) * 1000,
            "heard": final.get("transcript"), "answer": content.get("transcript", ""),
            "status": done["response"].get("status")}


async def open_realtime(srv: ServerProc) -> Client:
    """A Realtime connection set up as the AVA one is: server_vad, mu-law 8 kHz out."""
    c = await Client.connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
    await c.wait_json(lambda m: m.get("type") == "session.created", 0, 30)
    await c.request({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcm"}, "turn_detection": {"type": "server_vad"}},
        "output": {"format": {"type": "audio/pcmu"}}}}}, "session.updated", timeout=30)
    return c


def speculation_of(srv: ServerProc) -> dict[str, Any]:
    """How the server's turns went, from its logs: AVA's early answers, and each front's server-side figures."""
    events = [e for e in srv.log_events() if e.get("event") == "turn.done" and e.get("kind") in ("voice", "realtime")]
    out: dict[str, Any] = {}
    for kind, front in (("voice", "ava"), ("realtime", "realtime")):
        mine = [e for e in events if e.get("kind") == kind]
        out[front] = {"turns": len(mine), "speculative_turns": sum(1 for e in mine if e.get("speculative")),
                      "server_llm_first_token_ms": summary([float(e["llm_first_token_ms"]) for e in mine
                                                            if e.get("llm_first_token_ms") is not None]),
                      "server_first_audio_ms": summary([float(e["first_audio_ms"]) for e in mine
                                                        if e.get("first_audio_ms") is not None])}
    return out


async def run(turns: int, speculate: bool) -> dict[str, Any]:
    """The whole A/B: server, connections, warm-up, `turns` questions per front, alternating."""
    progress("synthesizing the questions with the installed voice")
    speech = await asyncio.to_thread(synthesize, QUESTIONS)
    speech24 = {q: resample(x, RATE, RT_RATE) for q, x in speech.items()}
    tmp = Path(tempfile.mkdtemp(prefix="realtime-ab-"))
    env = {} if speculate else {"LOCAL_LLM_SPECULATE": "0"}
    srv = await asyncio.to_thread(procs.start_server, "ab", tmp, env)
    res: dict[str, Any] = {"turns_per_front": turns, "goal_ratio": GOAL_RATIO, "errors": [],
                           "speculation": {"ava": "on (LOCAL_LLM_SPECULATE)" if speculate else "off",
                                           "realtime": "on (LOCAL_LLM_SPECULATE)" if speculate else "off"}}
    ava = None
    live: dict[str, Any] = {}
    streams: list[Streamer] = []
    try:
        ava = await Client.connect(srv.url)
        await ava.request({"type": "set_mode", "mode": "full", "call_id": "ab-ava", "request_id": "m"},
                          "mode_ready", timeout=30)
        ava_stream = Streamer(ava, seed=1)
        ava_stream.start()
        streams = [ava_stream]
        a = ava
        # Every question starts a fresh conversation on both fronts: with one LLM worker, a history (and a KV
        # cache) carried from turn to turn would make each answer's prefill depend on which front spoke last.

        async def fresh_realtime() -> tuple[Client, Streamer]:
            if "rt" in live:
                await live["stream"].stop()
                await live["rt"].close()
            live["rt"] = await open_realtime(srv)
            live["stream"] = Streamer(live["rt"], seed=2, rate=RT_RATE, send=appender(live["rt"]))
            live["stream"].start()
            return live["rt"], live["stream"]

        async def ava_fresh(q: int) -> dict[str, Any]:
            await a.request({"type": "set_mode", "mode": "full", "call_id": f"ab-ava-{q}-{time.monotonic_ns()}",
                             "request_id": "m"}, "mode_ready", timeout=30)
            return await ava_turn(a, ava_stream, speech[QUESTIONS[q % len(QUESTIONS)]])

        async def realtime_fresh(q: int) -> dict[str, Any]:
            r, stream = await fresh_realtime()
            return await realtime_turn(r, stream, speech24[QUESTIONS[q % len(QUESTIONS)]])

        fronts: dict[str, Turn] = {"ava": ava_fresh, "realtime": realtime_fresh}
        records: dict[str, list[dict[str, Any]]] = {"ava": [], "realtime": []}
        sys0, own0, t0 = procs.system_busy_seconds(), procs.own_tree_seconds(), time.perf_counter()
        for i in range(-1, turns):  # turn -1 warms both up (first STT, first answer) and is not counted
            order = ["ava", "realtime"] if i % 2 == 0 else ["realtime", "ava"]
            for name in order:
                try:
                    rec = await fronts[name](max(i, 0))
                except (TimeoutError, ConnectionError, RuntimeError, asyncio.TimeoutError) as exc:
                    res["errors"].append(f"{name} turn {i}: {exc!r}")
                    progress(f"  {name:8s} turn {i:2d}: FAILED {exc!r}")
                    continue
                progress(f"  {name:8s} turn {i:2d}: first audio {rec['first_audio_ms']:7.1f} ms, final transcript "
                         f"{rec['final_ms']:6.1f} ms, heard {rec['heard']!r}")
                if i >= 0:
                    records[name].append({"turn": i, **rec})
                await asyncio.sleep(0.3)
        wall = time.perf_counter() - t0
        sys1, own1 = procs.system_busy_seconds(), procs.own_tree_seconds()
        own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
        res["external_cores"] = (rnd(max(0.0, (sys1 - sys0 - own) / wall), 2)
                                 if sys0 is not None and sys1 is not None else None)
        for name, recs in records.items():
            res[name] = {"first_audio_ms": summary([x["first_audio_ms"] for x in recs]),
                         "final_transcript_ms": summary([x["final_ms"] for x in recs]), "turns": recs}
        ava_p50, rt_p50 = res["ava"]["first_audio_ms"]["p50"], res["realtime"]["first_audio_ms"]["p50"]
        res["ratio_p50"] = rnd(rt_p50 / ava_p50, 3) if ava_p50 and rt_p50 else None
        ava_p95, rt_p95 = res["ava"]["first_audio_ms"]["p95"], res["realtime"]["first_audio_ms"]["p95"]
        res["ratio_p95"] = rnd(rt_p95 / ava_p95, 3) if ava_p95 and rt_p95 else None
        res["goal_met"] = res["ratio_p50"] is not None and res["ratio_p50"] <= GOAL_RATIO
        # The same question on both fronts, asked back to back: its ratio is less at the mercy of drift.
        ava_by_turn = {x["turn"]: x["first_audio_ms"] for x in records["ava"]}
        paired = sorted(x["first_audio_ms"] / ava_by_turn[x["turn"]] for x in records["realtime"]
                        if ava_by_turn.get(x["turn"]))
        res["paired_ratio"] = summary(paired, 3)
    finally:
        for s in [*streams, *([live["stream"]] if "stream" in live else [])]:
            await s.stop()
        for c in (ava, live.get("rt")):
            if c is not None:
                await c.close()
        await asyncio.sleep(0.3)
        res["server"] = speculation_of(srv)
        await asyncio.to_thread(srv.stop)
    return res


def report(res: dict[str, Any]) -> str:
    """The figures as a short table."""
    lines = [f"time to first audio, end of speech -> first audio, {res['turns_per_front']} turns per front"]
    for name in ("ava", "realtime"):
        fig = res.get(name, {})
        fa, fin = fig.get("first_audio_ms", {}), fig.get("final_transcript_ms", {})
        lines.append(f"  {name:8s} first audio p50 {fa.get('p50')} ms, p95 {fa.get('p95')} ms"
                     f"   (final transcript p50 {fin.get('p50')} ms)   speculation: {res['speculation'][name]}")
    verdict = "met" if res.get("goal_met") else "NOT met"
    lines.append(f"  ratio realtime/ava: p50 {res.get('ratio_p50')}, p95 {res.get('ratio_p95')}"
                 f"  (goal p50 <= {GOAL_RATIO}: {verdict}); per question, median "
                 f"{res.get('paired_ratio', {}).get('p50')}")
    server = res.get("server", {})
    early = ", ".join(f"{f} {server.get(f, {}).get('speculative_turns')} of {server.get(f, {}).get('turns')}"
                      for f in ("ava", "realtime"))
    lines.append(f"  early answers confirmed: {early} turns; outside load {res.get('external_cores')} cores")
    if res.get("errors"):
        lines.append(f"  errors: {res['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=10, help="questions per front (after one warm-up each)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")
    ap.add_argument("--no-speculate", action="store_true", help="LOCAL_LLM_SPECULATE=0 (AVA answers late too)")
    args = ap.parse_args(argv)
    try:
        res = asyncio.run(run(max(1, args.turns), not args.no_speculate))
    finally:
        procs.stop_all_servers()
    print(report(res), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
