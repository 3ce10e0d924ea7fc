"""A phone caller for the capacity benchmark: speaks, listens to the whole answer in real time, pauses, speaks again.

The schedule (when the call starts, what is said, the pauses) and the playback clock are pure functions of a
seed and of what arrived, so they are unit-tested (tests/unit/test_capacity.py); `run_caller` plays them
against a real server over AVA's protocol in `full` mode.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from speech import Client, Streamer  # noqa: E402
from workload import RATE  # noqa: E402

PAUSE_S = (0.5, 2.5)  # the caller's think time after the answer has finished playing
GAP_S = 0.05  # a playback gap shorter than this is not heard as one


@dataclass(frozen=True)
class CallerPlan:
    """One caller's whole call, fixed by the seed: its start, what it says each turn, its pauses."""

    index: int
    seed: int
    offset_s: float
    sentences: tuple[str, ...]
    pauses_s: tuple[float, ...]


def plan_callers(n: int, seed: int, sentences: Sequence[str], turns: int, spread_s: float,
                 pause_s: tuple[float, float] = PAUSE_S) -> list[CallerPlan]:
    """`n` callers: each starts at a random offset in [0, spread_s) and says `turns` sentences.

    Each caller walks its own shuffled order of `sentences` (so concurrent callers say different things),
    and pauses a random time in `pause_s` after each answer. The same (n, seed) gives the same plans.
    """
    if not sentences:
        raise ValueError("no sentences to say")
    plans = []
    for i in range(n):
        rng = random.Random(f"{seed}:{n}:{i}")  # a string seed is stable across runs and Python versions
        order = list(sentences)
        rng.shuffle(order)
        said = tuple(order[k % len(order)] for k in range(turns))
        pauses = tuple(round(rng.uniform(*pause_s), 3) for _ in range(turns))
        plans.append(CallerPlan(index=i, seed=rng.randrange(1 << 30), offset_s=round(rng.uniform(0, spread_s), 3)
                                if spread_s > 0 else 0.0, sentences=said, pauses_s=pauses))
    return plans


def audio_seconds(byte_length: int, encoding: str, rate: int) -> float:
    """How long a chunk of the server's audio plays: mu-law has 1 byte a sample, linear16 2."""
    width = 1 if encoding == "mulaw" else 2
    return byte_length / width / rate if rate > 0 else 0.0


def playback(chunks: Sequence[tuple[float, float]]) -> tuple[float | None, list[float]]:
    """Play chunks (arrival time, seconds) in order, each as soon as it is there and the previous one ended.

    Returns when playback ends (None without chunks) and the gaps the caller heard in the middle of the
    answer (a chunk that arrived after the previous one had finished playing), in seconds.
    """
    end: float | None = None
    gaps = []
    for arrival, seconds in chunks:
        if end is not None and arrival - end > GAP_S:
            gaps.append(arrival - end)
        start = arrival if end is None else max(end, arrival)
        end = start + seconds
    return end, gaps


def audio_chunks(items: Sequence[tuple[float, str, Any]]) -> list[tuple[float, float]]:
    """(arrival, seconds) of every binary frame, from the tts_audio header sent right before it."""
    out = []
    header: dict[str, Any] | None = None
    for t, kind, value in items:
        if kind == "json" and value.get("type") == "tts_audio":
            header = value
        elif kind == "bin":
            enc = str(header.get("encoding", "mulaw")) if header else "mulaw"
            rate = int(header.get("sample_rate_hz") or 8000) if header else 8000
            out.append((t, audio_seconds(int(value), enc, rate)))
            header = None
    return out


@dataclass(frozen=True)
class Limits:
    """How long a caller waits before a turn counts as failed."""

    first_audio_s: float = 30.0  # end of speech -> first audio
    answer_s: float = 90.0  # end of speech -> the whole answer (llm_response)


def _final(items: Sequence[tuple[float, str, Any]], start: int) -> dict[str, Any] | None:
    return next((v for _, k, v in items[start:] if k == "json" and v.get("type") == "stt_result"
                 and v.get("is_final") and str(v.get("text", "")).strip()), None)


