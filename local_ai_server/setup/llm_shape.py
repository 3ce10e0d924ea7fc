"""An LLM's real shape and the tensor types of its published GGUF file: what each token costs depends on them.

registry.json records them per LLM (`architecture`); the cost model (plan_cost) reads the bytes a decoded
token streams and the multiply-adds a prompt token needs, per tensor type, from here; the probe builder
(probe_typed) writes a random-weight file with exactly these tensors. Nothing here runs a model.

Why the types matter: many small models keep the token embedding in Q8_0 or F16 and store it twice (as
`token_embd` and `output`). A decoded token reads the output projection in full but only one row of an
untied embedding, so "file size / bandwidth" overstates their cost by up to a quarter, and the fallback
types llama.cpp uses for rows that are no multiple of 256 (Q5_0, Q8_0) run at other speeds than Q4_K.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

# GGML type -> (weights per block, bytes per block), as ggml-common.h defines them.
TYPE_SIZES: Mapping[str, tuple[int, int]] = MappingProxyType({
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
})
ARCHES = ("llama", "qwen2")
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TYPED_TENSORS = ("token_embd", "output", *LAYER_TENSORS)
# GGUF aligns every tensor's data to this many bytes.
ALIGNMENT = 32


class ShapeError(ValueError):
    """An architecture description that is incomplete or impossible."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file: GGUF name, rows x cols (a vector has rows 1), GGML type."""

    name: str
    rows: int
    cols: int
    type: str

    @property
    def params(self) -> int:
        """Number of weights."""
        return self.rows * self.cols

    @property
    def nbytes(self) -> int:
        """Bytes of its data in the file (before alignment padding)."""
        block, size = TYPE_SIZES[self.type]
        return self.rows * (self.cols // block) * size


@dataclass(frozen=True)
class LlmShape:
    """A llama-family decoder: layer count, widths, heads, vocabulary, and the GGML type of every tensor."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    # The file stores `output.weight`; without it the token embedding doubles as the output projection.
    output_tensor: bool
    types: Mapping[str, str]
    # (tensor, type, layers): the per-layer exceptions of a quantization mix (Q4_K_M's Q6_K layers).
    overrides: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    attn_bias: bool = False  # Qwen2 has biases on q, k and v
    context: int = 2048
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "context"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ShapeError(f"{self.name}: {key} must be a positive integer")
        if self.arch not in ARCHES:
            raise ShapeError(f"{self.name}: arch must be one of {', '.join(ARCHES)}, got {self.arch!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ShapeError(f"{self.name}: n_embd must divide by n_head and n_head by n_head_kv")
        missing = [t for t in TYPED_TENSORS if t not in self.types and not (t == "output" and not self.output_tensor)]
        if missing:
            raise ShapeError(f"{self.name}: tensor_types is missing {', '.join(missing)}")
        for tensor, kind in list(self.types.items()) + [(o[0], o[1]) for o in self.overrides]:
            if tensor not in TYPED_TENSORS:
                raise ShapeError(f"{self.name}: unknown tensor {tensor!r} (known: {', '.join(TYPED_TENSORS)})")
            if kind not in TYPE_SIZES:
                raise ShapeError(f"{self.name}: unknown tensor type {kind!r} (known: {', '.join(TYPE_SIZES)})")
        for tensor, _kind, layers in self.overrides:
            if tensor not in LAYER_TENSORS or any(not 0 <= i < self.n_layer for i in layers):
                raise ShapeError(f"{self.name}: layer override of {tensor!r} must name layers 0..{self.n_layer - 1}")
        for spec in self.tensors():
            block = TYPE_SIZES[spec.type][0]
            if spec.cols % block:
                raise ShapeError(f"{self.name}: {spec.name} has rows of {spec.cols}, no multiple of {spec.type}'s "
                                 f"block of {block}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the K (and V) projection: grouped-query attention shares heads."""
        return self.n_head_kv * self.head_dim

    def layer_type(self, tensor: str, layer: int) -> str:
        """The GGML type of `tensor` in layer `layer`."""
        for name, kind, layers in self.overrides:
            if name == tensor and layer in layers:
                return kind
        return self.types[tensor]

    def tensors(self) -> Iterator[TensorSpec]:
        """Every tensor in file order; a matrix is (rows=out, cols=in), as GGUF stores it."""
        e, kv, ff = self.n_embd, self.kv_dim, self.n_ff
        yield TensorSpec("token_embd.weight", self.n_vocab, e, self.types["token_embd"])
        dims = {"attn_q": (e, e), "attn_k": (kv, e), "attn_v": (kv, e), "attn_output": (e, e),
                "ffn_gate": (ff, e), "ffn_up": (ff, e), "ffn_down": (e, ff)}
        for i in range(self.n_layer):
            p = f"blk.{i}."
            yield TensorSpec(p + "attn_norm.weight", 1, e, "F32")
            for name in ("attn_q", "attn_k", "attn_v"):
                yield TensorSpec(p + name + ".weight", *dims[name], self.layer_type(name, i))
                if self.attn_bias:
                    yield TensorSpec(p + name + ".bias", 1, dims[name][0], "F32")
            yield TensorSpec(p + "attn_output.weight", *dims["attn_output"], self.layer_type("attn_output", i))
            yield TensorSpec(p + "ffn_norm.weight", 1, e, "F32")
            for name in ("ffn_gate", "ffn_up", "ffn_down"):
                yield TensorSpec(p + name + ".weight", *dims[name], self.layer_type(name, i))
        yield TensorSpec("output_norm.weight", 1, e, "F32")
        if self.output_tensor:
            yield TensorSpec("output.weight", self.n_vocab, e, self.types["output"])

    @property
    def params(self) -> int:
        """Every weight in the file (what llama.cpp's n_params counts)."""
        return sum(t.params for t in self.tensors())

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data in the file, alignment included (the file adds its metadata to this)."""
        return sum(-(-t.nbytes // ALIGNMENT) * ALIGNMENT for t in self.tensors())

    @property
    def output_spec(self) -> TensorSpec:
        """The output projection a decoded token multiplies by: `output`, else the tied token embedding."""
        name = "output.weight" if self.output_tensor else "token_embd.weight"
        return next(t for t in self.tensors() if t.name == name)

    def layer_matrices(self) -> Iterator[TensorSpec]:
        """The per-layer weight matrices: what every token of a prompt is multiplied by."""
        return (t for t in self.tensors() if t.name.startswith("blk.") and t.rows > 1)

    def decode_bytes(self) -> dict[str, int]:
        """Bytes one decoded token streams from memory, per type: every layer matrix and the output projection.

        An untied token embedding is not among them: a token reads one row of it.
        """
        out: dict[str, int] = {}
        for t in (*self.layer_matrices(), self.output_spec):
            out[t.type] = out.get(t.type, 0) + t.nbytes
        return out

    def layer_params(self) -> dict[str, int]:
        """Weights of the layer matrices per type: a prompt token costs two FLOPs for each."""
        out: dict[str, int] = {}
        for t in self.layer_matrices():
            out[t.type] = out.get(t.type, 0) + t.params
        return out

    def to_dict(self) -> dict[str, Any]:
        """The registry's `architecture` object."""
        doc: dict[str, Any] = {
            "arch": self.arch, "n_layer": self.n_layer, "n_embd": self.n_embd, "n_ff": self.n_ff,
            "n_head": self.n_head, "n_head_kv": self.n_head_kv, "n_vocab": self.n_vocab,
            "output_tensor": self.output_tensor, "attn_bias": self.attn_bias, "tensor_types": dict(self.types),
            "layer_overrides": [{"tensors": [t], "type": k, "layers": list(ls)} for t, k, ls in self.overrides],
            "context": self.context, "rope_freq_base": self.rope_freq_base, "rms_eps": self.rms_eps,
        }
        if self.source:
            doc["source"] = self.source
        return doc


def shape_from_dict(name: str, doc: Mapping[str, Any]) -> LlmShape:
    """Validate a registry `architecture` object into an LlmShape; ShapeError names what is wrong."""
    if not isinstance(doc, Mapping):
        raise ShapeError(f"{name}: architecture must be an object")
    known = {"arch", "n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "output_tensor", "attn_bias",
             "tensor_types", "layer_overrides", "context", "rope_freq_base", "rms_eps", "source", "file_check"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ShapeError(f"{name}: architecture has unknown key(s) {', '.join(unknown)}")
    ints: dict[str, int] = {}
    for key in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "context"):
        value = doc.get(key, 2048 if key == "context" else None)
        if type(value) is not int:
            raise ShapeError(f"{name}: architecture.{key} must be an integer, got {value!r}")
        ints[key] = value
    types = doc.get("tensor_types")
    if not isinstance(types, Mapping) or not all(isinstance(v, str) for v in types.values()):
        raise ShapeError(f"{name}: architecture.tensor_types must map tensor names to GGML types")
    overrides: list[tuple[str, str, tuple[int, ...]]] = []
    for i, item in enumerate(doc.get("layer_overrides") or []):
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str) \
                or not isinstance(item.get("tensors"), list) or not isinstance(item.get("layers"), list) \
                or not all(type(x) is int for x in item["layers"]):
            raise ShapeError(f"{name}: architecture.layer_overrides[{i}] needs tensors, type and integer layers")
        overrides += [(str(t), item["type"], tuple(item["layers"])) for t in item["tensors"]]
    flags = {}
    for key in ("output_tensor", "attn_bias"):
        value = doc.get(key, False)
        if not isinstance(value, bool):
            raise ShapeError(f"{name}: architecture.{key} must be true or false")
        flags[key] = value
    floats = {}
    for key, default in (("rope_freq_base", 10000.0), ("rms_eps", 1e-5)):
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ShapeError(f"{name}: architecture.{key} must be a positive number")
        floats[key] = float(value)
    source = doc.get("source", "")
    return LlmShape(name=name, arch=str(doc.get("arch")), **ints, output_tensor=flags["output_tensor"],
                    attn_bias=flags["attn_bias"], types=MappingProxyType(dict(types)), overrides=tuple(overrides),
                    rope_freq_base=floats["rope_freq_base"], rms_eps=floats["rms_eps"],
                    source=source if isinstance(source, str) else "")


