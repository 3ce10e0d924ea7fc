"""verify's warm-up check: start the real server cold on the installed models and time it until /ready.

"Cold" means the model files are not in the page cache: each is dropped from it first (posix_fadvise
DONTNEED, this file's pages only, nothing else on the machine), so the server reads them from disk as after
a reboot. The server runs as `python -m local_ai_server` on a free loopback port (local_ai_server.harness),
with the installation record's settings, and is stopped (SIGTERM, its workers reaped) once it is ready.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 600.0


def drop_from_page_cache(paths: Iterable[Path]) -> list[str]:
    """Drop each file's cached pages; the files whose pages the OS would not drop (none on Linux)."""
    kept = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            kept.append(str(path))
            continue
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                kept.append(str(path))
        finally:
            os.close(fd)
    return kept


def resident_bytes(paths: Iterable[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux `fincore`), None where that cannot be told.

    Dropping only frees pages no process maps: another server running on the same files keeps them cached,
    and the start is then partly warm. This says by how much.
    """
    files = [str(p) for p in paths]
    if not files or shutil.which("fincore") is None:
        return None
    try:
        proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return sum(int(line) for line in proc.stdout.split()) if proc.returncode == 0 else None
    except ValueError:
        return None


def measure_cold_start(models_dir: Path, files: Iterable[Path], *, timeout_s: float = READY_TIMEOUT_S,
                       cwd: Path | None = None) -> dict[str, Any]:
    """Milliseconds from starting the server to its port opening and to /ready answering 200, files cold."""
    from local_ai_server.harness import start_server

    files = list(files)
    kept = drop_from_page_cache(files)
    resident = resident_bytes(files)
    with tempfile.TemporaryDirectory(prefix="verify-cold-") as tmp:
        srv = start_server(Path(tmp), Path(models_dir), wait="ready", name="verify-cold", timeout=timeout_s, cwd=cwd)
        try:
            port_ms = None if srv.port_open_s is None else round(srv.port_open_s * 1000)
            ready_ms = None if srv.ready_s is None else round(srv.ready_s * 1000)
        finally:
            srv.stop(20, reap=True)
    total = sum(p.stat().st_size for p in files if p.is_file())
    return {"ready_ms": ready_ms, "port_open_ms": port_ms, "page_cache_dropped": not kept, "cache_kept": kept,
            "files_mb": round(total / 1e6, 1),
            "still_cached_mb": None if resident is None else round(resident / 1e6, 1)}
