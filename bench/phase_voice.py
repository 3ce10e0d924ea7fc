"""Voice phases: voice-to-first-audio turns, real-time STT sessions, idle connections."""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from procs import rss_mb  # noqa: E402
from speech import Client, Streamer  # noqa: E402
from stats import pct, progress, rnd, summary  # noqa: E402
from workload import DROPPED, QUESTIONS, STT_SENTENCES, Plan  # noqa: E402

from local_ai_server.harness import ServerProc as Server  # noqa: E402
from local_ai_server.harness import parse_metrics  # noqa: E402


async def measure_idle_connections(srv: Server, n: int) -> dict[str, Any]:
    """Server RSS before and with `n` idle WebSocket connections open."""
    await asyncio.sleep(1.0)
    before = rss_mb(srv.proc.pid)
    clients: list[Client] = []
    try:
        for i in range(0, n, 20):
            clients += await asyncio.gather(*[Client.connect(srv.url) for _ in range(min(20, n - i))])
        # Every connection is a live session once it answers.
        await asyncio.gather(*[c.request({"type": "status", "request_id": "x"}, "status_response", timeout=30)
                               for c in clients])
        await asyncio.sleep(1.0)
        during = rss_mb(srv.proc.pid)
        st, _ = await clients[0].request({"type": "status", "request_id": "n"}, "status_response")
        sessions = st.get("sessions")
    finally:
        await asyncio.gather(*[c.close() for c in clients], return_exceptions=True)
    per = None if before is None or during is None else (during - before) / n
    return {"rss_mb_before": rnd(before, 2), "rss_mb_with_connections": rnd(during, 2), "connections": n,
            "sessions_reported": sessions, "rss_mb_per_idle_connection": rnd(per, 4)}


async def measure_v2fa(srv: Server, plan: Plan, speech: dict[str, np.ndarray]) -> dict[str, Any]:
    """Voice-to-first-audio over full-mode turns: end of the caller's speech -> first binary audio frame."""
    turns: list[dict[str, Any]] = []
    n_conn = math.ceil(plan.v2fa_turns / plan.turns_per_connection)
    q = 0
    late_frames = 0
    max_late = 0.0
    for conn in range(n_conn):
        call_id = f"v2fa-{conn}"
        c = await Client.connect(srv.url)
        streamer = Streamer(c, seed=conn)
        try:
            await c.request({"type": "set_mode", "mode": "full", "call_id": call_id, "request_id": "m"},
                            "mode_ready", timeout=15)
            streamer.start()
            for _ in range(plan.turns_per_connection):
                if len(turns) >= plan.v2fa_turns:
                    break
                question = QUESTIONS[q % len(QUESTIONS)]
                q += 1
                rec: dict[str, Any] = {"call_id": call_id, "question": question, "ok": False}
                turns.append(rec)
                mark = len(c.items)
                try:
                    t_end = await asyncio.wait_for(streamer.say(speech[question]), 30)
                    _, t_audio, first = await c.wait_item(lambda k, v: k == "bin" or (
                        k == "json" and v.get("type") == "error"), mark, timeout=30)
                    if isinstance(first, dict):  # an error came before any audio
                        raise RuntimeError(f"server error {first.get('code')}: {first.get('message')}")
                    rec["v2fa_ms"] = (t_audio - t_end) * 1000
                    _, _, resp = await c.wait_json(lambda m: m.get("type") == "llm_response", mark,
                                                   timeout=90)
                    rec["answer"] = resp.get("text", "")
                    finals = [v for _, k, v in c.items[mark:] if k == "json" and v.get("type") == "stt_result"
                              and v.get("is_final")]
                    rec["heard"] = finals[0].get("text") if finals else None
                    rec["finals"] = len(finals)
                    rec["audio_frames"] = sum(1 for _, k, _ in c.items[mark:] if k == "bin")
                    rec["ok"] = "v2fa_ms" in rec
                    progress(f"  turn {len(turns):2d}: v2fa {rec['v2fa_ms']:7.1f} ms  heard {rec['heard']!r}")
                except (TimeoutError, ConnectionError, RuntimeError, asyncio.TimeoutError) as exc:
                    rec["error"] = repr(exc)
                    progress(f"  turn {len(turns):2d}: FAILED {exc!r}")
                    if c.closed:
                        break
                await asyncio.sleep(0.2)
        finally:
            await streamer.stop()
            late_frames += streamer.late_frames
            max_late = max(max_late, streamer.max_late_s)
            await c.close()
    await asyncio.sleep(0.3)
    events = srv.log_events()
    # Pair each connection's turns with its turn.done events, in order.
    done_by_call: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    stt_by_call: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        cid = str(e.get("call_id", ""))
        if not cid.startswith("v2fa-"):
            continue
        if e.get("event") == "turn.done" and e.get("kind") == "voice":
            done_by_call[cid].append(e)
        elif e.get("event") == "stt.final":
            stt_by_call[cid].append(e)
    endpoint: list[float] = []
    unpaired = 0
    for cid in {t["call_id"] for t in turns}:
        mine = [t for t in turns if t["call_id"] == cid]
        done = done_by_call.get(cid, [])
        if len(done) == len(mine) and all(t["ok"] for t in mine):
            for t, e in zip(mine, done):
                if e.get("first_audio_ms") is not None:
                    t["server_first_audio_ms"] = e["first_audio_ms"]
                    endpoint.append(t["v2fa_ms"] - e["first_audio_ms"])
        else:
            unpaired += len(mine)
    all_done = [e for v in done_by_call.values() for e in v]
    all_stt = [e for v in stt_by_call.values() for e in v]
    v2fa = [t["v2fa_ms"] for t in turns if t.get("ok")]
    first_audio = [float(e["first_audio_ms"]) for e in all_done if e.get("first_audio_ms") is not None]
    first_token = [float(e["llm_first_token_ms"]) for e in all_done
                   if e.get("llm_first_token_ms") is not None]
    stt = [float(e["stt_ms"]) for e in all_stt if e.get("stt_ms") is not None]
    # Stage deltas per turn: STT done -> first token, first token -> first audio queued.
    ttft = [float(e["llm_first_token_ms"]) - float(e["stt_ms"]) for e in all_done
            if e.get("llm_first_token_ms") is not None and e.get("stt_ms") is not None]
    tts_first = [float(e["first_audio_ms"]) - float(e["llm_first_token_ms"]) for e in all_done
                 if e.get("first_audio_ms") is not None and e.get("llm_first_token_ms") is not None]
    return {
        "turns": len(turns), "ok": len(v2fa), "v2fa": summary(v2fa), "stt_ms": summary(stt),
        "llm_first_token_ms": summary(first_token), "first_audio_ms": summary(first_audio),
        "llm_ttft_after_stt_ms": summary(ttft), "first_token_to_first_audio_ms": summary(tts_first),
        "endpoint_delay_ms": summary(endpoint), "endpoint_delay_pairs": len(endpoint),
        "endpoint_unpaired_turns": unpaired,
        "endpoint_delay_ms_from_p50s": rnd((pct(v2fa, 50) or math.nan) - (pct(first_audio, 50) or math.nan)),
        "client_late_frames": late_frames, "client_max_send_late_ms": rnd(max_late * 1000),
        "samples": [{k: (rnd(v) if isinstance(v, float) else v) for k, v in t.items() if k != "question"}
                    for t in turns],
    }


