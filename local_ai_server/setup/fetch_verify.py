"""Verified bytes: hash a file, check installed files against the registry, write a stream only once it verifies."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO

from local_ai_server.setup.download import fsync_dir
from local_ai_server.setup.fetch_common import FetchError
from local_ai_server.setup.registry import ModelFile, Registry

CHUNK_BYTES = 1 << 20


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


def verify_tier(registry: Registry, tier: str, models_dir: Path) -> list[str]:
    """Re-hash every installed file of `tier`; an empty list means everything verifies."""
    root = Path(models_dir)
    problems = []
    for f in registry.tier_files(tier):
        problem = check_file(root / f.path, f)
        if problem:
            problems.append(problem)
    return problems


def write_verified(stream: IO[bytes], f: ModelFile, final: Path) -> None:
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