def q4_k_m_more_bits(n_layer: int) -> tuple[int, ...]:
    """The layers whose attn_v and ffn_down llama.cpp's Q4_K_M mix stores in Q6_K (its `use_more_bits`)."""
    return tuple(i for i in range(n_layer)
                 if i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2)


def file_mismatches(shape: LlmShape, path: Path) -> list[str]:
    """How the GGUF file at `path` differs from `shape` (tensor names, dims, types); empty when it matches.

    `verify` runs this on the installed LLM, so a registry fact taken from a published config rather than
    from the file itself is checked against the file as soon as one is installed.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        return [f"{path.name}: not a readable GGUF file ({exc})"]
    found = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors
             if not t.name.startswith("rope_")}  # Llama 3's rope frequencies: a 64-float table, no weight
    wanted = {t.name: (t.type, (t.cols,) if t.rows == 1 else (t.cols, t.rows)) for t in shape.tensors()}
    out = [f"{path.name}: tensor {name} is {found[name][0]} {list(found[name][1])}, the registry says "
           f"{want[0]} {list(want[1])}" for name, want in wanted.items() if name in found and found[name] != want]
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing:
        out.append(f"{path.name}: lacks {len(missing)} tensor(s) the registry lists, e.g. {missing[0]}")
    if extra:
        out.append(f"{path.name}: has {len(extra)} tensor(s) the registry does not list, e.g. {extra[0]}")
    return out
