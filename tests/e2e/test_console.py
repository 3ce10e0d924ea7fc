"""The browser console at `/`: the system's headless Chromium, a fake microphone speaking a WAV, the real server."""

from __future__ import annotations

import os
import shutil
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from local_ai_server.audio import float32_to_pcm16, resample

from .conftest import ROOT, ServerProc, silence, start_server
from .test_concurrency import LONG_ENV
from .test_voice import SENTENCE, wer

pytestmark = pytest.mark.e2e
TOKEN = "console-test-token"
INSTALL = "apt-get install -y chromium (scripts/test.sh does it when run as root or with passwordless sudo)"
TIMEOUT_MS = 120_000
SCREENSHOT = ROOT / "docs" / "console.png"
# Chromium's fake capture device reads 16-bit PCM WAV; at 48 kHz it needs no resampling of its own.
WAV_RATE = 48000
# As root Chromium needs --no-sandbox; the others keep it from reaching for the network it does not have.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def chromium() -> str:
    """The system's Chromium; a missing browser fails the test (never a skip), naming the install command."""
    found = os.environ.get("LOCAL_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(f"no Chromium on this machine: {INSTALL}")
    return found


@pytest.fixture(scope="module")
def secured(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server with a token: the page must send it (as a WebSocket subprotocol)."""
    srv = start_server(tmp_path_factory.mktemp("console"), models_dir, env={"LOCAL_WS_AUTH_TOKEN": TOKEN})
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


@pytest.fixture(scope="module")
def open_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server without a token, allowing long answers (for the barge-in)."""
    srv = start_server(tmp_path_factory.mktemp("console-open"), models_dir, env=LONG_ENV)
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


def write_wav(path: Path, parts: list[np.ndarray]) -> Path:
    """16 kHz float32 parts -> one 48 kHz mono 16-bit PCM WAV (what the fake microphone plays)."""
    audio = resample(np.concatenate(parts), 16000, WAV_RATE)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes(float32_to_pcm16(audio))
    return path


class Page:
    """The console open in headless Chromium, its microphone fed from `wav`."""

    def __init__(self, url: str, wav: Path) -> None:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            pytest.fail("playwright is not installed: .venv/bin/pip install -e '.[test]' (scripts/test.sh does)")
        self._pw = sync_playwright().start()
        # %noloop: play the file once (it would loop otherwise), then the device gives silence.
        args = [*FLAGS, f"--use-file-for-fake-audio-capture={wav}%noloop"]
        self.browser = self._pw.chromium.launch(executable_path=chromium(), headless=True, args=args)
        self.page = self.browser.new_page(viewport={"width": 1000, "height": 700})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error"
                     and "Content Security Policy" in msg.text else None)
        self.response = self.page.goto(url)

    def text(self, element_id: str) -> str:
        return str(self.page.locator(f"#{element_id}").inner_text()).strip()

    def number(self, element_id: str) -> int:
        return int(self.text(element_id) or 0)

    def attr(self, selector: str, name: str) -> str | None:
        return self.page.locator(selector).get_attribute(name)

    def wait(self, ready: Callable[[], bool], what: str) -> None:
        """Until `ready()`, read through locators: the page's CSP forbids the eval that wait_for_function uses."""
        for _ in range(TIMEOUT_MS // 200):
            if ready():
                return
            self.page.wait_for_timeout(200)
        raise AssertionError(f"timed out waiting for {what}; status {self.text('status')!r},"
                             f" log {self.page.locator('#log').inner_text()[-1500:]!r}")

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


@pytest.fixture
def open_page(tmp_path: Path) -> Iterator[Callable[[ServerProc, Path], Page]]:
    pages: list[Page] = []

    def make(srv: ServerProc, wav: Path) -> Page:
        pages.append(Page(f"http://127.0.0.1:{srv.port}/", wav))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def test_the_page_hears_a_spoken_sentence_and_plays_the_answer(secured: ServerProc, tmp_path: Path,
                                                               speak: Callable[[str], np.ndarray],
                                                               open_page: Callable[[ServerProc, Path], Page]) -> None:
    wav = write_wav(tmp_path / "speech.wav", [silence(1.0), speak(SENTENCE), silence(30.0)])
    console = open_page(secured, wav)
    assert console.response is not None and console.response.status == 200
    headers: dict[str, Any] = console.response.headers
    assert "connect-src 'self'" in headers["content-security-policy"]
    console.page.fill("#token", TOKEN)
    console.page.click("#connect")
    console.wait(lambda: bool(console.text("transcript")), "the transcript")
    heard = console.text("transcript")
    assert wer(SENTENCE, heard) <= 0.3, heard
    console.wait(lambda: console.number("turns") >= 1, "a turn answered")
    assert console.text("answer"), "no answer text shown"
    assert console.number("audio-bytes") >= 24000 * 2 // 2, "less than half a second of answer audio"
    latency = console.attr("#latency", "data-ms")
    assert latency is not None and int(latency) > 0
    assert console.attr("body", "data-state") in ("listening", "answering")
    assert not console.errors, console.errors
    # Kept out of the repository unless asked: the committed screenshot changes only when it is remade.
    shot = SCREENSHOT if os.environ.get("LOCAL_UPDATE_SCREENSHOT") else tmp_path / "console.png"
    console.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_a_wrong_token_is_refused_at_the_handshake(secured: ServerProc, tmp_path: Path,
                                                   open_page: Callable[[ServerProc, Path], Page]) -> None:
    console = open_page(secured, write_wav(tmp_path / "quiet.wav", [silence(2.0)]))
    console.page.fill("#token", "wrong")
    console.page.click("#connect")
    console.wait(lambda: console.attr("body", "data-state") == "error", "the refusal")
    assert "wrong token" in console.text("status")
    assert any(e.get("event") == "auth.failed" for e in secured.log_events())
    assert TOKEN not in secured.logs() and "openai-insecure-api-key" not in secured.logs()


def test_speaking_over_the_answer_interrupts_it(open_server: ServerProc, tmp_path: Path,
                                                speak: Callable[[str], np.ndarray],
                                                open_page: Callable[[ServerProc, Path], Page]) -> None:
    """Barge-in by speaking: a long answer is playing when the caller speaks again; the page stops it."""
    long_ask = "Please tell me a very long story about a dragon and a knight."
    wav = write_wav(tmp_path / "barge.wav", [silence(1.0), speak(long_ask), silence(8.0), speak(SENTENCE),
                                             silence(30.0)])
    console = open_page(open_server, wav)
    console.page.click("#connect")
    # The page stopped the answer it was playing when the caller spoke (its barge-in counter). Whether the
    # server also had a response to cancel depends on whether it had finished generating the answer
    # before the interruption (the audio plays for longer than it takes to make): the server-side cancel
    # is tested in test_realtime.py, where the client speaks while the response is still running.
    console.wait(lambda: console.number("barge-ins") >= 1, "a barge-in")
    log_text = console.text("log")
    assert "input_audio_buffer.speech_started" in log_text, log_text[-2000:]
    # The interruption is heard and answered in its turn.
    console.wait(lambda: console.page.locator("#history li").count() >= 2 and console.number("turns") >= 1,
                 "the interruption answered")
    heard = console.text("transcript")
    assert wer(SENTENCE, heard) <= 0.3, heard
    assert not console.errors, console.errors
