"""One file's download across attempts and URLs: the .part, its running hash, resume, and HTTP answers.

Each answer means: go on, retry this URL (Retry), try the next URL (NextUrl), or fail (DownloadError).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from local_ai_server.setup.download_progress import ProgressFn, Speed
from local_ai_server.setup.registry import SetupError

USER_AGENT = "local-ai-server-model-setup/1"
# Statuses worth retrying on the same URL; any other 4xx is the URL's final answer.
_RETRY_STATUSES = frozenset({408, 425, 429})
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)

OpenPart = Callable[[Path, str], IO[bytes]]


class DownloadError(SetupError):
    """A file could not be downloaded from any of its URLs, or did not verify."""


class Retry(Exception):
    """Raised by Job, handled by download(): this attempt failed in a way worth retrying on the same URL (resuming)."""


class NextUrl(Exception):
    """Raised by Job, handled by download(): this URL will not serve the file; move on to the next one."""


class Job:
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
        self._speed = Speed()
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
            raise Retry(_describe(exc)) from None
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
            raise Retry(f"HTTP 416 for a resume at byte {at}; restarting from zero")
        if code >= 500 or code in _RETRY_STATUSES:
            raise Retry(f"HTTP {code} {reason}")
        raise NextUrl(f"HTTP {code} {reason}")

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
                raise Retry(f"bad Content-Range {got!r} for a resume; restarting from zero")
            total = None if match.group(3) == "*" else int(match.group(3))
            span = int(match.group(2)) - int(match.group(1)) + 1
            self._check_total(total)
            return span if length is None else length
        if response.status not in (200, 206):
            raise NextUrl(f"unexpected HTTP {response.status} {response.reason}")
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
            raise NextUrl(f"server has {total} bytes, {what} the expected {self.size} bytes")
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
                    raise Retry(f"connection failed after {got} bytes: {_describe(exc)}") from None
                if not block:
                    break
                if self.size is not None and self.offset + len(block) > self.size:
                    out.close()
                    self._reset()
                    # Cut off rather than fill the disk with a wrong (or hostile) oversized stream.
                    raise NextUrl(f"server sent more than the expected {self.size} bytes; discarded")
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
            raise Retry(f"connection closed after {got} of {expected} bytes")
        if self.size is not None and self.offset < self.size:
            raise Retry(f"server sent {self.offset} of {self.size} bytes")

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"connection failed: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "stalled: no data before the timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def open_file(path: Path, mode: str) -> IO[bytes]:
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