async def stt_utterances(srv: Server, speech: dict[str, np.ndarray], sentences: list[str],
                         call_id: str) -> dict[str, Any]:
    """Stream utterances in `stt` mode; server stt_ms (stt.final) and client end-of-speech -> final."""
    c = await Client.connect(srv.url)
    streamer = Streamer(c, seed=11)
    client_ms: list[float] = []
    errors: list[str] = []
    try:
        await c.request({"type": "set_mode", "mode": "stt", "call_id": call_id, "request_id": "m"},
                        "mode_ready", timeout=15)
        streamer.start()
        for s in sentences:
            mark = len(c.items)
            try:
                t_end = await asyncio.wait_for(streamer.say(speech[s]), 30)
                _, t_final, _ = await c.wait_json(
                    lambda m: m.get("type") == "stt_result" and bool(m.get("is_final")), mark, timeout=30)
                client_ms.append((t_final - t_end) * 1000)
            except (TimeoutError, ConnectionError, asyncio.TimeoutError) as exc:
                errors.append(repr(exc))
                if c.closed:
                    break
    finally:
        await streamer.stop()
        await c.close()
    await asyncio.sleep(0.3)
    stt = [float(e["stt_ms"]) for e in srv.log_events()
           if e.get("event") == "stt.final" and e.get("call_id") == call_id and e.get("stt_ms") is not None]
    return {"stt_ms": summary(stt), "speech_end_to_final_ms": summary(client_ms), "errors": errors,
            "client_late_frames": streamer.late_frames}


