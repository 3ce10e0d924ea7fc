"""Benchmark probe models: llama-architecture GGUF files of a given shape with random weights, quantized.

A decode step costs the same whatever the weight values are (shared/MODELS.md trap 6), so a file with
TinyLlama-1.1B's exact shapes and random weights, quantized like the real one, is a faithful offline
stand-in for it in a benchmark. The weights are one small random block tiled over every tensor: cheap
to make (a 3B shape is written at disk speed) and small enough (~0.02) that no activation overflows.
Heavy libraries (numpy, gguf, llama_cpp) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from local_ai_server.setup.fetch import LogFn, structlog_log
from local_ai_server.setup.registry import SetupError

if TYPE_CHECKING:
    import numpy as np

# Above this many parameters the intermediate file is F16 (half the bytes to write and read back);
# below it F32, which keeps the tiny test models exact.
F32_MAX_PARAMS = 50_000_000
# Prime, so a tiled block never lines up with a row: neighbouring rows differ.
RANDOM_BLOCK = 65_521
WEIGHT_SCALE = 0.02
N_SPECIAL = 3  # <unk>, <s>, </s>: the SentencePiece layout llama.cpp's "llama" tokenizer expects
N_BYTE_TOKENS = 256  # <0x00>..<0xFF>: byte fallback; llama.cpp looks up <0x0A> for the newline token
QUANTIZE_TIMEOUT_S = 3600.0
# llama.cpp's quantize log is long; keep the end of it for the error message.
ERROR_TAIL_CHARS = 600


class ProbeError(SetupError):
    """A probe model could not be built."""


@dataclass(frozen=True)
class ProbeShape:
    """The shape of a llama-architecture model: what a probe file copies from the model it stands in for."""

    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    context: int = 2048
    tied_embeddings: bool = False
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "context"):
            if getattr(self, key) <= 0:
                raise ProbeError(f"probe shape {self.name}: {key} must be positive")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ProbeError(f"probe shape {self.name}: n_embd must divide by n_head and n_head by n_head_kv")
        if self.n_vocab < N_SPECIAL + N_BYTE_TOKENS:
            raise ProbeError(f"probe shape {self.name}: n_vocab must be at least {N_SPECIAL + N_BYTE_TOKENS}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the K (and V) projection: grouped-query attention shares heads."""
        return self.n_head_kv * self.head_dim

    @property
    def params(self) -> int:
        """Exact parameter count, norms included."""
        per_layer = (
            2 * self.n_embd  # attn_norm, ffn_norm
            + 2 * self.n_embd * self.n_embd  # attn_q, attn_output
            + 2 * self.n_embd * self.kv_dim  # attn_k, attn_v
            + 3 * self.n_embd * self.n_ff  # ffn_gate, ffn_up, ffn_down
        )
        embeddings = self.n_vocab * self.n_embd * (1 if self.tied_embeddings else 2)
        return self.n_layer * per_layer + embeddings + self.n_embd  # + output_norm

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(GGUF tensor name, numpy shape) in file order; a matrix is (rows=out, cols=in)."""
        yield "token_embd.weight", (self.n_vocab, self.n_embd)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            yield p + "attn_norm.weight", (self.n_embd,)
            yield p + "attn_q.weight", (self.n_embd, self.n_embd)
            yield p + "attn_k.weight", (self.kv_dim, self.n_embd)
            yield p + "attn_v.weight", (self.kv_dim, self.n_embd)
            yield p + "attn_output.weight", (self.n_embd, self.n_embd)
            yield p + "ffn_norm.weight", (self.n_embd,)
            yield p + "ffn_gate.weight", (self.n_ff, self.n_embd)
            yield p + "ffn_up.weight", (self.n_ff, self.n_embd)
            yield p + "ffn_down.weight", (self.n_embd, self.n_ff)
        yield "output_norm.weight", (self.n_embd,)
        if not self.tied_embeddings:
            yield "output.weight", (self.n_vocab, self.n_embd)


TINYLLAMA_1B = ProbeShape("tinyllama-1.1b", n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4,
                          n_vocab=32000, context=2048, tied_embeddings=False)
LLAMA32_1B = ProbeShape("llama-3.2-1b", n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8,
                        n_vocab=128256, context=131072, tied_embeddings=True, rope_freq_base=500000.0)
LLAMA32_3B = ProbeShape("llama-3.2-3b", n_layer=28, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8,
                        n_vocab=128256, context=131072, tied_embeddings=True, rope_freq_base=500000.0)
# Dims are multiples of 256 (the k-quant super-block) and head_dim is 64, so Q4_K_M applies as for a real model.
TEST_TINY = ProbeShape("test-tiny", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                       n_vocab=512, context=512, tied_embeddings=False)

# `quant` name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* constant suffix.
QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
          "Q5_K_S", "Q5_K_M", "Q6_K", "F16", "BF16")


def build_probe(
    shape: ProbeShape,
    dest: Path,
    *,
    quant: str = "Q4_K_M",
    scratch_dir: Path | None = None,
    seed: int = 0,
    threads: int | None = None,
    log: LogFn = structlog_log,
) -> Path:
    """Write a random-weight GGUF of `shape` quantized to `quant` at `dest` (atomically); return `dest`.

    The unquantized intermediate goes to `scratch_dir` (default: beside `dest`) and is always removed.
    Quantization runs in a child process, so a llama.cpp abort becomes a ProbeError.
    """
    quant = quant.upper()
    if quant not in QUANTS:
        raise ProbeError(f"unknown quantization {quant!r} (known: {', '.join(QUANTS)})")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    scratch = Path(scratch_dir) if scratch_dir is not None else dest.parent
    started = time.monotonic()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        fd, raw_name = tempfile.mkstemp(prefix=f".{shape.name}-", suffix=".raw.gguf", dir=scratch)
        os.close(fd)
    except OSError as exc:
        raise ProbeError(f"cannot create probe {dest}: {exc.strerror or exc}") from None
    raw = Path(raw_name)
    try:
        log("probe.build.start", shape=shape.name, params=shape.params, quant=quant, dest=str(dest))
        write_random_gguf(shape, raw, seed=seed, log=log)
        written = time.monotonic()
        log("probe.build.written", shape=shape.name, mb=round(raw.stat().st_size / 1e6),
            s=round(written - started, 1))
        quantize(raw, part, quant, threads=threads)
        raw.unlink(missing_ok=True)
        os.replace(part, dest)
        log("probe.build.done", shape=shape.name, quant=quant, mb=round(dest.stat().st_size / 1e6),
            quantize_s=round(time.monotonic() - written, 1), total_s=round(time.monotonic() - started, 1))
    except OSError as exc:
        raise ProbeError(f"cannot write probe {dest}: {exc.strerror or exc}") from None
    finally:
        for leftover in (raw, part):
            with suppress(OSError):  # cleanup must not mask the error that got us here
                leftover.unlink(missing_ok=True)
    return dest


def write_random_gguf(shape: ProbeShape, path: Path, *, seed: int = 0, log: LogFn = structlog_log) -> None:
    """Write an unquantized (F32 or F16) llama GGUF of `shape` with tiled random weights and a dummy vocab."""
    import gguf
    import numpy as np

    f16 = shape.params > F32_MAX_PARAMS
    dtype = np.float16 if f16 else np.float32
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(f"probe-{shape.name}")
    writer.add_file_type(1 if f16 else 0)  # LLAMA_FTYPE_MOSTLY_F16 / ALL_F32
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.n_vocab)
    _add_vocab(writer, shape.n_vocab)

    tensors = list(shape.tensors())
    for name, dims in tensors:
        tdtype = np.dtype(np.float32) if len(dims) == 1 else np.dtype(dtype)  # norms stay F32, as llama.cpp keeps them
        writer.add_tensor_info(name, dims, tdtype, int(np.prod(dims)) * tdtype.itemsize)

    block = (np.random.default_rng(seed).standard_normal(RANDOM_BLOCK, dtype=np.float32) * WEIGHT_SCALE)
    blocks = {np.dtype(np.float32): block, np.dtype(np.float16): block.astype(np.float16)}
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = len(tensors)
        for i, (name, dims) in enumerate(tensors):
            # One tensor in memory at a time: the largest (a 128k-vocab embedding) is ~0.8 GB in F16.
            writer.write_tensor_data(_tensor(name, dims, blocks, np.dtype(dtype)))
            if name.endswith("ffn_down.weight") or i == total - 1:
                log("probe.build.tensors", shape=shape.name, done=i + 1, total=total)
    finally:
        writer.close()


def _tensor(name: str, dims: tuple[int, ...], blocks: dict[Any, np.ndarray], dtype: Any) -> np.ndarray:
    import numpy as np

    if len(dims) == 1:
        return np.ones(dims, dtype=np.float32)  # RMS-norm gains: 1 keeps the activations' scale
    out: np.ndarray = np.resize(blocks[dtype], dims)
    return out


def _add_vocab(writer: Any, n_vocab: int) -> None:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTE_TOKENS)]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n_vocab)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * N_BYTE_TOKENS
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * (N_SPECIAL + N_BYTE_TOKENS) + [-float(i) for i in range(n_vocab - N_SPECIAL - N_BYTE_TOKENS)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def quantize(src: Path, dest: Path, quant: str, *, threads: int | None = None,
             timeout_s: float = QUANTIZE_TIMEOUT_S) -> None:
    """Quantize GGUF `src` into `dest` with llama.cpp, in a child process; ProbeError on any failure."""
    cmd = [sys.executable, "-m", "local_ai_server.setup.probe", "_quantize", str(src), str(dest), quant.upper(),
           str(threads or 0)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"quantizing {dest.name} to {quant} timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise ProbeError(f"quantizing {dest.name} to {quant} failed ({_exit_reason(proc.returncode)}): "
                         f"{_tail(proc.stderr + proc.stdout)}")
    if not dest.is_file() or dest.stat().st_size == 0:
        raise ProbeError(f"quantizing {dest.name} to {quant} produced no file")


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # llama.cpp logs every tensor; the lines that say what went wrong are the useful ones.
    errors = [line for line in lines if any(w in line.lower() for w in ("error", "failed", "abort", "assert"))]
    tail = " | ".join((errors or lines)[-3:])
    return tail[-ERROR_TAIL_CHARS:] or "no output"


def _quantize_child(src: str, dest: str, quant: str, threads: int) -> int:
    """Child-process side of `quantize`: call llama_model_quantize; the exit code says how it went."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads  # <= 0: all hardware threads
    rc = int(llama_cpp.llama_model_quantize(src.encode(), dest.encode(), params))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, "bytes": Path(dest).stat().st_size}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: `python -m local_ai_server.setup.probe _quantize SRC DEST QUANT THREADS`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 5 and args[0] == "_quantize":
        return _quantize_child(args[1], args[2], args[3], int(args[4]))
    print("usage: python -m local_ai_server.setup.probe _quantize SRC DEST QUANT THREADS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
