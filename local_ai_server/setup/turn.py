"""One real voice turn with the installed models, measured stage by stage, and compared with the plan.

Used by `model_setup.py verify`: the installer predicted figures from a probe; this measures the
same figures on the models it actually installed (a spoken 10-word question -> STT -> LLM -> TTS
of the first sentence) and says how far off the prediction was.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before CTranslate2 / llama.cpp load (MODELS.md trap 3)

# 10-word questions, as the prediction assumes (plan.QUESTION_WORDS); a different one each repeat, or
# llama.cpp would reuse the previous prompt from its cache and the first token would come for free.
QUESTIONS = (
    "Tell me three interesting facts about the city of Paris.",
    "What are three good reasons to visit the city of Rome?",
    "Can you name three famous old buildings in London?",
)
ANSWER_TOKENS = 30  # plan.ANSWER_TOKENS
# The figures both sides have; the rest of a prediction is not measurable in one turn.
COMPARED = ("stt_ms", "ttft_ms", "decode_tok_s", "tts_first_sentence_ms", "first_audio_ms", "voice_turn_ms")


@dataclass(frozen=True)
class TurnResult:
    """What one measured turn did, per stage."""

    transcript: str
    answer: str
    stt_ms: float
    ttft_ms: float
    first_sentence_ms: float
    decode_tok_s: float
    answer_tokens: int
    tts_first_sentence_ms: float
    first_audio_ms: float
    voice_turn_ms: float

    def figures(self) -> dict[str, float]:
        """The measured figures under the names the prediction uses."""
        return {
            "stt_ms": round(self.stt_ms),
            "ttft_ms": round(self.ttft_ms),
            "decode_tok_s": round(self.decode_tok_s, 1),
            "tts_first_sentence_ms": round(self.tts_first_sentence_ms),
            "first_audio_ms": round(self.first_audio_ms),
            "voice_turn_ms": round(self.voice_turn_ms),
        }


def run_turn(
    stt_path: Path,
    llm_path: Path,
    tts_path: Path,
    *,
    llm_threads: int,
    stt_threads: int,
    tts_threads: int,
    gpu_layers: int = 0,
    system_prompt: str | None = None,
    repeats: int = len(QUESTIONS),
) -> TurnResult:
    """Speak each of QUESTIONS with the installed voice and run a turn on it; the median of each stage.

    The LLM runs in the server's own process pool (one spawned worker), STT and TTS in this process, as
    in the server: an LLM sharing a process with CTranslate2 decodes markedly slower than it does there.
    """
    return asyncio.run(_run_turn(stt_path, llm_path, tts_path, llm_threads=llm_threads, stt_threads=stt_threads,
                                 tts_threads=tts_threads, gpu_layers=gpu_layers, system_prompt=system_prompt,
                                 repeats=repeats))


async def _run_turn(
    stt_path: Path, llm_path: Path, tts_path: Path, *, llm_threads: int, stt_threads: int, tts_threads: int,
    gpu_layers: int, system_prompt: str | None, repeats: int,
) -> TurnResult:
    from local_ai_server.audio import resample
    from local_ai_server.config import DEFAULT_SYSTEM_PROMPT
    from local_ai_server.engines.llm import LlmParams, SamplingParams
    from local_ai_server.engines.stt import WhisperStt
    from local_ai_server.engines.tts import PiperTts
    from local_ai_server.llm_pool import LlmPool
    from local_ai_server.text import SentenceSplitter

    prompt = system_prompt or DEFAULT_SYSTEM_PROMPT
    # The server warms every model and prefills the system prompt at start-up; so does this.
    pool = LlmPool(llm_path, LlmParams(context=2048, threads=llm_threads, batch=256, gpu_layers=gpu_layers,
                                       warmup_system_prompt=prompt), workers=1, infer_timeout_s=120)
    await pool.start()
    try:
        if pool.state != "ready":
            raise RuntimeError(f"the LLM did not load: {pool.error}")
        tts = PiperTts(tts_path, threads=tts_threads, variation=False)
        stt = WhisperStt(stt_path, threads=stt_threads)
        tts.warm_up()
        stt.warm_up()
        speeches = [resample(tts.synthesize_all(q), tts.sample_rate, 16000) for q in QUESTIONS]
        # temperature 0: the same answer, so the same work, every repeat.
        sampling = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, top_p=1.0, repeat_penalty=1.0)
        runs: list[TurnResult] = []
        for n in range(max(1, repeats)):
            question, speech = QUESTIONS[n % len(QUESTIONS)], speeches[n % len(speeches)]
            t0 = time.perf_counter()
            transcript = (await asyncio.to_thread(stt.transcribe, speech)).text
            t_stt = time.perf_counter()
            splitter = SentenceSplitter(first_clause_chars=20)
            first_sentence: str | None = None
            t_first_token = t_first_sentence = None
            pieces: list[str] = []
            job = pool.submit([("system", prompt), ("user", transcript or question)], sampling)
            async for delta in job.stream():
                now = time.perf_counter()
                t_first_token = t_first_token or now
                pieces.append(delta)
                if first_sentence is None:
                    done = splitter.push(delta)
                    if done:
                        first_sentence, t_first_sentence = done[0], now
            t_llm = time.perf_counter()
            tokens = job.tokens
            answer = "".join(pieces).strip()
            if first_sentence is None:
                rest = splitter.flush()
                first_sentence, t_first_sentence = (rest[0] if rest else answer), t_llm
            t_tts0 = time.perf_counter()
            tts_audio = await asyncio.to_thread(_first_chunk, tts, first_sentence or "Okay.")
            tts_ms = (time.perf_counter() - t_tts0) * 1000
            if tts_audio is None or tts_audio.size == 0:
                raise RuntimeError("the TTS produced no audio for the first sentence")
            if t_first_token is None or t_first_sentence is None:
                raise RuntimeError("the LLM produced no answer")
            stt_ms = (t_stt - t0) * 1000
            ttft_ms = (t_first_token - t_stt) * 1000
            # The worker's own clock: tokens after the first, over the time they took.
            decode = float(job.stats.get("decode_tok_s") or 0.0)
            decode_s = t_llm - t_first_token
            first_sentence_ms = (t_first_sentence - t_first_token) * 1000
            runs.append(TurnResult(
                transcript=transcript, answer=answer, stt_ms=stt_ms, ttft_ms=ttft_ms,
                first_sentence_ms=first_sentence_ms, decode_tok_s=decode, answer_tokens=tokens,
                tts_first_sentence_ms=tts_ms,
                first_audio_ms=stt_ms + ttft_ms + first_sentence_ms + tts_ms,
                # The prediction's turn: STT, first token, a 30-token answer at the measured rate (the model
                # may stop earlier), then its first sentence spoken.
                voice_turn_ms=stt_ms + ttft_ms + ((ANSWER_TOKENS - 1) / decode * 1000 if decode else decode_s * 1000)
                + tts_ms,
            ))
    finally:
        await pool.close()
    last = runs[-1]

    def med(name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in runs))

    return TurnResult(
        transcript=last.transcript, answer=last.answer, stt_ms=med("stt_ms"), ttft_ms=med("ttft_ms"),
        first_sentence_ms=med("first_sentence_ms"), decode_tok_s=med("decode_tok_s"),
        answer_tokens=last.answer_tokens, tts_first_sentence_ms=med("tts_first_sentence_ms"),
        first_audio_ms=med("first_audio_ms"), voice_turn_ms=med("voice_turn_ms"),
    )


def _first_chunk(tts: Any, text: str) -> Any:
    """The first audio chunk Piper makes of `text` (what the server sends first), or None."""
    return next(iter(tts.synthesize(text)), None)


def compare(measured: Mapping[str, float], expected: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per figure: expected, measured and the prediction's error in percent of the measured value."""
    out: dict[str, dict[str, Any]] = {}
    for key in COMPARED:
        if key not in measured or key not in expected:
            continue
        m, e = float(measured[key]), float(expected[key])
        error = None if m == 0 else round((e - m) / m * 100, 1)
        out[key] = {"expected": e, "measured": m, "error_pct": error}
    return out


def describe_comparison(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Human lines: one per figure, saying how far off the prediction was and in which direction."""
    lines = []
    for key, row in rows.items():
        err = row["error_pct"]
        if err is None:
            verdict = "not measurable"
        elif abs(err) <= 25:
            verdict = f"prediction within {abs(err):.0f}%"
        else:
            verdict = f"prediction {'too high' if err > 0 else 'too low'} by {abs(err):.0f}%"
        lines.append(f"{key}: expected {row['expected']:g}, measured {row['measured']:g} ({verdict})")
    return lines
