"""The processes a benchmark starts and what they cost: servers, helpers, RSS, CPU time, outside load."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stats import progress, rnd  # noqa: E402

from local_ai_server.harness import ServerProc as Server  # noqa: E402
from local_ai_server.harness import descendants  # noqa: E402
from local_ai_server.harness import start_server as harness_start  # noqa: E402


def rss_mb(pid: int) -> float | None:
    """VmRSS of one process in MB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


_SERVERS: list[Server] = []


_CHILDREN: list[subprocess.Popen[Any]] = []  # other subprocesses in flight (bare llama-cpp-python runs)


def interrupt_children() -> None:
    """On a signal: kill helper processes and ask servers to stop, so no blocking thread waits on them."""
    for proc in tuple(_CHILDREN):  # a copy: a worker thread may remove its entry meanwhile
        with contextlib.suppress(OSError):
            proc.kill()
    for srv in _SERVERS:
        if srv.proc.poll() is None:
            srv.remember_children()
            with contextlib.suppress(OSError):
                srv.proc.send_signal(signal.SIGTERM)


def start_server(name: str, tmp: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    """Start the server (local_ai_server.harness) on a free port; time port-open and /ready from Popen."""
    srv = harness_start(tmp, ROOT / "models", env=env, wait="none", name=name, cwd=ROOT)
    _SERVERS.append(srv)  # registered before the wait, so a signal meanwhile stops it too
    srv.wait_listening(timeout)
    srv.wait_ready(max(1.0, timeout - (srv.port_open_s or 0.0)))
    return srv


def stop_all_servers() -> None:
    for srv in _SERVERS:
        try:
            code = srv.stop(20, reap=True)
            progress(f"server {srv.name} stopped (exit code {code})")
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            progress(f"stopping server {srv.name} failed: {exc!r}")


# A pair counts as clean when processes outside this benchmark used under this many cores meanwhile.
CLEAN_EXTERNAL_CORES = 0.15


def system_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_tree_seconds() -> dict[int, float]:
    """CPU seconds of this process and every process it started (servers, workers, bare llama)."""
    out = {}
    for pid in [os.getpid(), *descendants(os.getpid())]:
        cpu = cpu_seconds(pid)
        if cpu is not None:
            out[pid] = cpu
    return out


async def with_cpu_share(pid: int | None, threads: int, aw: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await a decode run; add the CPU it got and what else ran meanwhile.

    cpu_share: the decoding process's cpu seconds / (wall seconds x threads).
    other_own_cores: cores used by the rest of this benchmark's process tree (client, server main process).
    external_cores: cores used by processes outside this benchmark (other work on the machine).
    """
    sys0, own0 = system_busy_seconds(), own_tree_seconds()
    t0 = time.perf_counter()
    out = await aw
    wall = time.perf_counter() - t0
    sys1, own1 = system_busy_seconds(), own_tree_seconds()
    own = sum(v - own0.get(k, 0.0) for k, v in own1.items())
    mine = (own1.get(pid, 0.0) - own0.get(pid, 0.0)) if pid else 0.0
    out["cpu_share"] = rnd(mine / (wall * threads), 2) if pid in own1 and wall > 0 else None
    out["other_own_cores"] = rnd((own - mine) / wall, 2) if wall > 0 else None
    out["external_cores"] = (rnd(max(0.0, (sys1 - sys0 - own) / wall), 2)
                             if sys0 is not None and sys1 is not None and wall > 0 else None)
    return out


def split_cores(own0: dict[int, float], own1: dict[int, float], groups: dict[str, set[int]],
                busy_s: float | None, wall_s: float) -> dict[str, float | None]:
    """Cores each group of processes used over a window (CPU seconds from two `own_tree_seconds` snapshots).

    `groups` maps a name to its pids; what the rest of the benchmark's tree used is `other_own`, and `outside`
    is what processes outside the benchmark used (`busy_s`: all cores' busy seconds over the window).
    """
    if wall_s <= 0:
        return {k: None for k in [*groups, "other_own", "outside"]}
    used = {pid: max(0.0, v - own0.get(pid, 0.0)) for pid, v in own1.items()}
    out: dict[str, float | None] = {}
    claimed: set[int] = set()
    for name, pids in groups.items():
        out[name] = round(sum(used.get(p, 0.0) for p in pids - claimed) / wall_s, 3)
        claimed |= pids
    out["other_own"] = round(sum(v for p, v in used.items() if p not in claimed) / wall_s, 3)
    out["outside"] = None if busy_s is None else round(max(0.0, busy_s - sum(used.values())) / wall_s, 3)
    return out


class CpuWindow:
    """Cores used between start() and stop(): the server's main process, its children (LLM workers), an engine,
    this client process, the rest of the benchmark, and processes outside it."""

    def __init__(self, server_pid: int, engine_pid: int | None = None) -> None:
        self.server_pid, self.engine_pid = server_pid, engine_pid
        self._t0 = 0.0
        self._sys0: float | None = None
        self._own0: dict[int, float] = {}

    def start(self) -> None:
        self._t0, self._sys0, self._own0 = time.perf_counter(), system_busy_seconds(), own_tree_seconds()

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self._t0
        sys1, own1 = system_busy_seconds(), own_tree_seconds()
        engine = {self.engine_pid, *descendants(self.engine_pid)} if self.engine_pid else set()
        groups = {"server_main": {self.server_pid}, "llm_workers": set(descendants(self.server_pid)),
                  "engine": engine, "client": {os.getpid()}}
        busy = None if sys1 is None or self._sys0 is None else sys1 - self._sys0
        out = split_cores(self._own0, own1, groups, busy, wall)
        if not self.engine_pid:
            out["engine"] = None
        out["wall_s"] = round(wall, 1)
        return out
