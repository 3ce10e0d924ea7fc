"""A third-party Realtime client on /v1/realtime: pipecat's OpenAIRealtimeLLMService, in a venv of its own.

pipecat (pinned) is installed by this test into ~/.cache/local-ai-server/pipecat-<version> (reused while its
version matches; never into the test's own venv), and `pipecat_realtime.py` runs there as a subprocess: a
Pipeline that feeds the service a question spoken by the embedded Piper voice, at real-time pace, and
collects the answer's audio and text frames. Nothing of pipecat is faked; the server's log is the witness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from local_ai_server.audio import float32_to_pcm16, resample

from .conftest import ServerProc, silence, start_server
from .test_realtime import QUESTION, TOKEN
from .test_voice import wer

pytestmark = pytest.mark.e2e
PIPECAT = "pipecat-ai[openai]==1.14.0"
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "local-ai-server" / "pipecat-1.14.0"
CLIENT = Path(__file__).with_name("pipecat_realtime.py")


def pipecat_python() -> Path:
    """The side venv's interpreter, with pipecat installed (made once, then reused)."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('pipecat-ai'))"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "1.14.0":
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
    done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", PIPECAT],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"pip install {PIPECAT} failed:\n{done.stderr[-3000:]}"
    return python


@pytest.fixture(scope="module")
def rt(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("rt_pipecat"), models_dir, env={"LOCAL_WS_AUTH_TOKEN": TOKEN})
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


@pytest.mark.timeout(1800)  # the first run installs pipecat (minutes); later runs reuse the venv
def test_pipecat_realtime_service_talks_to_the_server(rt: ServerProc, speak: Callable[[str], np.ndarray],
                                                      tmp_path: Path) -> None:
    python = pipecat_python()
    wav = tmp_path / "question.wav"
    pcm = float32_to_pcm16(resample(np.concatenate([silence(0.3), speak(QUESTION), silence(0.3)]), 16000, 24000))
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm)
    out = subprocess.run([str(python), str(CLIENT), f"ws://127.0.0.1:{rt.port}/v1/realtime", TOKEN, str(wav)],
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PIPECAT_SUMMARY ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    got = json.loads(lines[-1].split(" ", 1)[1])
    assert not got["timed_out"] and got["errors"] == [], got
    # pipecat heard the server's transcript of the question, and the answer's text and audio.
    (transcript,) = got["transcripts"]
    assert wer(QUESTION, transcript) <= 0.34, transcript
    text = got["text"]
    assert text.strip() and got["tts_text"] == text
    assert got["audio_rates"] == [24000]
    seconds = got["audio_bytes"] / 2 / 24000
    words = len(text.split())
    assert 0.1 * words <= seconds <= 1.5 * words + 2, (seconds, text)
    assert got["audio_dbfs"] > -40, got["audio_dbfs"]  # speech, not silence
    assert got["prompt_tokens"] and got["prompt_tokens"][0] > 0  # response.done's usage, as pipecat read it
    # The server's side: one response, completed, and every byte of its audio reached pipecat.
    logged = rt.log_events()
    (done,) = [e for e in logged if e.get("event") == "realtime.response_done"]
    assert done["status"] == "completed" and done["audio_bytes"] == got["audio_bytes"]
    assert not [e for e in logged if e.get("level") == "error" or e.get("event") == "realtime.error"]
