"""What the cost model (plan_cost) needs measured beyond the reference LLMs, each on this machine.

- per-layer overhead: two tiny probes of 2 and 32 layers (a token's cost that does not grow with weights);
- per-type rates: one probe per GGML type the registry's LLM files use, every matrix of that type, so a
  Q5_0 or Q8_0 tensor is priced at what Q5_0 or Q8_0 costs here, not at Q4_K's rate;
- contention: the embedded LLM decoding while Piper speaks, as in a voice turn (on few cores they share
  them; the turn's decode is slower than the LLM's alone, by what this measures);
- the disk's read rate (a file dropped from the page cache, read back) and the time the real server takes
  to open its port with no models: what a cold start spends before and besides loading the models.
Probe files are written once under cache_dir/probes (probe_typed, seconds each).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from local_ai_server.setup.bench_llm import BenchError, probe_llm
from local_ai_server.setup.fetch import LogFn
from local_ai_server.setup.llm_shape import LAYER_TENSORS, LlmShape
from local_ai_server.setup.probe_typed import build_typed_probe

# The type probes: 4 layers as wide as a 1B model's, so a token streams 100-200 MB (no cache holds it) and
# a 128-token prompt is a real matrix multiplication; a small vocabulary keeps the output projection minor.
TYPE_PROBE = {"n_layer": 4, "n_embd": 2048, "n_ff": 5632, "n_head": 16, "n_head_kv": 4, "n_vocab": 2048}
DEPTHS = (2, 32)
DEPTH_PROBE = {"n_embd": 256, "n_ff": 512, "n_head": 4, "n_head_kv": 2, "n_vocab": 512}
KERNEL_DECODE_TOKENS = 32
DISK_READ_MAX_BYTES = 512 * 1024 * 1024
DISK_CHUNK = 8 * 1024 * 1024


def uniform_shape(name: str, kind: str, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                  n_vocab: int) -> LlmShape:
    """A llama shape whose every matrix (embedding and output included) is of GGML type `kind`."""
    types = {t: kind for t in (*LAYER_TENSORS, "token_embd", "output")}
    return LlmShape(name=name, arch="llama", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
                    n_head_kv=n_head_kv, n_vocab=n_vocab, output_tensor=True, types=types)


def kernel_types(shapes: Iterable[LlmShape]) -> list[str]:
    """Every tensor type a decoded token of these models reads, most bytes first."""
    total: dict[str, int] = {}
    for shape in shapes:
        for kind, nbytes in shape.decode_bytes().items():
            total[kind] = total.get(kind, 0) + nbytes
    return sorted(total, key=lambda k: -total[k])


def _probe_doc(shape: LlmShape, result: dict[str, Any]) -> dict[str, Any]:
    return {"n_layer": shape.n_layer, "decode_bytes": shape.decode_bytes(), "layer_params": shape.layer_params(),
            "output_bytes": shape.output_spec.nbytes,
            **{k: result[k] for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "load_ms", "runs", "cpu")}}


def measure_kernels(types: list[str], probes_dir: Path, threads: int, log: LogFn) -> dict[str, Any]:
    """The bench's `kernels` block: depth probes and one probe per type in `types`."""
    doc: dict[str, Any] = {"type_probe": dict(TYPE_PROBE), "depth_probe": dict(DEPTH_PROBE), "depth": {},
                           "types": {}}
    for n_layer in DEPTHS:
        shape = uniform_shape(f"depth-{n_layer}", "Q4_K", n_layer=n_layer, **DEPTH_PROBE)
        result = _measure(shape, probes_dir, threads, log)
        doc["depth"][str(n_layer)] = _probe_doc(shape, result)
    for kind in types:
        shape = uniform_shape(f"type-{kind.lower()}", kind, **TYPE_PROBE)
        result = _measure(shape, probes_dir, threads, log)
        doc["types"][kind] = _probe_doc(shape, result)
        log("bench.kernel", type=kind, decode_tok_s=result["decode_tok_s"], prefill_tok_s=result["prefill_tok_s"],
            ttft_ms=result["ttft_ms"])
    return doc


def _measure(shape: LlmShape, probes_dir: Path, threads: int, log: LogFn) -> dict[str, Any]:
    # The dims are in the name: a probe cached for another size is never taken for this one.
    path = probes_dir / f"{shape.name}-{shape.n_layer}x{shape.n_embd}x{shape.n_ff}.gguf"
    if not path.is_file() or path.stat().st_size < shape.tensor_bytes:
        build_typed_probe(shape, path, log=log)
    return probe_llm(path, threads=threads, decode_tokens=KERNEL_DECODE_TOKENS)


