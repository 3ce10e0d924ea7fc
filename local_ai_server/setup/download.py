"""Resumable, verified HTTP download of one file from a list of mirror URLs (stdlib only)."""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TextIO
from urllib.parse import urlsplit

from local_ai_server.setup.registry import SetupError

USER_AGENT = "local-ai-server-model-setup/1"
HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
# Speed is averaged over this window: long enough to smooth bursts, short enough to track changes.
SPEED_WINDOW_S = 5.0
# Statuses worth retrying on the same URL; any other 4xx is the URL's final answer.
_RETRY_STATUSES = frozenset({408, 425, 429})
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)

# (done_bytes, total_bytes or None if unknown, speed in bytes/s, eta in s or None if unknown)
ProgressFn = Callable[[int, int | None, float, float | None], None]
OpenPart = Callable[[Path, str], IO[bytes]]


class DownloadError(SetupError):
    """A file could not be downloaded from any of its URLs, or did not verify."""


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying on the same URL (resuming)."""


class _NextUrl(Exception):
    """Internal: this URL will not serve the file; move on to the next one."""


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
    job = _Job(Path(dest), size, sha256, progress, chunk, stall_timeout_s, label, open_part or _open)
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
            except _NextUrl as exc:
                errors.append(f"{url}: {exc}")
                break
            except _Retry as exc:
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


class _Job:
    """State of one file's download across attempts and URLs: the .part, its hash and its length."""

    def __init__(
        self, dest: Path, size: int | None, sha256: str | None, progress: ProgressFn | None,
        chunk: int, stall_timeout_s: float, label: str | None, open_part: OpenPart,
    ) -> None:
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part")
        self.size = size
        self.sha256 = sha256
        self.total = size
        self.label = label or dest.name
        self._progress = progress
        self._chunk = chunk
        self._timeout = stall_timeout_s
        self._open = open_part
        self._speed = _Speed()
        self.digest = hashlib.sha256()
        self.offset = 0
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(f"cannot create {dest.parent}: {exc}") from None
        self._adopt_part()

    def _adopt_part(self) -> None:
        """Hash an existing .part so a resumed download still verifies the whole file."""
        try:
            have = self.part.stat().st_size
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DownloadError(f"cannot read {self.part}: {exc}") from None
        if self.size is not None and have > self.size:
            # Longer than the file can be: not a prefix of it, so nothing to resume.
            self._reset()
            return
        try:
            with open(self.part, "rb") as fh:
                while block := fh.read(1 << 20):
                    self.digest.update(block)
        except OSError as exc:
            raise DownloadError(f"cannot read {self.part}: {exc}") from None
        self.offset = have

    def _reset(self) -> None:
        self.part.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.offset = 0

    def complete(self) -> bool:
        """True when the .part already holds every expected byte."""
        return self.size is not None and self.offset == self.size

    def attempt(self, url: str) -> None:
        """One HTTP request: append what the server sends to the .part; return once it is complete."""
        if self.complete():
            return
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            # The timeout bounds every socket read, so it is also the stall detector.
            response = urllib.request.urlopen(request, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            self._http_error(exc.code, exc.reason, exc.headers.get("Content-Range", "") if exc.headers else "")
            return
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _Retry(_describe(exc)) from None
        with response:
            expected = self._accept(response)
            self._receive(response, expected)

    def _http_error(self, code: int, reason: object, content_range: str) -> None:
        if code == 416 and self.offset:
            match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", content_range)
            if match and int(match.group(1)) == self.offset and self.size in (None, self.offset):
                # The part already holds the server's whole file; go straight to verification.
                self.size = self.total = self.offset
                return
            # The server says our offset is past its end: the part is not a prefix of its file.
            at = self.offset
            self._reset()
            raise _Retry(f"HTTP 416 for a resume at byte {at}; restarting from zero")
        if code >= 500 or code in _RETRY_STATUSES:
            raise _Retry(f"HTTP {code} {reason}")
        raise _NextUrl(f"HTTP {code} {reason}")

    def _accept(self, response: http.client.HTTPResponse) -> int | None:
        """Check status and headers against the .part; return how many body bytes to expect."""
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.strip().isdigit() else None
        if response.status == 206 and self.offset:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != self.offset:
                # Appending bytes from an unknown position would corrupt the file: start over.
                got = response.headers.get("Content-Range")
                self._reset()
                raise _Retry(f"bad Content-Range {got!r} for a resume; restarting from zero")
            total = None if match.group(3) == "*" else int(match.group(3))
            span = int(match.group(2)) - int(match.group(1)) + 1
            self._check_total(total)
            return span if length is None else length
        if response.status not in (200, 206):
            raise _NextUrl(f"unexpected HTTP {response.status} {response.reason}")
        self._check_total(length)
        if self.offset:
            # The server ignored Range and sends the whole file: take it, drop the old part.
            self._reset()
        return length

    def _check_total(self, total: int | None) -> None:
        if total is None:
            return
        if self.size is not None and total != self.size:
            what = "more than" if total > self.size else "fewer than"
            raise _NextUrl(f"server has {total} bytes, {what} the expected {self.size} bytes")
        self.total = total

    def _receive(self, response: http.client.HTTPResponse, expected: int | None) -> None:
        got = 0
        mode = "ab" if self.offset else "wb"
        try:
            out = self._open(self.part, mode)
        except OSError as exc:
            raise self._local_error(exc) from None
        with out:
            while True:
                try:
                    # read1 returns whatever has arrived, so progress and stall checks stay timely.
                    block = response.read1(self._chunk)
                except (http.client.HTTPException, OSError) as exc:
                    self._sync(out)
                    raise _Retry(f"connection failed after {got} bytes: {_describe(exc)}") from None
                if not block:
                    break
                if self.size is not None and self.offset + len(block) > self.size:
                    out.close()
                    self._reset()
                    # Cut off rather than fill the disk with a wrong (or hostile) oversized stream.
                    raise _NextUrl(f"server sent more than the expected {self.size} bytes; discarded")
                try:
                    out.write(block)
                except OSError as exc:
                    raise self._local_error(exc) from None
                self.digest.update(block)
                self.offset += len(block)
                got += len(block)
                self._report(len(block))
            self._sync(out)
        if expected is not None and got < expected:
            raise _Retry(f"connection closed after {got} of {expected} bytes")
        if self.size is not None and self.offset < self.size:
            raise _Retry(f"server sent {self.offset} of {self.size} bytes")

    def _sync(self, out: IO[bytes]) -> None:
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise self._local_error(exc) from None

    def _local_error(self, exc: OSError) -> DownloadError:
        # Local write failures are fatal, not retried: another URL would not help a full disk.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DownloadError(
                f"no space left on device while writing {self.label} ({self.part}); "
                f"{self.offset} bytes kept, free some space and re-run to resume"
            )
        return DownloadError(f"cannot write {self.part} for {self.label}: {exc}")

    def _report(self, new_bytes: int) -> None:
        speed = self._speed.add(new_bytes)
        if self._progress is None:
            return
        total = self.total
        eta = (total - self.offset) / speed if total is not None and speed > 0 else None
        self._progress(self.offset, total, speed, eta)

    def finish(self) -> None:
        """Verify the complete .part and move it to the final name; delete it if it is wrong."""
        if self.size is not None and self.offset != self.size:
            self._reset()
            raise DownloadError(f"size mismatch for {self.label}: expected {self.size} bytes, got {self.offset}")
        if not self.part.exists():
            # An empty body never opened the part; an empty file is still a file.
            self._open(self.part, "wb").close()
        got = self.digest.hexdigest()
        if self.sha256 is not None and got != self.sha256:
            self._reset()
            raise DownloadError(f"sha256 mismatch for {self.label}: expected {self.sha256}, got {got}")
        if self._progress is not None:
            self._progress(self.offset, self.offset, self._speed.rate(), 0.0)
        os.replace(self.part, self.dest)
        fsync_dir(self.dest.parent)


