"""llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`) as the real LLM engine of
the remote-backend tests, and the environment that points our server at it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from local_ai_server.harness import free_port

ALIAS = "smol"


class Engine:
    """llama_cpp.server on one port, started, killed and restarted there (so our server's URL stays)."""

    def __init__(self, model: Path, log_dir: Path, api_key: str | None = None) -> None:
        self.model, self.port, self.api_key = model, free_port(), api_key
        self.log_path = log_dir / f"engine-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60) -> None:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_threads", "1", "--n_ctx", "4096", "--model_alias", ALIAS,
               # Else any second request (a voice turn's early guess) ends the answer streaming (README).
               "--interrupt_requests", "False"]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"engine exited:\n{self.log()[-2000:]}"
            try:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                with urllib.request.urlopen(urllib.request.Request(f"{self.url}/models", headers=headers),
                                            timeout=1):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise AssertionError(f"engine not up in {timeout}s:\n{self.log()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""



def remote_env(url: str, **extra: str) -> dict[str, str]:
    """Our server on the remote backend; the local GGUF path points nowhere: none is needed."""
    return {"LOCAL_LLM_BACKEND": "openai", "LOCAL_LLM_REMOTE_URL": url, "LOCAL_LLM_REMOTE_MODEL": ALIAS,
            "LOCAL_LLM_REMOTE_PROBE_S": "0.5", "LOCAL_LLM_MODEL_PATH": "/nonexistent/none.gguf",
            "LOCAL_LLM_MAX_TOKENS": "1500", "LOCAL_LLM_TEMPERATURE": "0", "LOCAL_LLM_REPEAT_PENALTY": "1.0",
            **extra}