def measure_contention(llm_path: Path, threads: int, tts_path: Path, tts_threads: int, *, log: LogFn,
                       synth: Callable[[Path, int], Callable[[], None]] | None = None) -> dict[str, Any]:
    """The LLM's decode rate alone and while Piper synthesizes sentences back to back, and Piper's time both ways.

    In a voice turn the first sentence is spoken while the rest of the answer decodes: on few cores the two
    share them. The ratios are what the turn prediction applies (plan_predict).
    """
    speak = (synth or _piper)(tts_path, tts_threads)
    tts_alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        speak()
        tts_alone.append((time.perf_counter() - t0) * 1000)
    alone = probe_llm(llm_path, threads=threads, repeats=3)
    stop = threading.Event()
    busy: list[float] = []

    def loop() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            speak()
            busy.append((time.perf_counter() - t0) * 1000)

    worker = threading.Thread(target=loop, name="bench-tts", daemon=True)
    worker.start()
    try:
        shared = probe_llm(llm_path, threads=threads, repeats=3)
    finally:
        stop.set()
        worker.join()
    if not busy:
        raise BenchError("contention probe: Piper synthesized nothing while the LLM decoded")
    doc = {"decode_tok_s_alone": alone["decode_tok_s"], "decode_tok_s_with_tts": shared["decode_tok_s"],
           "decode_factor": round(shared["decode_tok_s"] / alone["decode_tok_s"], 3),
           "tts_ms_alone": round(statistics.median(tts_alone), 1), "tts_ms_with_llm": round(statistics.median(busy), 1),
           "tts_runs_with_llm": len(busy)}
    doc["tts_factor"] = round(doc["tts_ms_with_llm"] / doc["tts_ms_alone"], 3)
    log("bench.contention", **doc)
    return doc


def _piper(path: Path, threads: int) -> Callable[[], None]:
    from local_ai_server.engines.tts import PiperTts
    from local_ai_server.setup.bench_speech import TTS_SENTENCE

    tts = PiperTts(Path(path), threads=threads)
    tts.warm_up()

    def speak() -> None:
        tts.synthesize_all(TTS_SENTENCE)

    return speak


def measure_disk(path: Path, *, max_bytes: int = DISK_READ_MAX_BYTES) -> dict[str, Any]:
    """The rate (MB/s) at which `path` reads back once dropped from the page cache (posix_fadvise DONTNEED).

    Only this file's cached pages are dropped (after an fsync, so none is dirty); where the OS cannot drop
    them the result says so and the rate is what the page cache gives.
    """
    size = min(path.stat().st_size, max_bytes)
    dropped = False
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped = True
        t0 = time.perf_counter()
        done = 0
        while done < size:
            chunk = os.read(fd, min(DISK_CHUNK, size - done))
            if not chunk:
                break
            done += len(chunk)
        seconds = max(time.perf_counter() - t0, 1e-6)
    finally:
        os.close(fd)
    return {"read_mb_s": round(done / 1e6 / seconds, 1), "mb": round(done / 1e6), "file": str(path),
            "page_cache_dropped": dropped}


def measure_server_start(*, registry: Any = None, models_dir: Path | None = None, tier: str = "embedded",
                         runs: int = 2) -> dict[str, Any]:
    """The real server's start: milliseconds until its port takes a connection, with no models; and, when
    `tier`'s files are installed in `models_dir`, until /ready with them (files already in the page cache).

    The first is what a start costs before any model (interpreter, imports, configuration); the second adds
    what loading and warming up that tier's models costs here, measured on the very code that will run.
    """
    import tempfile

    from local_ai_server.harness import start_server
    from local_ai_server.setup.selection import write_selection

    def start(models: Path, tmp: Path, wait: str) -> tuple[float, float | None]:
        try:
            srv = start_server(tmp, models, wait=wait, name="bench-start", timeout=600)
        except RuntimeError as exc:
            raise BenchError(f"server start probe failed: {str(exc).splitlines()[0]}") from None
        srv.stop(10, reap=True)
        if srv.port_open_s is None:
            raise BenchError("server start probe: the port never opened")
        return srv.port_open_s * 1000, None if srv.ready_s is None else srv.ready_s * 1000

    port, ready = [], []
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp_name:
        tmp = Path(tmp_name)
        empty = tmp / "empty"
        empty.mkdir()
        for _ in range(max(1, runs)):
            port.append(start(empty, tmp, "listening")[0])
        files = [] if registry is None or models_dir is None else registry.tier_files(tier)
        if models_dir is not None and files and all((Path(models_dir) / f.path).is_file() for f in files):
            linked = tmp / "models"
            for f in files:  # the installed files, linked: nothing of the real models dir is touched
                (linked / f.path).parent.mkdir(parents=True, exist_ok=True)
                (linked / f.path).symlink_to((Path(models_dir) / f.path).absolute())
            write_selection(linked, registry, tier)
            for _ in range(max(1, runs)):
                ready_ms = start(linked, tmp, "ready")[1]
                if ready_ms is not None:
                    ready.append(ready_ms)
    out: dict[str, Any] = {"port_open_ms": round(statistics.median(port), 1), "runs": [round(t, 1) for t in port]}
    if ready:
        out |= {"ready_tier": tier, "ready_ms_warm": round(statistics.median(ready), 1),
                "ready_runs": [round(t, 1) for t in ready]}
    return out
