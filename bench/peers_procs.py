"""The reference side of bench/peers.py: its own venv, the reference Wyoming servers, wyoming-bench runs, load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from procs import own_tree_seconds, system_busy_seconds  # noqa: E402

# What is benchmarked against, pinned: a figure means something only against a known version.
PINS = {"wyoming-faster-whisper": "3.8.1", "wyoming-piper": "2.5.2", "wyoming-bench": "2026.10.0"}
# Libraries whose versions decide the figures on both sides (ours has the same ones): reported, not pinned.
LIBS = ("faster-whisper", "ctranslate2", "piper-tts", "onnxruntime", "wyoming")
# wyoming-bench stt's default --trailing-silence: appended on the wire to every recording.
STT_TRAILING_SILENCE_S = 0.5
VENV_DIR = Path.home() / ".cache" / "local-ai-server" / "peers-venv"

_VERSIONS_PY = ("import importlib.metadata as m, json, sys\n"
                "def v(p):\n"
                "    try:\n        return m.version(p)\n"
                "    except m.PackageNotFoundError:\n        return None\n"
                "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_versions(venv: Path) -> dict[str, str | None] | None:
    """The pinned packages' and the libraries' versions in `venv`; None if it has no working python."""
    py = venv_python(venv)
    if not py.exists():
        return None
    try:
        out = subprocess.run([str(py), "-c", _VERSIONS_PY, *PINS, *LIBS], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        versions: dict[str, str | None] = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return versions


def ensure_venv(venv: Path = VENV_DIR) -> tuple[dict[str, str | None], str, float]:
    """The side venv with the pinned reference packages: reused when its versions match, else (re)installed.

    Returns (versions, what was done, seconds it took). Never touches the venv this script runs in.
    """
    t0 = time.monotonic()
    own = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    if venv.resolve() in own:
        raise RuntimeError(f"refusing to install the reference servers into this interpreter's own env ({venv})")
    versions = venv_versions(venv)
    if versions is not None and all(versions.get(p) == v for p, v in PINS.items()):
        return versions, "reused", time.monotonic() - t0
    action = "updated"
    if versions is None:
        action = "created"
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    done = subprocess.run([*pip, *(f"{p}=={v}" for p, v in PINS.items())], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"pip install into {venv} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    versions = venv_versions(venv)
    if versions is None or any(versions.get(p) != v for p, v in PINS.items()):
        raise RuntimeError(f"{venv} still lacks the pinned versions after pip install: {versions}")
    return versions, action, time.monotonic() - t0


def piper_data_dir(voice_onnx: Path, dest: Path) -> None:
    """A wyoming-piper data dir holding only links to our voice (named by its stem), so none is downloaded.

    wyoming-piper looks for <data-dir>/<voice>.onnx and .onnx.json first and downloads a catalog voice only
    when one of them is missing or empty, so both links must resolve.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for src in (voice_onnx, Path(f"{voice_onnx}.json")):
        if not src.is_file() or src.stat().st_size == 0:
            raise FileNotFoundError(f"voice file missing: {src}")
        link = dest / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src.resolve())


def whisper_argv(venv: Path, port: int, model_dir: Path, data_dir: Path, *, threads: int,
                 beam_size: int | None) -> list[str]:
    """wyoming-faster-whisper on our CTranslate2 model dir; beam_size None: its own default (5 on x86)."""
    argv = [str(venv / "bin" / "wyoming-faster-whisper"), "--uri", f"tcp://127.0.0.1:{port}",
            "--model", str(model_dir), "--data-dir", str(data_dir), "--local-files-only",
            "--stt-library", "faster-whisper", "--device", "cpu", "--compute-type", "int8",
            "--cpu-threads", str(threads), "--language", "en"]
    if beam_size is not None:
        argv += ["--beam-size", str(beam_size)]
    return argv