async def stt_session_level(srv: Server, n: int, speech: dict[str, np.ndarray], utterances: int,
                            level_tag: str) -> dict[str, Any]:
    """n concurrent real-time `stt` sessions, staggered; each utterance's end-of-speech -> final latency."""
    dropped_before = parse_metrics(await asyncio.to_thread(srv.metrics)).get(DROPPED, 0.0)
    clients: list[Client] = []
    streamers: list[Streamer] = []
    latencies: list[float] = []
    misses: list[str] = []
    errors: list[str] = []
    stagger_s = 2.0

    async def session(i: int) -> None:
        c, st = clients[i], streamers[i]
        await asyncio.sleep(stagger_s * i / n)
        for u in range(utterances):
            s = STT_SENTENCES[(i + u) % len(STT_SENTENCES)]
            mark = len(c.items)
            t_end = await asyncio.wait_for(st.say(speech[s], lead_s=0.4), 60)
            try:
                _, t_final, m = await c.wait_json(lambda m: m.get("type") in ("stt_result", "error") and (
                    m.get("type") == "error" or bool(m.get("is_final"))), mark, timeout=15)
            except (TimeoutError, ConnectionError) as exc:
                misses.append(f"session {i} utterance {u}: {exc!r}")
                continue
            if m.get("type") == "error":
                errors.append(f"{m.get('code')}: {m.get('message')}")
                continue
            latencies.append((t_final - t_end) * 1000)
            if not str(m.get("text", "")).strip():
                misses.append(f"session {i} utterance {u}: empty final")

    try:
        clients = list(await asyncio.gather(*[Client.connect(srv.url) for _ in range(n)]))
        await asyncio.gather(*[c.request({"type": "set_mode", "mode": "stt", "call_id": f"{level_tag}-{i}",
                                          "request_id": "m"}, "mode_ready", timeout=30)
                               for i, c in enumerate(clients)])
        streamers = [Streamer(c, seed=100 + i) for i, c in enumerate(clients)]
        for s in streamers:
            s.start()
        budget = stagger_s + utterances * 25 + 30
        await asyncio.wait_for(asyncio.gather(*[session(i) for i in range(n)]), budget)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError) as exc:
        misses.append(f"level aborted: {exc!r}")
    finally:
        await asyncio.gather(*[s.stop() for s in streamers], return_exceptions=True)
        for c in clients:
            for _, k, v in c.items:
                if k == "json" and v.get("type") == "error":
                    errors.append(f"{v.get('code')}: {v.get('message')}")
        await asyncio.gather(*[c.close() for c in clients], return_exceptions=True)
    dropped_after = parse_metrics(await asyncio.to_thread(srv.metrics)).get(DROPPED, 0.0)
    dropped = dropped_after - dropped_before
    expected = n * utterances
    slow = [x for x in latencies if x > 1500]
    ok = len(latencies) == expected and not slow and dropped == 0 and not errors and not misses
    return {"sessions": n, "ok": ok, "finals": len(latencies), "expected_finals": expected,
            "latency_ms": summary(latencies), "over_1500ms": len(slow), "dropped_frames": dropped,
            "errors": sorted(set(errors))[:5], "misses": misses[:5],
            "client_max_send_late_ms": rnd(max((s.max_late_s for s in streamers), default=0.0) * 1000),
            "client_late_frames": sum(s.late_frames for s in streamers),
            "client_limited": max((s.max_late_s for s in streamers), default=0.0) > 0.1}


async def measure_stt_sessions(srv: Server, speech: dict[str, np.ndarray], utterances: int,
                               time_budget_s: float = 300) -> dict[str, Any]:
    """Ramp 1, 2, 4, 8, 12, 16, 20, 24, ... until a level fails; then bisect the gap (bounded)."""
    levels = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48]
    results: list[dict[str, Any]] = []
    best = 0
    failed_at: int | None = None
    t0 = time.monotonic()
    for n in levels:
        if time.monotonic() - t0 > time_budget_s:
            break
        progress(f"  stt sessions: {n} concurrent ...")
        r = await stt_session_level(srv, n, speech, utterances, f"sess{n}")
        results.append(r)
        progress(f"    -> ok={r['ok']} finals {r['finals']}/{r['expected_finals']}"
                 f" p95 {r['latency_ms']['p95']} ms"
                 f" max {r['latency_ms']['max']} ms dropped {r['dropped_frames']}")
        await asyncio.sleep(1.0)
        if r["ok"]:
            best = n
        else:
            failed_at = n
            break
    lo, hi = best, failed_at
    steps = 0
    while hi is not None and hi - lo > 1 and steps < 2 and time.monotonic() - t0 < time_budget_s:
        mid = (lo + hi) // 2
        progress(f"  stt sessions (bisect): {mid} concurrent ...")
        r = await stt_session_level(srv, mid, speech, utterances, f"sessb{mid}")
        results.append(r)
        progress(f"    -> ok={r['ok']} p95 {r['latency_ms']['p95']} ms max {r['latency_ms']['max']} ms")
        if r["ok"]:
            lo = best = mid
        else:
            hi = mid
        steps += 1
        await asyncio.sleep(1.0)
    return {"max": best, "first_failure": hi, "levels": results,
            "resolution": None if hi is None else f"max passing {lo}, first failing {hi}"}
