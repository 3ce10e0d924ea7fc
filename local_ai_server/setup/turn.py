"""One real voice turn with the installed models, measured stage by stage, and compared with the plan.

Used by `model_setup.py verify`: the installer predicted figures from a probe; this measures the
same figures on the models it actually installed (a spoken 10-word question -> STT -> LLM -> TTS
of the first sentence) and says how far off the prediction was.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_ai_server.threads import thread_env

thread_env()  # before CTranslate2 / llama.cpp load

# 10-word questions, as the prediction assumes (plan.QUESTION_WORDS); a different one each repeat, or
# llama.cpp would reuse the previous prompt from its cache and the first token would come for free.
QUESTIONS = (
    "Tell me three interesting facts about the city of Paris.",
    "What are three good reasons to visit the city of Rome?",
    "Can you name three famous old buildings in London?",
)
ANSWER_TOKENS = 30  # plan.ANSWER_TOKENS
# The figures both sides have; the rest of a prediction is not measurable in one turn. The decode rate a turn
# measures is the LLM's while the first sentence is spoken beside it: the prediction's turn_decode_tok_s.
COMPARED = ("stt_ms", "ttft_ms", "turn_decode_tok_s", "tts_first_sentence_ms", "first_audio_ms", "voice_turn_ms",
            "ready_ms")


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
            "turn_decode_tok_s": round(self.decode_tok_s, 1),
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
    from local_ai_server.session import Session
    from local_ai_server.tasks import TaskOwner
    from local_ai_server.voice.turn import Turn, Voice, run_answer

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
        encoding, rate, _fb = Session(id=0).output_format()
        runs: list[TurnResult] = []
        for n in range(max(1, repeats)):
            question, speech = QUESTIONS[n % len(QUESTIONS)], speeches[n % len(speeches)]
            t0 = time.monotonic()
            transcript = (await asyncio.to_thread(stt.transcribe, speech)).text
            t_stt = time.monotonic()
            # The server's own turn (voice/turn.py): tokens -> sentences -> speech, timed by what it emits.
            engines, sink = _Engines(pool, tts), _Stopwatch()
            turn = Turn(kind="voice", request_id=None)
            async with TaskOwner("verify") as tasks:
                voice = Voice(engines, sink, encoding, rate, lambda coro: tasks.spawn(coro),  # type: ignore[arg-type]
                              sink.failed)
                job = pool.submit([("system", prompt), ("user", transcript or question)], sampling)
                answer = await run_answer(turn, job, voice, stream_tokens=False, sink=sink)
            if sink.errors:
                raise RuntimeError(f"the turn failed: {sink.errors[0]}")
            t_first_token, t_first_audio = turn.timings.get("llm_first_token"), sink.first_speech_at
            if t_first_token is None:
                raise RuntimeError("the LLM produced no answer")
            if t_first_audio is None or engines.first_tts_ms is None:
                raise RuntimeError("the TTS produced no audio for the answer")
            stt_ms = (t_stt - t0) * 1000
            ttft_ms = (t_first_token - t_stt) * 1000
            first_audio_ms = (t_first_audio - t0) * 1000
            tts_ms = engines.first_tts_ms
            # The worker's own clock: tokens after the first, over the time they took.
            decode = float(job.stats.get("decode_tok_s") or 0.0)
            decode_s = float(job.stats.get("decode_s") or 0.0)
            runs.append(TurnResult(
                transcript=transcript, answer=answer, stt_ms=stt_ms, ttft_ms=ttft_ms,
                first_sentence_ms=max(0.0, first_audio_ms - stt_ms - ttft_ms - tts_ms), decode_tok_s=decode,
                answer_tokens=job.tokens, tts_first_sentence_ms=tts_ms, first_audio_ms=first_audio_ms,
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


class _Engines:
    """The turn's engines as the server runs them: the LLM pool, and TTS on a thread, its first call timed."""

    def __init__(self, pool: Any, tts: Any) -> None:
        self.pool, self.tts = pool, tts
        self.default_prompt = ""
        self.stt_inflight = 0
        self.first_tts_ms: float | None = None

    async def synthesize(self, text: str, due: float | None = None) -> tuple[Any, int]:
        t0 = time.perf_counter()
        audio = await asyncio.to_thread(self.tts.synthesize_all, text)
        if self.first_tts_ms is None:
            self.first_tts_ms = (time.perf_counter() - t0) * 1000
        return audio, int(self.tts.sample_rate)

    async def run_aux(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


class _Stopwatch:
    """A sink that notes when the first speech went out, and any error."""

    def __init__(self) -> None:
        self.first_speech_at: float | None = None
        self.errors: list[str] = []

    def control(self, event: Any) -> None:
        """Nothing but errors is sent as control in a turn."""

    def data(self, event: Any, turn: Any = None) -> None:
        from local_ai_server.voice.events import Speech

        if isinstance(event, Speech) and self.first_speech_at is None:
            self.first_speech_at = time.monotonic()

    def discard_speech(self) -> int:
        return 0

    def failed(self, _turn: Any, err: Any) -> None:
        self.errors.append(str(getattr(err, "message", err)))


def compare(measured: Mapping[str, float], expected: Mapping[str, float],
            bound: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per figure: expected (and its pessimistic bound), measured, the error in percent of the measured value,
    and whether the measurement fell within the promised range (no worse than the bound)."""
    out: dict[str, dict[str, Any]] = {}
    for key in COMPARED:
        if key not in measured or key not in expected:
            continue
        m, e = float(measured[key]), float(expected[key])
        error = None if m == 0 else round((e - m) / m * 100, 1)
        row: dict[str, Any] = {"expected": e, "measured": m, "error_pct": error}
        if bound and key in bound:
            b = float(bound[key])
            row["bound"] = b
            row["within_bound"] = m >= b if key.endswith("tok_s") else m <= b
        out[key] = row
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
        if "bound" in row:
            verdict += ("; within the promised range" if row["within_bound"] else
                        "; worse than even the pessimistic bound")
        bound = f" (at worst {row['bound']:g})" if "bound" in row else ""
        lines.append(f"{key}: expected {row['expected']:g}{bound}, measured {row['measured']:g} ({verdict})")
    return lines
