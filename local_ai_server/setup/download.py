"""Resumable, verified HTTP download of one file from a list of mirror URLs (stdlib only).

download() walks the URLs and retries with backoff; download_job holds one file's state across attempts,
download_progress reports the rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from local_ai_server.setup.download_job import (
    USER_AGENT,
    DownloadError,
    Job,
    NextUrl,
    OpenPart,
    Retry,
    fsync_dir,
    open_file,
)
from local_ai_server.setup.download_progress import ProgressFn, progress_printer

# The downloader's names, with those of its parts that callers import from here.
__all__ = [
    "HF_HOSTS", "USER_AGENT", "DownloadError", "OpenPart", "ProgressFn", "apply_mirror", "download", "fsync_dir",
    "progress_printer",
]

HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})


def apply_mirror(url: str, mirror: str) -> str:
    """Rewrite a `https://huggingface.co/...` URL onto the `mirror` base; other URLs come back unchanged."""
    base = urlsplit(mirror.strip())
    if base.scheme not in ("http", "https") or not base.netloc:
        raise DownloadError(f"mirror must be an http(s) URL such as https://hf-mirror.example, got {mirror!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or (parts.hostname or "").lower() not in HF_HOSTS:
        return url
    # A mirror may live under a path prefix (https://proxy.lan/hf/); keep it in front of the repo path.
    rewritten = mirror.strip().rstrip("/") + parts.path
    return rewritten + (f"?{parts.query}" if parts.query else "")


def download(
    urls: Sequence[str],
    dest: Path,
    *,
    size: int | None,
    sha256: str | None,
    progress: ProgressFn | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
    stall_timeout_s: float = 30.0,
    chunk: int = 1 << 20,
    label: str | None = None,
    open_part: OpenPart | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download `dest` from the first URL that serves it, resuming `<dest>.part`; verify, then rename.

    `retries` counts consecutive failed attempts per URL (an attempt that made progress resets
    it). `label` names the file in errors (default: the file name); `open_part` and `sleep` are
    hooks for tests (a writer that fills the disk, a clock that does not wait).
    """
    if not urls:
        raise DownloadError(f"no URL to download {label or dest.name} from")
    job = Job(Path(dest), size, sha256, progress, chunk, stall_timeout_s, label, open_part or open_file)
    errors: list[str] = []
    done = False
    for url in urls:
        failures = 0
        while True:
            before = job.offset
            try:
                job.attempt(url)
                done = True
                break
            except NextUrl as exc:
                errors.append(f"{url}: {exc}")
                break
            except Retry as exc:
                # Progress proves the URL works; only consecutive empty-handed attempts count.
                failures = 1 if job.offset > before else failures + 1
                if failures > retries:
                    errors.append(f"{url}: {exc} (gave up after {failures} attempts)")
                    break
                sleep(backoff_s * 2 ** (failures - 1))
        if done:
            break
    if not done:
        kept = f"; {job.offset} bytes kept in {job.part.name} for the next run" if job.offset else ""
        raise DownloadError(f"download of {job.label} failed: {'; '.join(errors)}{kept}")
    job.finish()
    return job.dest


