"""Silero VAD (the ONNX model shipped inside faster-whisper): speech probabilities per 32 ms window."""

from __future__ import annotations

import numpy as np

from ..vad import CONTEXT, WINDOW


class SileroVad:
    """The Silero VAD ONNX model bundled with faster-whisper; one shared session, per-stream state."""

    def __init__(self) -> None:
        from faster_whisper.vad import get_vad_model

        # onnxruntime sessions are safe to run from several threads; the recurrent state lives per stream.
        self._session = get_vad_model().session

    def stream(self) -> SileroStream:
        """A fresh per-session stream state."""
        return SileroStream(self._session)


class SileroStream:
    """Recurrent state (h, c and the trailing context) of Silero over one audio stream."""

    def __init__(self, session: object) -> None:
        self._session = session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def probs(self, windows: np.ndarray) -> np.ndarray:
        """Run the model over (n, 512) windows in one call."""
        n = windows.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        batch = np.empty((n, WINDOW + CONTEXT), dtype=np.float32)
        batch[0, :CONTEXT] = self._context
        if n > 1:
            batch[1:, :CONTEXT] = windows[:-1, -CONTEXT:]
        batch[:, CONTEXT:] = windows
        out, self._h, self._c = self._session.run(  # type: ignore[attr-defined]
            None, {"input": batch, "h": self._h, "c": self._c}
        )
        self._context = windows[-1, -CONTEXT:].copy()
        return np.asarray(out, dtype=np.float32).reshape(n)
