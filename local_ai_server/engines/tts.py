"""Piper adapter: text -> one float32 chunk per sentence, in the calling thread."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class PiperTts:
    """A loaded Piper voice with an explicit thread budget and no busy-waiting threads."""

    def __init__(self, model_path: Path, *, threads: int, variation: bool = True) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig

        from . import espeak

        espeak.install()  # piper's own clause splitter leaks every clause (a long-running server's RSS)

        config_path = Path(f"{model_path}.json")
        if not model_path.is_file() or not config_path.is_file():
            raise FileNotFoundError("TTS voice (.onnx and .onnx.json) not found")
        with open(config_path, encoding="utf-8") as fh:
            raw = json.load(fh)
        config = PiperConfig.from_dict(raw)
        # The voice's language as its card names it ("en_US"): what a client picking a voice matches.
        language = raw.get("language", {}).get("code") if isinstance(raw.get("language"), dict) else None
        self.language: str | None = language if isinstance(language, str) else None
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning threads steal the cores the LLM decodes on (shared/MODELS.md trap 3).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        # onnxruntime's arena keeps every block it ever grew for the longest input seen and never gives
        # it back: Piper's inputs change length with every sentence, and a 30-minute soak grew the
        # server by ~200 MB (in-process, 400 sentences: 144 -> 726 MB with it, 143 -> 153 MB without).
        # Without the arena synthesis is as fast (median 415 vs 421 ms here).
        opts.enable_cpu_mem_arena = False
        # The memory-pattern cache keeps a plan for every distinct input shape and never drops one: with
        # each sentence a new length it held ~25 KB more per new length (~130 KB per call in a soak).
        # Interleaved on the same sentences, synthesis is as fast without it (median 289 vs 309 ms with
        # two threads, 457 vs 435 ms with one: within this machine's noise).
        opts.enable_mem_pattern = False
        session = onnxruntime.InferenceSession(str(model_path), sess_options=opts,
                                               providers=["CPUExecutionProvider"])
        self.path = model_path
        self.sample_rate: int = config.sample_rate
        self._voice = PiperVoice(session=session, config=config)
        # Piper samples noise into every rendition; without it the same text is always the same audio
        # (what tests and benchmarks that must repeat themselves want).
        self._syn = None if variation else SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield float32 mono audio at `sample_rate`, one array per sentence Piper finds."""
        for chunk in self._voice.synthesize(text, self._syn):
            yield np.asarray(chunk.audio_float_array, dtype=np.float32)

    def synthesize_all(self, text: str) -> np.ndarray:
        """The whole text as one float32 array."""
        parts = list(self.synthesize(text))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def warm_up(self) -> None:
        """Synthesize a word so the first caller does not pay for lazy initialisation."""
        self.synthesize_all("Hello.")