class _Speed:
    """Bytes per second over the last SPEED_WINDOW_S seconds of this run (resumed bytes excluded)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self._bytes = 0

    def add(self, n: int) -> float:
        """Record `n` new bytes now; return the current rate."""
        now = time.monotonic()
        self._samples.append((now, n))
        self._bytes += n
        while len(self._samples) > 1 and now - self._samples[0][0] > SPEED_WINDOW_S:
            self._bytes -= self._samples.popleft()[1]
        return self.rate(now)

    def rate(self, now: float | None = None) -> float:
        """The current rate; 0 until there are two samples to measure between."""
        if len(self._samples) < 2:
            return 0.0
        now = time.monotonic() if now is None else now
        elapsed = now - self._samples[0][0]
        # The first sample's bytes arrived before the window's start time, so they do not count.
        return (self._bytes - self._samples[0][1]) / elapsed if elapsed > 0 else 0.0


def progress_printer(stream: TextIO | None = None) -> ProgressFn:
    """A progress callback: a `\\r`-updated bar on a TTY, else a plain line every ~5 % or 10 s."""
    out = stream if stream is not None else sys.stderr
    tty = bool(getattr(out, "isatty", lambda: False)())
    state = {"last_done": -1, "last_time": 0.0, "last_pct": -1.0}

    def show(done: int, total: int | None, speed: float, eta: float | None) -> None:
        now = time.monotonic()
        if done < state["last_done"]:
            # A new file (or a restart from zero): start the throttling over.
            state.update(last_time=0.0, last_pct=-1.0)
        state["last_done"] = done
        finished = total is not None and done >= total
        pct = 100.0 * done / total if total else None
        if tty:
            if not finished and now - state["last_time"] < 0.1:
                return
            line = _bar(done, total, speed, eta, pct)
            out.write("\r" + line + ("\n" if finished else ""))
        else:
            step = pct is not None and pct - state["last_pct"] >= 5.0
            if not (finished or step or now - state["last_time"] >= 10.0):
                return
            if pct is not None:
                state["last_pct"] = pct - pct % 5.0
            out.write(_line(done, total, speed, eta, pct) + "\n")
        state["last_time"] = now
        out.flush()

    return show


def _bar(done: int, total: int | None, speed: float, eta: float | None, pct: float | None) -> str:
    width = 30
    filled = int(width * pct / 100) if pct is not None else 0
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {_line(done, total, speed, eta, pct)}"


def _line(done: int, total: int | None, speed: float, eta: float | None, pct: float | None) -> str:
    head = f"{pct:5.1f}% " if pct is not None else ""
    of = f"/{_mb(total)}" if total is not None else ""
    eta_text = f" ETA {_duration(eta)}" if eta is not None and not (total is not None and done >= total) else ""
    return f"{head}{_mb(done)}{of} MB {_mb(int(speed))} MB/s{eta_text}"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"connection failed: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "stalled: no data before the timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _open(path: Path, mode: str) -> IO[bytes]:
    return open(path, mode)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (best effort)."""
    # Makes the rename itself durable; not possible on every OS/filesystem, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
