"""llama-cpp-python's own OpenAI-compatible server as a subprocess: the remote LLM engine of tests and benches.

`python -m llama_cpp.server` on a free port with the embedded GGUF; our server points at it with
`remote_env`. Used by tests/e2e (test_remote_llm, test_scale_out) and bench/capacity.py, as harness.py is
(its dependencies are in the `test` extra).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .harness import free_port
from .threads import thread_env

ALIAS = "smol"  # the model name the engine serves (--model_alias)


class Engine:
    """llama_cpp.server on one port, started, killed and restarted there (so our server's URL stays)."""

    def __init__(self, model: Path, log_dir: Path, api_key: str | None = None, *, threads: int = 1,
                 n_ctx: int = 4096, batch: int | None = None) -> None:
        self.model, self.port, self.api_key = model, free_port(), api_key
        self.threads, self.n_ctx, self.batch = threads, n_ctx, batch
        self.log_path = log_dir / f"engine-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The engine process while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def command(self) -> list[str]:
        """The engine's command line."""
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
               "--n_ctx", str(self.n_ctx), "--model_alias", ALIAS,
               # Else any second request (a voice turn's early guess) ends the answer streaming (README).
               "--interrupt_requests", "False"]
        if self.batch:
            cmd += ["--n_batch", str(self.batch)]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        return cmd

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until `GET /models` answers; raises RuntimeError with its log otherwise."""
        # The thread environment of our own LLM workers (GOMP_SPINCOUNT), so the two backends compare.
        env = dict(thread_env({**os.environ, "PYTHONUNBUFFERED": "1"}))
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(self.command(), stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited ({self.proc.returncode}):\n{self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{self.url}/models", headers=headers),
                                            timeout=1):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"engine not up in {timeout}s:\n{self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL (a crash, as far as our server can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """Its output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def remote_env(url: str, **extra: str) -> dict[str, str]:
    """Our server on the remote backend at `url`; the local GGUF path points nowhere: none is needed."""
    return {"LOCAL_LLM_BACKEND": "openai", "LOCAL_LLM_REMOTE_URL": url, "LOCAL_LLM_REMOTE_MODEL": ALIAS,
            "LOCAL_LLM_MODEL_PATH": "/nonexistent/none.gguf", **extra}
