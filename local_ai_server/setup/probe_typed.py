"""Probe files with a real model's exact tensors: its shape and the GGML type of each tensor, random weights.

A token costs what the tensors' sizes and types make it cost, whatever the weight values (shared/MODELS.md
trap 6). This writes such a file straight from an LlmShape: every quantized tensor is tiled from one small
pool of valid random blocks of its type (the scales set so that weights are ~0.02, no NaN, no denormal), so
no unquantized intermediate and no quantization pass are needed: a 3B-shaped file is written at disk
speed, and every tensor gets exactly the type the published file uses, whatever today's llama.cpp would
choose. Heavy libraries (numpy, gguf) are imported inside the functions.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from local_ai_server.setup.fetch import LogFn, structlog_log
from local_ai_server.setup.llm_shape import TYPE_SIZES, LlmShape, TensorSpec
from local_ai_server.setup.probe import N_BYTE_TOKENS, N_SPECIAL, ProbeError, _add_vocab

if TYPE_CHECKING:
    import numpy as np

# Blocks in a type's pool: prime, so the tiling never lines up with a row and neighbouring rows differ.
POOL_BLOCKS = 1021
WEIGHT_SCALE = 0.02
# Byte offsets of the f16 scale fields in each block (ggml-common.h); everything else is quant bits.
# The scale `d` makes a weight ~ d * q; type-1 formats also carry a minimum `m`/`dmin`.
_SCALES: dict[str, tuple[tuple[int, float], ...]] = {
    # (offset, value as a multiple of WEIGHT_SCALE)
    "Q4_0": ((0, 1 / 8),),  # d; q in -8..7
    "Q4_1": ((0, 1 / 8), (2, -1.0)),  # d, m
    "Q5_0": ((0, 1 / 16),),  # d; qh[4] then qs: q in -16..15
    "Q5_1": ((0, 1 / 16), (2, -1.0)),
    "Q8_0": ((0, 1 / 128),),  # d; int8 q
    "Q2_K": ((80, 1 / 16), (82, 1 / 32)),  # scales[16], qs[64], d, dmin
    "Q3_K": ((108, 1 / 64),),  # hmask[32], qs[64], scales[12], d
    "Q4_K": ((0, 1 / 256), (2, 1 / 64)),  # d, dmin, scales[12], qs[128]
    "Q5_K": ((0, 1 / 256), (2, 1 / 64)),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": ((208, 1 / 256),),  # ql[128], qh[64], scales[16] (int8), d
}


def block_pool(kind: str, seed: int = 0) -> np.ndarray:
    """POOL_BLOCKS random blocks of GGML type `kind` as a (blocks, block bytes) uint8 array."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind in ("F32", "F16", "BF16"):
        values = (rng.standard_normal(POOL_BLOCKS * 64, dtype=np.float32) * WEIGHT_SCALE)
        if kind == "F32":
            return values.view(np.uint8).reshape(POOL_BLOCKS, -1)
        if kind == "F16":
            return values.astype(np.float16).view(np.uint8).reshape(POOL_BLOCKS, -1)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(POOL_BLOCKS, -1)
    if kind not in _SCALES:
        raise ProbeError(f"no block pool for tensor type {kind!r}")
    size = TYPE_SIZES[kind][1]
    pool = rng.integers(0, 256, size=(POOL_BLOCKS, size), dtype=np.uint8)
    if kind == "Q6_K":
        pool[:, 192:208] = rng.integers(-32, 32, size=(POOL_BLOCKS, 16)).astype(np.int8).view(np.uint8)
    for offset, multiple in _SCALES[kind]:
        scale = np.float16(WEIGHT_SCALE * multiple)
        pool[:, offset:offset + 2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    return pool


def _tensor_data(spec: TensorSpec, pools: dict[str, Any]) -> np.ndarray:
    """The tensor's bytes in the file's layout: rows of blocks, tiled from its type's pool."""
    import numpy as np

    if spec.rows == 1 and spec.type == "F32":
        return np.ones(spec.cols, dtype=np.float32)  # norm gains, biases: 1 (0 for biases would do too)
    block, size = TYPE_SIZES[spec.type]
    if spec.type not in pools:
        pools[spec.type] = block_pool(spec.type)
    pool = pools[spec.type]
    if spec.type in ("F32", "F16", "BF16"):
        flat = pool.reshape(-1)
        n = spec.rows * spec.cols * size
        out: np.ndarray = np.resize(flat, n).reshape(spec.rows, spec.cols * size)
        return out
    blocks = np.resize(pool, (spec.rows * (spec.cols // block), size))
    return blocks.reshape(spec.rows, (spec.cols // block) * size)


def write_typed_gguf(shape: LlmShape, path: Path, *, log: LogFn = structlog_log) -> None:
    """Write a GGUF of `shape` with random weights of exactly its tensor types, and a dummy vocabulary."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(None, shape.arch)
    writer.add_name(f"probe-{shape.name}")
    writer.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M: informative only, the tensors carry their types
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
    if shape.n_vocab < N_SPECIAL + N_BYTE_TOKENS:
        raise ProbeError(f"probe shape {shape.name}: n_vocab must be at least {N_SPECIAL + N_BYTE_TOKENS}")
    _add_vocab(writer, shape.n_vocab)
    specs = list(shape.tensors())
    for spec in specs:
        qtype = gguf.GGMLQuantizationType[spec.type]
        if spec.rows == 1:
            writer.add_tensor_info(spec.name, (spec.cols,), np.dtype(np.float32), spec.nbytes)
        else:
            byte_shape = (spec.rows, spec.nbytes // spec.rows)
            writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=qtype)
    pools: dict[str, Any] = {}
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, spec in enumerate(specs):
            # One tensor in memory at a time: the largest (a 152k-vocab embedding) is a few hundred MB.
            writer.write_tensor_data(_tensor_data(spec, pools))
            if spec.name.endswith("ffn_down.weight") and (i == len(specs) - 1 or "blk.0." in spec.name):
                log("probe.build.tensors", shape=shape.name, done=i + 1, total=len(specs))
    finally:
        writer.close()


def build_typed_probe(shape: LlmShape, dest: Path, *, log: LogFn = structlog_log) -> Path:
    """Write the probe of `shape` at `dest` atomically (a .part file renamed into place); return `dest`."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    started = time.monotonic()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        log("probe.build.start", shape=shape.name, params=shape.params, dest=str(dest))
        write_typed_gguf(shape, part, log=log)
        os.replace(part, dest)
    except OSError as exc:
        raise ProbeError(f"cannot write probe {dest}: {exc.strerror or exc}") from None
    finally:
        with suppress(OSError):  # cleanup must not mask the error that got us here
            part.unlink(missing_ok=True)
    log("probe.build.done", shape=shape.name, mb=round(dest.stat().st_size / 1e6),
        s=round(time.monotonic() - started, 1))
    return dest
