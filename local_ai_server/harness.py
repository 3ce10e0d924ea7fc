"""Start the real server as a subprocess on a free port and watch it: shared by the tests and the benchmarks."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_exists(pid: int) -> bool:
    """True while `pid` exists, zombies included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie is not alive)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


@dataclass
class ServerProc:
    """A running server subprocess, how to reach it, and when it came up."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    token: str | None = None
    name: str = "server"
    popen_at: float = 0.0  # perf_counter at Popen
    port_open_s: float | None = None  # seconds from Popen until the port took a connection
    ready_s: float | None = None  # seconds from Popen until /ready said 200
    known_children: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def http(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        """GET a path on the server's HTTP side: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()

    def metrics(self) -> str:
        """The /metrics text."""
        return self.http("/metrics")[1].decode(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics (0 if absent)."""
        key = f"{name}{{{labels}}}" if labels else name
        return parse_metrics(self.metrics()).get(key, 0.0)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.logs()[-chars:]

    def log_events(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far."""
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server {self.name} exited early ({self.proc.returncode}):\n{self.tail()}")

    def wait_listening(self, timeout: float = 60) -> None:
        """Until the port takes a connection; records port_open_s."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self._check_running()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    self.port_open_s = time.perf_counter() - self.popen_at
                    return
            except OSError:
                time.sleep(0.005)
        raise RuntimeError(f"server {self.name}: port never opened in {timeout}s:\n{self.tail()}")

    def wait_ready(self, timeout: float = 120) -> None:
        """Until /ready says 200; records ready_s."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self._check_running()
            try:
                if self.http("/ready", timeout=2)[0] == 200:
                    self.ready_s = time.perf_counter() - self.popen_at
                    self.remember_children()
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server {self.name} not ready in {timeout}s:\n{self.tail()}")

    def wait_settled(self, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        """Until model loading is over (whatever its outcome): the /ready (status, body) then."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.http("/ready")
            ready = json.loads(body)
            if ready["status"] != "warming_up" or time.monotonic() > deadline:
                return status, ready
            time.sleep(0.1)

    def remember_children(self) -> None:
        """Record the server's descendants (LLM workers) so none can outlive it."""
        if self.proc.poll() is None:
            self.known_children.update(descendants(self.proc.pid))

    def stop(self, timeout: float = 15, *, reap: bool = False) -> int:
        """SIGTERM, wait, SIGKILL if needed: the exit code (negative: the signal that ended it).

        `reap`: then SIGKILL any worker it spawned that outlives it (a benchmark must leave nothing
        behind; a test that checks the server's own clean-up leaves it False, so the check can fail).
        """
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        if reap:
            deadline = time.monotonic() + 5
            leftover = [p for p in self.known_children if alive(p)]
            while leftover and time.monotonic() < deadline:
                time.sleep(0.1)
                leftover = [p for p in leftover if alive(p)]
            for pid in leftover:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        code = self.proc.returncode
        return -int(signal.SIGKILL) if code is None else int(code)


def server_env(port: int, models_dir: Path | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without LOCAL_* settings, plus a port, JSON logs, a short drain and `env`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_")}
    full.update({"LOCAL_WS_PORT": str(port), "LOCAL_WS_HOST": "127.0.0.1", "LOCAL_LOG_JSON": "1",
                 "LOCAL_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                 # A server stopped with a call still mid-turn drains within `stop`'s wait (tests of the
                 # drain itself set their own).
                 "LOCAL_DRAIN_NOTICE_S": "0.5", "LOCAL_DRAIN_TIMEOUT_S": "5",
                 # Tests and benchmarks load the box past its default call limit on purpose (27 STT
                 # sessions, 12 callers); the admission tests set their own.
                 "LOCAL_MAX_CALLS": "0"})
    if models_dir is not None:
        full["LOCAL_MODELS_DIR"] = str(models_dir)
    full.update(env or {})
    return full


def start_server(tmp: Path, models_dir: Path | None, *, env: dict[str, str] | None = None,
                 wait: str = "ready", name: str = "server", timeout: float = 120,
                 cwd: Path | None = None) -> ServerProc:
    """Start `python -m local_ai_server` on a free port, JSON logs to a file in `tmp`.

    `wait`: "ready" (until /ready is 200), "listening" (until the port opens) or "none".
    """
    from .setup.selection import repo_root  # a checkout runs its own package, as `python -m` from its root

    port = free_port()
    full_env = server_env(port, models_dir, env)
    log_path = tmp / f"server-{name}-{port}.log"
    with open(log_path, "wb") as fh:  # the child keeps its own descriptor for its whole life
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "local_ai_server"], cwd=str(cwd or repo_root() or tmp),
                                env=full_env, stdout=fh, stderr=subprocess.STDOUT)
    srv = ServerProc(proc=proc, port=port, log_path=log_path, token=full_env.get("LOCAL_WS_AUTH_TOKEN"),
                     name=name, popen_at=t0)
    try:
        if wait in ("ready", "listening"):
            srv.wait_listening(timeout)
        if wait == "ready":
            srv.wait_ready(max(1.0, timeout - (srv.port_open_s or 0.0)))
    except BaseException:
        srv.stop(5, reap=True)
        raise
    return srv
