"""Probes written straight from a recorded shape: llama.cpp loads them with exactly the recorded tensors and types."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import pytest

from local_ai_server.setup.bench_kernels import uniform_shape
from local_ai_server.setup.bench_llm import probe_llm
from local_ai_server.setup.llm_shape import LlmShape, q4_k_m_more_bits
from local_ai_server.setup.probe_typed import build_typed_probe
from local_ai_server.setup.registry import load_registry
from local_ai_server.setup.selection import default_registry_path

LAYERS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Qwen2.5-0.5B's layout at a test's size: rows of 288 (no multiple of 256: Q5_0/Q8_0 fallbacks), q/k/v
# biases, an untied Q5_0 embedding and a Q8_0 output, Q4_K/Q6_K feed-forward down projections.
SMALL_QWEN = LlmShape(
    name="small-qwen", arch="qwen2", n_layer=4, n_embd=288, n_ff=512, n_head=6, n_head_kv=2, n_vocab=1024,
    output_tensor=True, attn_bias=True,
    types={**{t: "Q5_0" for t in LAYERS}, "ffn_down": "Q4_K", "token_embd": "Q5_0", "output": "Q8_0"},
    overrides=(("attn_v", "Q8_0", q4_k_m_more_bits(4)), ("ffn_down", "Q6_K", q4_k_m_more_bits(4))))


def test_a_qwen_shaped_probe_has_exactly_the_recorded_tensors(tmp_path: Path) -> None:
    path = build_typed_probe(SMALL_QWEN, tmp_path / "q.gguf")
    reader = gguf.GGUFReader(path)
    got = {t.name: t.tensor_type.name for t in reader.tensors}
    assert got == {t.name: t.type for t in SMALL_QWEN.tensors()}
    assert Counter(got.values()) == {"F32": 4 * 5 + 1, "Q5_0": 4 * 5 + 2 + 1, "Q8_0": 2 + 1, "Q4_K": 2, "Q6_K": 2}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    assert llama_cpp.llama_model_size(llm.model) == SMALL_QWEN.tensor_bytes  # what llama.cpp maps is what we priced
    assert llama_cpp.llama_model_n_params(llm.model) == SMALL_QWEN.params
    llm.eval([1, 300, 301])
    llm.eval([302])
    assert llm.n_tokens == 4


def test_the_bench_measures_a_type_probe(tmp_path: Path) -> None:
    shape = uniform_shape("t", "Q8_0", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=512)
    path = build_typed_probe(shape, tmp_path / "t.gguf")
    result = probe_llm(path, threads=2, repeats=1, decode_tokens=4)
    assert result["decode_tok_s"] > 0 and result["model_bytes"] == shape.tensor_bytes


@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct-q4_1", "tinyllama-1.1b-chat-v1.0-q4_k_m"])
def test_registry_shapes_write_what_their_files_hold(model_id: str, tmp_path: Path) -> None:
    # Only the tensor table is checked (the data of a 1B shape is 0.7 GB): names, dims and types.
    model = load_registry(default_registry_path()).models[model_id]
    assert model.shape is not None
    tiny = LlmShape(**{**model.shape.__dict__, "n_layer": 2, "n_vocab": 512,
                       "overrides": tuple((t, k, tuple(i for i in ls if i < 2)) for t, k, ls in model.shape.overrides)})
    reader = gguf.GGUFReader(build_typed_probe(tiny, tmp_path / "p.gguf"))
    assert [(t.name, t.tensor_type.name) for t in reader.tensors] == [(t.name, t.type) for t in tiny.tensors()]
