"""Smart Turn v3 (an ONNX audio model): the probability that a speaker has finished their turn.

The model is a Whisper-tiny-sized encoder with a classifier head. It reads the last 8 s of 16 kHz speech
as 80 x 800 Whisper log-mel features (the shorter utterance zero-padded in front, the waveform normalized
to zero mean and unit variance first) and returns one probability per clip. The features come from
faster-whisper's own numpy extractor, which is already installed for STT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW_S = 8  # the model was trained on clips of at most 8 s, the end of the turn last
WINDOW = SAMPLE_RATE * WINDOW_S


class SmartTurn:
    """One shared onnxruntime session; `probability` is thread-safe (it runs on the STT executor)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning threads would steal the cores the LLM decodes on between two short inferences.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._features = FeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_S)
        self.path = path

    def features(self, audio: np.ndarray) -> np.ndarray:
        """(80, 800) log-mel features of the last 8 s of `audio` (16 kHz float32)."""
        clip = np.asarray(audio, dtype=np.float32)[-WINDOW:]
        if clip.size < WINDOW:
            # Silence in front, as in training: the end of the clip is where the turn ends or not.
            clip = np.concatenate([np.zeros(WINDOW - clip.size, dtype=np.float32), clip])
        clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
        mel = self._features(clip, padding=0)
        return np.asarray(mel[:, -800:], dtype=np.float32)

    def probability(self, audio: np.ndarray) -> float:
        """How likely the speaker has finished, 0..1, judged from the utterance so far."""
        if audio.size == 0:
            return 0.0
        batch = self.features(audio)[np.newaxis]
        out = self._session.run(None, {self._input: batch})
        return float(np.asarray(out[0]).reshape(-1)[0])
