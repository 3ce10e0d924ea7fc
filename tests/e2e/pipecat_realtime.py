"""A pipecat pipeline on our /v1/realtime: run in a venv of its own (test_realtime_pipecat.py makes it), not collected.

    python pipecat_realtime.py <ws base url> <api key> <question.wav> [<question.wav> ...]   (24 kHz mono PCM16)

A Pipeline of [the spoken questions, fed as InputAudioRawFrames at real-time pace, each once the answer to
the one before has ended; pipecat's OpenAIRealtimeLLMService; a collector]. The server's own turn detection
(server_vad, the service's default) hears each question and answers it; the collector keeps each answer's
audio and text frames. When the next question starts, pipecat truncates the answer before it at what it
"played" (no output transport here plays it, so pipecat still counts it as playing). One JSON summary goes
to stdout: what pipecat reported, for the test to judge.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import sys
import time
import wave
from typing import Any

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMTextFrame,
    MetricsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner

FRAME_MS = 20
TIMEOUT_S = 240.0


class Summary:
    """What the pipeline saw."""

    def __init__(self) -> None:
        self.transcripts: list[str] = []
        self.responses: list[dict[str, Any]] = []  # each answer: its text frames, TTS text frames, audio
        self.audio_rates: set[int] = set()
        self.errors: list[str] = []
        self.prompt_tokens: list[int] = []
        self.ended = asyncio.Event()  # an answer (with audio) ended
        self.start_answer()

    def start_answer(self) -> None:
        self.responses.append({"text": [], "tts_text": [], "audio": bytearray()})


class Head(FrameProcessor):
    """First in the pipeline: the user's transcript travels upstream to it (pipecat pushes it so)."""

    def __init__(self, summary: Summary) -> None:
        super().__init__()
        self.summary = summary

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and direction == FrameDirection.UPSTREAM:
            self.summary.transcripts.append(frame.text)
        elif isinstance(frame, ErrorFrame):
            self.summary.errors.append(str(frame.error))
        await self.push_frame(frame, direction)


class Collector(FrameProcessor):
    """Last in the pipeline: the answer's audio, its text, usage metrics, and the end of the response."""

    def __init__(self, summary: Summary) -> None:
        super().__init__()
        self.summary = summary

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        s = self.summary
        answer = s.responses[-1]
        if isinstance(frame, TTSAudioRawFrame):
            answer["audio"] += frame.audio
            s.audio_rates.add(frame.sample_rate)
        elif isinstance(frame, TTSTextFrame):
            answer["tts_text"].append(frame.text)
        elif isinstance(frame, LLMTextFrame):
            answer["text"].append(frame.text)
        elif isinstance(frame, ErrorFrame):
            s.errors.append(str(frame.error))
        elif isinstance(frame, MetricsFrame):
            s.prompt_tokens += [d.value.prompt_tokens for d in frame.data if isinstance(d, LLMUsageMetricsData)]
        elif isinstance(frame, LLMFullResponseEndFrame) and answer["audio"]:
            s.start_answer()
            s.ended.set()
        await self.push_frame(frame, direction)


def read_wav(path: str) -> tuple[bytes, int]:
    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, "mono PCM16 expected"
        return w.readframes(w.getnframes()), w.getframerate()


async def feed(worker: PipelineWorker, pcm: bytes, rate: int) -> None:
    """A question at real-time pace, after a second of silence (the service connects meanwhile), then silence."""
    step = rate * 2 * FRAME_MS // 1000
    audio = b"\x00" * (rate * 2) + pcm + b"\x00" * (rate * 2 * 2)
    t0 = time.monotonic()
    for i, start in enumerate(range(0, len(audio), step)):
        chunk = audio[start:start + step]
        await worker.queue_frames([InputAudioRawFrame(audio=chunk, sample_rate=rate, num_channels=1)])
        delay = t0 + (i + 1) * FRAME_MS / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def rms_dbfs(pcm: bytes) -> float:
    n = len(pcm) // 2
    if n == 0:
        return -200.0
    samples = struct.unpack(f"<{n}h", pcm[:n * 2])
    mean = sum(x * x for x in samples) / n
    return 10 * math.log10(mean / 32768**2) if mean > 0 else -200.0


async def main(url: str, key: str, wavs: list[str]) -> dict[str, Any]:
    questions = [read_wav(w) for w in wavs]
    rate = questions[0][1]
    summary = Summary()
    llm = OpenAIRealtimeLLMService(
        api_key=key, base_url=url,
        settings=OpenAIRealtimeLLMService.Settings(model="local-pipecat",
                                                   system_instruction="Answer in one short sentence."))
    pipeline = Pipeline([Head(summary), llm, Collector(summary)])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=rate, enable_metrics=True,
                                                            enable_usage_metrics=True))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.ensure_future(runner.run())
    timed_out = False
    for pcm, _ in questions:
        summary.ended.clear()
        feeding = asyncio.ensure_future(feed(worker, pcm, rate))
        try:
            await asyncio.wait_for(summary.ended.wait(), TIMEOUT_S)
            await asyncio.sleep(0.5)  # the usage metrics come with response.done, right before the end frame
        except TimeoutError:
            timed_out = True
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        if timed_out or summary.errors:
            break
    await worker.cancel()
    await asyncio.gather(run, return_exceptions=True)
    answers = [r for r in summary.responses if r["audio"]]
    return {
        "timed_out": timed_out,
        "transcripts": summary.transcripts,
        "answers": [{"text": "".join(r["text"]), "tts_text": "".join(r["tts_text"]), "audio_bytes": len(r["audio"]),
                     "audio_dbfs": round(rms_dbfs(bytes(r["audio"])), 1)} for r in answers],
        "audio_rates": sorted(summary.audio_rates),
        "prompt_tokens": summary.prompt_tokens,
        "errors": summary.errors,
    }


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
    print("PIPECAT_SUMMARY " + json.dumps(result))
