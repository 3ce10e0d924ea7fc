"""Turn detection on an evaluation set with pauses: `vad` against `smart` at the same settings, on the real server.

Usage::

    .venv/bin/python bench/turn_eval.py [--modes vad,smart] [--repeats 2] [--silence-ms 500] [--late-ms 900]
                                        [--call-mode full|stt] [--seed 1] [--json] [--out FILE]

The set is synthesized at run time with the embedded Piper voice (nothing recorded is shipped):
- `question`: a question spoken whole;
- `paused`: the same question with a 400-800 ms pause in the middle (the whole recording cut where a
  prefix of it ends, so the first part keeps the prosody of speech that goes on, line noise in the gap,
  then the rest of the recording);
- `statement`: a statement spoken whole;
- `um`: a statement that stops on a filler ("..., um") for 400-800 ms, then goes on.

One caller per mode streams every clip in real time (20 ms PCM16 frames, line noise between clips) over
AVA's protocol in `full` mode, `set_mode` choosing `turn_detection` (same `segment_silence_ms` for both;
`smart` with the server's default short pause, threshold and long wait), and waits for the answer. Per
clip: a **false endpoint** is a final transcript that arrives before the caller has finished speaking (the
server cut the utterance in the pause); the **endpoint delay** is the end of speech -> the final
transcript of the whole utterance; a **late endpoint** is one slower than --late-ms; **first audio** is the
end of speech -> the first audio of the answer. With `--call-mode stt` the server only transcribes (no
LLM, no TTS): the turn detection itself, cheaply, and no first audio. It measures and reports; it never
fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import procs  # noqa: E402
from report import json_safe, machine_info  # noqa: E402
from speech import Client, Streamer, noise, synthesize  # noqa: E402
from stats import progress, summary  # noqa: E402
from workload import RATE  # noqa: E402

# (whole question, the prefix after which a speaker might pause)
QUESTIONS = (
    ("What time do you open tomorrow morning?", "What time do you"),
    ("What is the weather like in Paris today?", "What is the weather like in"),
    ("Can you book a table for two at seven tonight?", "Can you book a table for"),
    ("How far is the nearest train station from here?", "How far is the nearest"),
    ("Do you have any vegetarian dishes on the menu?", "Do you have any"),
    ("How much does a large pizza cost with delivery?", "How much does a large"),
)
STATEMENTS = (
    "I would like to cancel my order from last week.",
    "Please turn off the lights in the kitchen.",
    "My account number is four five six seven.",
    "I want to speak with a manager please.",
)
# (the part before the filler, the rest)
UMS = (
    ("I would like to order, um,", "a large pizza with mushrooms."),
    ("My address is, um,", "twelve Baker Street."),
    ("Can you tell me, um,", "when the store closes tonight?"),
    ("I need to change, um,", "my delivery address please."),
)
PAUSE_MS = (400, 800)
WAIT_ANSWER_S = 60.0


@dataclass(frozen=True)
class Clip:
    """One utterance of the set: its audio, and where the speaker paused (samples), if anywhere."""

    kind: str
    text: str
    audio: np.ndarray
    pause_at: int | None  # sample index where the pause starts
    pause_ms: int


def build_set(seed: int) -> list[Clip]:
    """Synthesize the evaluation set (Piper, 16 kHz float32, silence trimmed)."""
    rng = random.Random(seed)
    texts = [q for q, _ in QUESTIONS] + [p for _, p in QUESTIONS] + list(STATEMENTS)
    texts += [a for a, _ in UMS] + [b for _, b in UMS]
    speech = synthesize(texts)
    clips = []
    for q, prefix in QUESTIONS:
        clips.append(Clip("question", q, speech[q], None, 0))
        # The whole recording cut where the prefix, spoken alone, ends: the first part keeps the prosody of
        # speech that goes on. The cut is moved to the quietest 20 ms nearby so it falls between words.
        cut = _quiet_point(speech[q], speech[prefix].size)
        ms = rng.randint(*PAUSE_MS)
        gap = noise(RATE * ms // 1000, rng.randint(0, 9999))
        clips.append(Clip("paused", q, np.concatenate([speech[q][:cut], gap, speech[q][cut:]]), cut, ms))
    for s in STATEMENTS:
        clips.append(Clip("statement", s, speech[s], None, 0))
    for a, b in UMS:
        ms = rng.randint(*PAUSE_MS)
        gap = noise(RATE * ms // 1000, rng.randint(0, 9999))
        clips.append(Clip("um", f"{a} {b}", np.concatenate([speech[a], gap, speech[b]]), speech[a].size, ms))
    return clips


def _quiet_point(x: np.ndarray, near: int, span: int = RATE // 10) -> int:
    """The start of the quietest 20 ms window within `span` samples of `near`."""
    win = RATE // 50
    best, best_rms = near, float("inf")
    for start in range(max(0, near - span), min(x.size - win, near + span), win // 2):
        rms = float(np.sqrt(np.mean(x[start:start + win] ** 2)))
        if rms < best_rms:
            best, best_rms = start, rms
    return best


async def run_mode(url: str, mode: str, clips: list[Clip], repeats: int, silence_ms: int,
                   call_mode: str = "full") -> list[dict[str, Any]]:
    """Stream every clip `repeats` times on one call with `turn_detection=mode`; one record per clip."""
    c = await Client.connect(url)
    streamer = Streamer(c, seed=3)
    records: list[dict[str, Any]] = []
    try:
        ready, _ = await c.request({"type": "set_mode", "mode": call_mode, "call_id": f"eval-{mode}", "request_id": "m",
                                 "turn_detection": mode, "segment_silence_ms": silence_ms}, "mode_ready", timeout=30)
        if ready.get("turn_detection") != mode:
            raise RuntimeError(f"the server runs {ready.get('turn_detection')!r}, not {mode!r} (detector missing?)")
        streamer.start()
        await asyncio.sleep(1.0)
        for r in range(repeats):
            for clip in clips:
                records.append(await _one(c, streamer, clip, answer=call_mode == "full"))
                rec = records[-1]
                progress(f"  {mode:<5} {r + 1}/{repeats} {clip.kind:<9} "
                         f"{'FALSE ENDPOINT' if rec['false_endpoint'] else 'ok':<14} "
                         f"endpoint {rec.get('endpoint_ms')} ms, first audio {rec.get('first_audio_ms')} ms, "
                         f"heard {rec.get('heard')!r}")
                await asyncio.sleep(0.8)
    finally:
        await streamer.stop()
        await c.close()
    return records


def _is_final(kind: str, v: Any) -> bool:
    return (kind == "json" and v.get("type") == "stt_result" and bool(v.get("is_final"))
            and bool(str(v.get("text", "")).strip()))


async def _one(c: Client, streamer: Streamer, clip: Clip, *, answer: bool) -> dict[str, Any]:
    mark = len(c.items)
    t_end = await asyncio.wait_for(streamer.say(clip.audio), 60)
    at_end = len(c.items)
    rec: dict[str, Any] = {"kind": clip.kind, "text": clip.text, "pause_ms": clip.pause_ms}
    try:
        # The final of the utterance's end (after a false endpoint: of the part after the pause), then the
        # answer to it; an answer to a fragment cut off earlier is not this one.
        i_final, t_final, _ = await c.wait_item(_is_final, at_end, 15.0)
        rec["endpoint_ms"] = round((t_final - t_end) * 1000, 1)
        if answer:
            await c.wait_json(lambda m: m.get("type") in ("llm_response", "error"), i_final, WAIT_ANSWER_S)
        else:
            await asyncio.sleep(1.2)  # a late second final (the part after a pause) still belongs to this clip
    except (TimeoutError, ConnectionError) as exc:
        rec["failure"] = type(exc).__name__
    finals = [(t, v) for t, k, v in c.items[mark:] if _is_final(k, v)]
    rec["false_endpoint"] = any(t < t_end for t, _ in finals)
    rec["finals"] = len(finals)
    rec["heard"] = " | ".join(str(v.get("text", "")).strip() for _, v in finals)
    audio = [t for t, k, _ in c.items[at_end:] if k == "bin"]
    if audio:
        rec["first_audio_ms"] = round((audio[0] - t_end) * 1000, 1)
    return rec


def report(mode: str, records: list[dict[str, Any]], late_ms: float) -> dict[str, Any]:
    """Per mode: false endpoints on the paused clips, endpoint delay, late endpoints, first audio."""
    paused = [r for r in records if r["kind"] in ("paused", "um")]
    whole = [r for r in records if r["kind"] in ("question", "statement")]
    delays = [r["endpoint_ms"] for r in records if "endpoint_ms" in r and not r["false_endpoint"]]
    audio = [r["first_audio_ms"] for r in records if "first_audio_ms" in r and not r["false_endpoint"]]
    by_kind = {}
    for kind in ("question", "paused", "statement", "um"):
        rs = [r for r in records if r["kind"] == kind]
        by_kind[kind] = {"clips": len(rs), "false_endpoints": sum(r["false_endpoint"] for r in rs),
                         "endpoint_ms": summary([r["endpoint_ms"] for r in rs if "endpoint_ms" in r
                                                 and not r["false_endpoint"]])}
    return {
        "mode": mode, "clips": len(records),
        "false_endpoints_paused": sum(r["false_endpoint"] for r in paused), "paused_clips": len(paused),
        "false_endpoint_pct_paused": round(100.0 * sum(r["false_endpoint"] for r in paused) / len(paused), 1)
        if paused else None,
        "false_endpoints_whole": sum(r["false_endpoint"] for r in whole),
        "late_endpoints": sum(1 for d in delays if d > late_ms), "late_ms": late_ms,
        "endpoint_ms": summary(delays), "first_audio_ms": summary(audio),
        "failures": sum(1 for r in records if r.get("failure")), "by_kind": by_kind,
    }


def render(results: list[dict[str, Any]]) -> None:
    """The comparison table, on stdout."""
    print("turn detection on the evaluation set (end of speech -> final transcript / first audio, ms)")
    print(f"{'mode':<6}{'clips':>6}{'false endpoints (paused)':>26}{'endpoint p50':>14}{'p95':>7}"
          f"{'late':>6}{'first audio p50':>17}{'p95':>7}{'failed':>8}")
    for r in results:
        fe = f"{r['false_endpoints_paused']}/{r['paused_clips']} ({r['false_endpoint_pct_paused']}%)"
        print(f"{r['mode']:<6}{r['clips']:>6}{fe:>26}{_f(r['endpoint_ms']['p50']):>14}{_f(r['endpoint_ms']['p95']):>7}"
              f"{r['late_endpoints']:>6}{_f(r['first_audio_ms']['p50']):>17}{_f(r['first_audio_ms']['p95']):>7}"
              f"{r['failures']:>8}")
    for r in results:
        parts = ", ".join(f"{k} {v['false_endpoints']}/{v['clips']} cut, endpoint p50 {_f(v['endpoint_ms']['p50'])}"
                          for k, v in r["by_kind"].items())
        print(f"  {r['mode']}: {parts}")


def _f(v: Any) -> str:
    return "-" if v is None else f"{float(v):.0f}"


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    clips = build_set(args.seed)
    progress(f"evaluation set: {len(clips)} clips ({', '.join(sorted({c.kind for c in clips}))})")
    tmp = Path(tempfile.mkdtemp(prefix="turn-eval-"))
    srv = procs.start_server("turn-eval", tmp)
    results = []
    try:
        # Modes alternate clip set by clip set so drift in the machine's speed weighs on both alike.
        per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
        for r in range(args.repeats):
            for mode in (args.modes if r % 2 == 0 else list(reversed(args.modes))):
                per_mode[mode] += await run_mode(srv.url, mode, clips, 1, args.silence_ms, args.call_mode)
        results = [report(m, per_mode[m], args.late_ms) for m in args.modes]
        records = per_mode
    finally:
        srv.stop()
    return {"settings": {"modes": args.modes, "repeats": args.repeats, "segment_silence_ms": args.silence_ms,
                         "late_ms": args.late_ms, "seed": args.seed, "call_mode": args.call_mode, "pause_ms": PAUSE_MS},
            "machine": machine_info(None, False), "results": results, "records": records,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="vad,smart", help="turn detection modes to compare (default vad,smart)")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the set per mode (default 2)")
    ap.add_argument("--silence-ms", type=int, default=500, help="segment_silence_ms for every mode (default 500)")
    ap.add_argument("--late-ms", type=float, default=900.0, help="an endpoint slower than this is late")
    ap.add_argument("--call-mode", choices=("full", "stt"), default="full",
                    help="full: the server answers each clip (first audio measured); stt: transcripts only")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON object (indented) here")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        doc = asyncio.run(amain(args))
    finally:
        procs.stop_all_servers()
    render(doc["results"])
    if args.out:
        args.out.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
    if args.json:
        print(json.dumps(json_safe(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