def piper_argv(venv: Path, port: int, voice: str, data_dir: Path) -> list[str]:
    """wyoming-piper as shipped (streaming on, 1024 samples per chunk), on our voice file."""
    return [str(venv / "bin" / "wyoming-piper"), "--uri", f"tcp://127.0.0.1:{port}", "--voice", voice,
            "--data-dir", str(data_dir)]


@dataclass
class RefServer:
    """A reference server subprocess and its log."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_s: float | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as fh:
            # Its own session: a Ctrl-C reaches only this script, which then stops the server in order.
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.perf_counter()

    def wait_listening(self, timeout: float = 120) -> None:
        assert self.proc is not None
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                self.ready_s = time.perf_counter() - self.started_at
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: port {self.port} not open after {timeout}s:\n{self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL: the exit code (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        return self.proc.returncode


async def run_tool(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run a command (wyoming-bench), stdout and stderr together: (exit code, text). Killed on timeout/cancel."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:  # a timeout, Ctrl-C or a failure elsewhere: it must not outlive the bench
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 10)
        raise
    return int(proc.returncode or 0), out.decode(errors="replace")


class LoadWindow:
    """Cores used by processes outside this benchmark between start and stop (the run's noise floor)."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._sys0 = system_busy_seconds()
        self._own0 = own_tree_seconds()
        self._kids0 = self._reaped()

    @staticmethod
    def _reaped() -> float:
        # Children that ran and ended inside the window (each wyoming-bench run) are gone from the tree.
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    def external_cores(self) -> float | None:
        wall = time.perf_counter() - self._t0
        sys1, own1 = system_busy_seconds(), own_tree_seconds()
        if self._sys0 is None or sys1 is None or wall <= 0:
            return None
        own = sum(v - self._own0.get(k, 0.0) for k, v in own1.items()) + self._reaped() - self._kids0
        return round(max(0.0, (sys1 - self._sys0 - own) / wall), 2)


def machine() -> dict[str, object]:
    """What the figures ran on."""
    cpu = None
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_at_start": list(os.getloadavg()),
            "python": sys.version.split()[0]}


def padded_copy(src: Path, dest: Path, silence_s: float) -> None:
    """`src` with `silence_s` of zeros appended: what `wyoming-bench stt` sends (its --trailing-silence)."""
    with wave.open(str(src), "rb") as r:
        params = r.getparams()
        frames = r.readframes(r.getnframes())
    pad = round(silence_s * params.framerate) * params.sampwidth * params.nchannels
    with wave.open(str(dest), "wb") as w:
        w.setparams(params)
        w.writeframes(frames + bytes(pad))


async def transcripts(venv: Path, corpus: Path, work: Path, servers: dict[str, int],
                      silence_s: float = STT_TRAILING_SILENCE_S) -> dict[str, dict[str, str]]:
    """One transcript per sample from each server (name -> port), by `wyoming-bench seed-corpus`.

    wyoming-bench's `stt` prints only error counts; the texts show where the WERs differ. seed-corpus sends a
    recording as it is stored, so each server gets a copy of the corpus padded as `stt` pads it (the same
    audio, hence the same transcripts from these deterministic decoders) and writes a .txt beside each.
    """
    out: dict[str, dict[str, str]] = {}
    for name, port in servers.items():
        d = work / f"seed-{port}"
        d.mkdir()
        for wav in sorted(corpus.glob("*.wav")):
            padded_copy(wav, d / wav.name, silence_s)
        rc, text = await run_tool([str(venv / "bin" / "wyoming-bench"), "seed-corpus", f"127.0.0.1:{port}",
                                   "--corpus", str(d)], 300)
        if rc != 0:
            raise RuntimeError(f"seed-corpus against {name} exited {rc}:\n{text[-2000:]}")
        for txt in sorted(d.glob("*.txt")):
            out.setdefault(txt.stem, {})[name] = txt.read_text(encoding="utf-8").strip()
    return out
