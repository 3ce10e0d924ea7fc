"""A third-party Realtime client on /v1/realtime: pipecat's OpenAIRealtimeLLMService, in a venv of its own.

pipecat (pinned) is installed by this test into ~/.cache/local-ai-server/pipecat-<version> (reused while its
version matches; never into the test's own venv), and `pipecat_realtime.py` runs there as a subprocess: a
Pipeline that feeds the service two questions spoken by the embedded Piper voice, at real-time pace, and
collects the answers' audio and text frames; as the second question starts, pipecat truncates the first
answer. Nothing of pipecat is faked; the server's log is the witness.
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
QUESTIONS = [QUESTION, "And what is the capital of Italy?"]


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
    wavs = []
    for i, question in enumerate(QUESTIONS):
        wav = tmp_path / f"question{i}.wav"
        pcm = float32_to_pcm16(resample(np.concatenate([silence(0.3), speak(question), silence(0.3)]), 16000, 24000))
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(24000)
            w.writeframes(pcm)
        wavs.append(str(wav))
    out = subprocess.run([str(python), str(CLIENT), f"ws://127.0.0.1:{rt.port}/v1/realtime", TOKEN, *wavs],
                         capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PIPECAT_SUMMARY ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    got = json.loads(lines[-1].split(" ", 1)[1])
    assert not got["timed_out"] and got["errors"] == [], got
    # pipecat heard the server's transcript of each question, and each answer's text and audio.
    assert len(got["transcripts"]) == len(got["answers"]) == 2, got
    for question, transcript in zip(QUESTIONS, got["transcripts"], strict=True):
        assert wer(question, transcript) <= 0.34, transcript
    assert got["audio_rates"] == [24000]
    for answer in got["answers"]:
        text = answer["text"]
        assert text.strip() and answer["tts_text"] == text
        seconds = answer["audio_bytes"] / 2 / 24000
        words = len(text.split())
        assert 0.1 * words <= seconds <= 1.5 * words + 2, (seconds, text)
        assert answer["audio_dbfs"] > -40, answer  # speech, not silence
    # response.done's usage, as pipecat read it: the second prompt holds the first exchange too.
    first, second = got["prompt_tokens"]
    assert 0 < first < second
    # The server's side: two responses, completed, every byte of their audio received by pipecat; and the
    # truncate pipecat sent for the first answer when the second question started, taken.
    logged = rt.log_events()
    done = [e for e in logged if e.get("event") == "realtime.response_done"]
    assert [e["status"] for e in done] == ["completed", "completed"]
    assert [e["audio_bytes"] for e in done] == [a["audio_bytes"] for a in got["answers"]]
    (truncated,) = [e for e in logged if e.get("event") == "realtime.item_truncated"]
    assert truncated["audio_end_ms"] <= truncated["audio_ms"]
    assert abs(truncated["audio_ms"] - got["answers"][0]["audio_bytes"] / 48) <= 1  # the first answer's audio
    assert not [e for e in logged if e.get("level") == "error" or e.get("event") == "realtime.error"]
