"""download() and fetch_tier's URL path against a real local HTTP server that injects faults."""

from __future__ import annotations

import errno
import io
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from local_ai_server.setup.download import DownloadError, apply_mirror, download, progress_printer
from local_ai_server.setup.fetch import DISK_MARGIN_BYTES, DiskSpaceError, fetch_tier
from local_ai_server.setup.registry import parse_registry
from tests.installer_fixtures import LAYOUT, MEMBERS, Fault, FaultServer, registry_doc, sha256

# Deterministic bytes: a failure reproduces with the same offsets every run.
DATA = random.Random(1234).randbytes(200_000)
DATA_SHA = sha256(DATA)
CHUNK = 16 * 1024


class Sleeps:
    """Records backoff delays instead of sleeping, so retries cost no wall time."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def get(urls: list[str], dest: Path, sleeps: Sleeps | None = None, **kw: Any) -> Path:
    """download() of DATA with test-friendly defaults (small chunks, no real backoff)."""
    opts: dict[str, Any] = {"size": len(DATA), "sha256": DATA_SHA, "chunk": CHUNK, "backoff_s": 0.01,
                            "stall_timeout_s": 2.0, "sleep": sleeps or Sleeps()}
    opts.update(kw)
    return download(urls, dest, **opts)


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def reached(n: int, event: threading.Event) -> Any:
    """A progress callback that sets `event` once `n` bytes are on disk."""

    def progress(done: int, total: int | None, speed: float, eta: float | None) -> None:
        if done >= n:
            event.set()

    return progress


def test_dropped_connection_resumes_on_same_url(fault_server: FaultServer, tmp_path: Path) -> None:
    read = threading.Event()
    url = fault_server.add("/f.bin", DATA, Fault(drop_after=50_000, wait=read))
    dest = tmp_path / "f.bin"
    sleeps = Sleeps()

    assert get([url], dest, sleeps, progress=reached(50_000, read)) == dest

    assert dest.read_bytes() == DATA
    assert not part_of(dest).exists()
    first, second = fault_server.requests("/f.bin")
    assert first.range is None and second.range == "bytes=50000-" and second.status == 206
    # Resumed, not restarted: the file crossed the wire once.
    assert fault_server.bytes_sent("/f.bin") == len(DATA)
    assert sleeps.delays == [0.01]


def test_wrong_hash_is_rejected_and_leaves_nothing(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    wrong = "0" * 64

    with pytest.raises(DownloadError) as info:
        get([url], dest, sha256=wrong, label="llm/x.gguf")

    assert str(info.value) == f"sha256 mismatch for llm/x.gguf: expected {wrong}, got {DATA_SHA}"
    assert not dest.exists() and not part_of(dest).exists()


def test_truncated_body_is_resumed_not_accepted(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA, Fault(truncate_after=70_000))
    dest = tmp_path / "f.bin"

    get([url], dest)

    assert dest.read_bytes() == DATA
    assert [r.range for r in fault_server.requests("/f.bin")] == [None, "bytes=70000-"]
    assert fault_server.bytes_sent("/f.bin") == len(DATA)


def test_server_ignoring_range_restarts_from_zero(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA, Fault(ignore_range=True))
    dest = tmp_path / "f.bin"
    part_of(dest).write_bytes(DATA[:80_000])

    get([url], dest)

    assert dest.read_bytes() == DATA
    (only,) = fault_server.requests("/f.bin")
    assert only.range == "bytes=80000-" and only.status == 200
    assert not part_of(dest).exists()


def test_404_on_first_mirror_moves_to_next_url(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    sleeps = Sleeps()

    get([fault_server.url("/gone.bin"), url], dest, sleeps)

    assert dest.read_bytes() == DATA
    assert [r.status for r in fault_server.requests()] == [404, 200]
    assert sleeps.delays == []  # a 404 is an answer, not a hiccup: no retry, no backoff


def test_server_errors_are_retried_with_exponential_backoff(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA, Fault(status=500), Fault(status=503))
    dest = tmp_path / "f.bin"
    sleeps = Sleeps()

    get([url], dest, sleeps)

    assert dest.read_bytes() == DATA
    assert [r.status for r in fault_server.requests("/f.bin")] == [500, 503, 200]
    assert sleeps.delays == [0.01, 0.02]


def test_persistent_failure_gives_up_and_keeps_progress(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA, Fault(truncate_after=30_000), *[Fault(status=500)] * 3)
    dest = tmp_path / "f.bin"
    sleeps = Sleeps()

    with pytest.raises(DownloadError, match=r"HTTP 500 .*gave up after 3 attempts.*30000 bytes kept"):
        get([url], dest, sleeps, retries=2)

    # The truncated attempt made progress (counted as the first failure), then two 500s in a row.
    assert sleeps.delays == [0.01, 0.02]
    assert not dest.exists()
    assert part_of(dest).read_bytes() == DATA[:30_000]  # the next run resumes from here


def test_stall_is_detected_and_resumed(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA, Fault(stall_after=60_000, stall_s=5.0))
    dest = tmp_path / "f.bin"
    started = time.monotonic()

    get([url], dest, stall_timeout_s=0.5)

    assert time.monotonic() - started < 3.0  # gave up on the silent server, did not wait it out
    assert dest.read_bytes() == DATA
    assert [r.range for r in fault_server.requests("/f.bin")] == [None, "bytes=60000-"]


@pytest.mark.parametrize("no_length", [False, True], ids=["announced", "streamed"])
def test_more_than_size_is_aborted(fault_server: FaultServer, tmp_path: Path, no_length: bool) -> None:
    # Announced: Content-Length says too much, refused before a byte is written. Streamed: no
    # length, so the cut happens while reading; either way nothing is left behind.
    url = fault_server.add("/f.bin", DATA, Fault(body=DATA + b"x" * 50_000, no_length=no_length))
    dest = tmp_path / "f.bin"

    with pytest.raises(DownloadError, match="more than the expected 200000 bytes"):
        get([url], dest, retries=0)

    assert not dest.exists() and not part_of(dest).exists()
    assert len(fault_server.requests("/f.bin")) == 1


def test_leftover_part_is_resumed_with_range(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    part_of(dest).write_bytes(DATA[:100_000])
    seen: list[tuple[int, int | None]] = []

    get([url], dest, progress=lambda done, total, speed, eta: seen.append((done, total)))

    assert dest.read_bytes() == DATA
    (only,) = fault_server.requests("/f.bin")
    assert only.range == "bytes=100000-" and only.status == 206
    assert fault_server.bytes_sent("/f.bin") == 100_000
    assert seen[0][0] > 100_000 and seen[-1] == (len(DATA), len(DATA))


def test_leftover_part_with_wrong_bytes_is_rejected(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    part_of(dest).write_bytes(b"\0" * 100_000)  # a part from another version of the file

    with pytest.raises(DownloadError, match="sha256 mismatch"):
        get([url], dest)
    # The bad part is gone, so the next run starts clean and succeeds.
    assert not part_of(dest).exists()
    get([url], dest)
    assert dest.read_bytes() == DATA


def test_complete_part_needs_no_request(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    part_of(dest).write_bytes(DATA)

    get([url], dest)

    assert dest.read_bytes() == DATA
    assert fault_server.requests() == []


def test_416_for_a_complete_part_goes_to_verification(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    part_of(dest).write_bytes(DATA)

    get([url], dest, size=None)  # size unknown: only the server's 416 says the part is whole

    assert dest.read_bytes() == DATA
    assert [(r.range, r.status) for r in fault_server.requests()] == [("bytes=200000-", 416)]


class FullDisk(io.FileIO):
    """A .part writer whose filesystem fills up after `limit` bytes written through it."""

    limit = 90_000

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__(path, mode)
        self.written = 0

    def write(self, data: Any) -> int:
        room = self.limit - self.written
        if len(data) > room:
            self.written += super().write(bytes(data[:room]))
            raise OSError(errno.ENOSPC, "No space left on device")
        n = super().write(data)
        self.written += n or 0
        return n or 0


def test_full_disk_is_a_clear_error_and_resumable(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    dest = tmp_path / "f.bin"
    sleeps = Sleeps()

    with pytest.raises(DownloadError, match="no space left on device while writing models/f.bin"):
        get([url, url], dest, sleeps, label="models/f.bin", open_part=FullDisk)

    assert not dest.exists()
    assert sleeps.delays == [] and len(fault_server.requests()) == 1  # local, so not retried
    kept = part_of(dest).read_bytes()
    assert kept == DATA[: len(kept)] and 0 < len(kept) <= FullDisk.limit

    get([url], dest)  # space freed: the next run resumes
    assert dest.read_bytes() == DATA
    assert fault_server.requests()[-1].range == f"bytes={len(kept)}-"


def test_progress_reports_speed_and_eta(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("/f.bin", DATA)
    calls: list[tuple[int, int | None, float, float | None]] = []

    get([url], tmp_path / "f.bin", progress=lambda *a: calls.append(a))

    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and dones[-1] == len(DATA)
    assert all(c[1] == len(DATA) and c[2] >= 0 for c in calls)
    assert calls[-1][3] == 0.0


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_printer_tty_bar_and_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("local_ai_server.setup.download.time.monotonic", lambda: clock[0])

    tty = Tty()
    show = progress_printer(tty)
    for i in range(1, 101):
        clock[0] += 1.0
        show(i * 1_000_000, 100_000_000, 2_000_000.0, (100 - i) / 2)
    text = tty.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and text.count("\n") == 1
    assert "2.0 MB/s" in text and "ETA 0:25" in text and "100.0% 100.0/100.0 MB" in text

    plain = io.StringIO()
    show = progress_printer(plain)
    for i in range(1, 1001):
        clock[0] += 0.01
        show(i * 100_000, 100_000_000, 2_000_000.0, 1.0)
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    assert 20 <= len(lines) <= 22  # about one line per 5 %
    assert lines[-1].startswith("100.0%")


def test_apply_mirror() -> None:
    hf = "https://huggingface.co/org/repo/resolve/abc123/model.gguf?download=true"
    assert apply_mirror(hf, "https://hf-mirror.example") == (
        "https://hf-mirror.example/org/repo/resolve/abc123/model.gguf?download=true")
    assert apply_mirror(hf, "http://proxy.lan:8080/hf/").startswith("http://proxy.lan:8080/hf/org/repo/")
    other = "https://github.com/x/y/releases/download/v1/m.onnx"
    assert apply_mirror(other, "https://hf-mirror.example") == other
    with pytest.raises(DownloadError, match="mirror must be an http"):
        apply_mirror(hf, "hf-mirror.example")


# --- fetch_tier's URL path ---------------------------------------------------------------------


def quiet(event: str, **fields: object) -> None:
    """A fetch log sink that drops everything."""


def url_registry_doc(server: FaultServer, url_for: Any = None) -> dict[str, Any]:
    """The tiny registry with every file served by `server` over plain URLs."""
    doc = registry_doc("ab" * 32)
    for model in doc["models"].values():
        for f in model["files"]:
            data = MEMBERS[LAYOUT[f["path"]]]
            server.add(f"/raw/{f['path']}", data)
            f["sources"] = [{"kind": "url", "url": url_for(f["path"]) if url_for else server.url(f"/raw/{f['path']}")}]
    return doc


def test_fetch_tier_disk_preflight_counts_a_resumed_part(fault_server: FaultServer, tmp_path: Path) -> None:
    registry = parse_registry(url_registry_doc(fault_server))
    models = tmp_path / "models"
    gguf = MEMBERS[LAYOUT["llm/tiny.gguf"]]
    part_of(models / "llm/tiny.gguf").parent.mkdir(parents=True)
    part_of(models / "llm/tiny.gguf").write_bytes(gguf[:4000])
    needed = sum(len(MEMBERS[m]) for m in LAYOUT.values()) - 4000 + DISK_MARGIN_BYTES

    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        fetch_tier(registry, "tiny", models, log=quiet, disk_free=lambda p: needed - 1)
    assert fault_server.requests() == []  # refused before any download

    fetch_tier(registry, "tiny", models, log=quiet, disk_free=lambda p: needed)
    assert (models / "llm/tiny.gguf").read_bytes() == gguf
    assert fault_server.requests("/raw/llm/tiny.gguf")[0].range == "bytes=4000-"
    assert not list(models.rglob("*.part"))


def test_fetch_tier_tries_the_mirror_first(fault_server: FaultServer, tmp_path: Path) -> None:
    # Registry URLs point at huggingface.co; only the mirror (the local server) can answer, so
    # success proves every file came through it and the internet was never touched.
    doc = url_registry_doc(fault_server, lambda path: f"https://huggingface.co/org/tiny/resolve/main/{path}")
    for path in LAYOUT:
        fault_server.add(f"/hf/org/tiny/resolve/main/{path}", MEMBERS[LAYOUT[path]])
    registry = parse_registry(doc)
    models = tmp_path / "models"
    seen: list[int] = []

    fetch_tier(registry, "tiny", models, log=quiet, mirror=fault_server.url("/hf/"),
               progress=lambda done, total, speed, eta: seen.append(done))

    for path, member in LAYOUT.items():
        assert (models / path).read_bytes() == MEMBERS[member]
    assert len(fault_server.requests()) == len(LAYOUT)
    assert seen  # progress was forwarded to the downloader


def test_two_concurrent_fetches_end_with_one_verified_copy(fault_server: FaultServer, tmp_path: Path) -> None:
    registry = parse_registry(url_registry_doc(fault_server))
    models = tmp_path / "models"
    second_waits = threading.Event()
    events: dict[str, list[tuple[str, dict[str, object]]]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            fetch_tier(registry, "tiny", models, log=log_for(name))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    second = threading.Thread(target=run, args=("b",))

    def log_for(name: str) -> Any:
        def log(event: str, **fields: object) -> None:
            events[name].append((event, fields))
            if name == "b" and event == "fetch.waiting":
                second_waits.set()
            if name == "a" and event == "fetch.file" and not second.is_alive():
                # The first run holds the lock now: start the second and let it block on it.
                second.start()
                assert second_waits.wait(10), "second run never waited for the lock"

        return log

    first = threading.Thread(target=run, args=("a",))
    first.start()
    first.join(15)
    second.join(15)

    assert errors == []
    for path, member in LAYOUT.items():
        assert (models / path).read_bytes() == MEMBERS[member]
        assert len(fault_server.requests(f"/raw/{path}")) == 1  # downloaded once, by the first run
    assert not list(models.rglob("*.part"))
    names_b = [e for e, _ in events["b"]]
    assert "fetch.waiting" in names_b and "fetch.file" not in names_b
    assert [f.get("by") for e, f in events["b"] if e == "fetch.present"] == ["another run"] * len(LAYOUT)