async def one_turn(c: Client, streamer: Streamer, audio: np.ndarray, limits: Limits) -> dict[str, Any]:
    """Say `audio`, then wait for the whole answer: the turn's record (`failure` is None if it went well)."""
    mark = len(c.items)
    rec: dict[str, Any] = {"speech_s": round(len(audio) / RATE, 2), "failure": None, "mark": mark}
    try:
        t_end = await asyncio.wait_for(streamer.say(audio), 60)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError):
        rec["failure"] = "disconnect"  # the line stopped taking audio
        return rec
    rec["t_end"] = t_end
    try:
        _, t_first, first = await c.wait_item(lambda k, v: k == "bin" or (
            k == "json" and v.get("type") in ("error", "llm_response")), mark, timeout=limits.first_audio_s)
    except TimeoutError:
        rec["failure"] = "no_answer" if _final(c.items, mark) else "no_final"
        return rec
    except ConnectionError:
        rec["failure"] = "disconnect"
        return rec
    if isinstance(first, dict):
        rec["failure"] = f"error:{first.get('code')}" if first.get("type") == "error" else "no_audio"
        return rec
    rec["v2fa_ms"] = round((t_first - t_end) * 1000, 1)
    try:
        remaining = max(1.0, limits.answer_s - (time.perf_counter() - t_end))
        _, t_done, done = await c.wait_json(lambda m: m.get("type") in ("error", "llm_response"), mark, remaining)
    except TimeoutError:
        rec["failure"] = "incomplete"
        return rec
    except ConnectionError:
        rec["failure"] = "disconnect"
        return rec
    if done.get("type") == "error":
        rec["failure"] = f"error:{done.get('code')}"
        return rec
    final = _final(c.items, mark)
    if final is None:
        rec["failure"] = "no_final"
        return rec
    end, gaps = playback(audio_chunks(c.items[mark:]))
    rec.update(heard=final.get("text"), answer_chars=len(done.get("text", "")), answer_done_ms=round(
        (t_done - t_end) * 1000, 1), playback_end=end, gaps=len(gaps), gap_s=round(sum(gaps), 3),
        answer_audio_s=round(sum(s for _, s in audio_chunks(c.items[mark:])), 2))
    return rec


async def run_caller(url: str, plan: CallerPlan, speech: dict[str, np.ndarray], call_id: str,
                     out: dict[str, Any], *, stop_at: float | None = None, limits: Limits | None = None) -> None:
    """One call, filling `out` as it goes (so a step cut short keeps what was done).

    The caller starts at its offset, speaks each sentence of its plan in real time with line noise in between,
    listens until the answer would have finished playing, pauses, and speaks again. It hangs up after a failed
    turn (a late answer would be taken for the next one's), or once `stop_at` (perf_counter) has passed.
    """
    lim = limits or Limits()
    turns: list[dict[str, Any]] = []
    out.update(caller=plan.index, call_id=call_id, offset_s=plan.offset_s, turns=turns, planned=len(plan.sentences))
    await asyncio.sleep(plan.offset_s)
    try:
        c = await Client.connect(url)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, a bad handshake: the call never started
        turns.append({"failure": "connect", "error": repr(exc)[:200]})
        return
    streamer = Streamer(c, seed=plan.seed)
    try:
        try:
            await c.request({"type": "set_mode", "mode": "full", "call_id": call_id, "request_id": "m"},
                            "mode_ready", timeout=30)
        except (TimeoutError, ConnectionError) as exc:
            turns.append({"failure": "set_mode", "error": repr(exc)[:200]})
            return
        streamer.start()
        for k, sentence in enumerate(plan.sentences):
            if k > 0 and stop_at is not None and time.perf_counter() >= stop_at:
                break
            rec = await one_turn(c, streamer, speech[sentence], lim)
            rec["sentence"] = sentence
            turns.append(rec)
            if rec["failure"] is not None:
                break
            # Listen to the whole answer as it plays, then think a moment before speaking again.
            await asyncio.sleep(max(0.0, (rec["playback_end"] or 0.0) - time.perf_counter()) + plan.pauses_s[k])
    finally:
        await streamer.stop()
        out.update(late_frames=streamer.late_frames, max_late_ms=round(streamer.max_late_s * 1000, 1))
        _errors_between_turns(c.items, turns)
        await c.close()


def _errors_between_turns(items: Sequence[tuple[float, str, Any]], turns: list[dict[str, Any]]) -> None:
    """An error reply anywhere in a turn's stretch of the call (its pause included) fails that turn."""
    marks = [t["mark"] for t in turns if "mark" in t]
    for i, t in enumerate(t for t in turns if "mark" in t):
        stop = marks[i + 1] if i + 1 < len(marks) else len(items)
        codes = [v.get("code") for _, k, v in items[t["mark"]:stop] if k == "json" and v.get("type") == "error"]
        if codes and t["failure"] is None:
            t["failure"] = f"error:{codes[0]}"
    for t in turns:
        t.pop("mark", None)
        t.pop("t_end", None)
        t.pop("playback_end", None)
