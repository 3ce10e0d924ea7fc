"""Probe building and the installer bench, on real files: a tiny random GGUF, llama.cpp, faster-whisper and Piper."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf  # noqa: E402 - installed with the package
import llama_cpp  # noqa: E402 - installed by install.sh
import pytest

from local_ai_server.setup import bench as bench_mod
from local_ai_server.setup import bench_kernels
from local_ai_server.setup.bench import (
    BENCH_VERSION,
    PROBE_MODEL_ID,
    BenchError,
    cache_path,
    fingerprint,
    measure_stt,
    probe_llm,
    probe_stt,
    probe_tts,
    run_bench,
    word_error_rate,
)
from local_ai_server.setup.hardware import Gpu, Hardware
from local_ai_server.setup.plan import Bench
from local_ai_server.setup.probe import (
    LLAMA32_1B,
    LLAMA32_3B,
    TEST_TINY,
    TINYLLAMA_1B,
    ProbeError,
    ProbeShape,
    build_probe,
)
from local_ai_server.setup.registry import SetupError, load_registry
from local_ai_server.setup.selection import default_models_dir, default_registry_path, read_selection

HW = Hardware(cpu_model="Test CPU", cpu_cores=2, cpu_threads=2, cpu_flags=("avx2", "fma"), ram_gb=23.5,
              gpus=(), os="linux", arch="x86_64", disk_free_gb=50.0)


@pytest.fixture(autouse=True)
def small_kernel_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's per-type and depth probes at a test's size: what they measure is checked, not how fast."""
    monkeypatch.setattr(bench_kernels, "TYPE_PROBE", {"n_layer": 2, "n_embd": 256, "n_ff": 512, "n_head": 4,
                                                      "n_head_kv": 2, "n_vocab": 512})
    monkeypatch.setattr(bench_kernels, "DEPTHS", (1, 4))


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TEST_TINY Q4_K_M probe shared by the module (building it takes about a second)."""
    return build_probe(TEST_TINY, tmp_path_factory.mktemp("probe") / "tiny.gguf")


@pytest.fixture(scope="module")
def registry() -> Any:
    """The project's registry.json."""
    return load_registry(default_registry_path())


def _embedded() -> tuple[Path, Path]:
    """(STT model dir, TTS voice) of the installed selection; the suite needs them (./install.sh)."""
    selection = read_selection(default_models_dir())
    if selection is None or not (selection.path("stt") / "model.bin").is_file() or not selection.path("tts").is_file():
        pytest.fail("embedded models not installed (run ./install.sh; scripts/test.sh does)")
    return selection.path("stt"), selection.path("tts")


# --- shapes --------------------------------------------------------------------------------------


def test_tinyllama_params_match_the_published_count() -> None:
    embd, ff, layers, vocab, kv = 2048, 5632, 22, 32000, 4 * (2048 // 32)
    per_layer = 2 * embd + 2 * embd * embd + 2 * embd * kv + 3 * embd * ff
    assert TINYLLAMA_1B.params == layers * per_layer + 2 * vocab * embd + embd == 1_100_048_384


def test_llama32_params_match_the_published_counts() -> None:
    embd, ff, layers, vocab, kv = 3072, 8192, 28, 128256, 8 * 128
    per_layer = 2 * embd + 2 * embd * embd + 2 * embd * kv + 3 * embd * ff
    # Tied: the output projection reuses token_embd, so the vocab matrix counts once.
    assert LLAMA32_3B.params == layers * per_layer + vocab * embd + embd == 3_212_749_824
    assert round(LLAMA32_1B.params / 1e9, 2) == 1.24


def test_shape_rejects_impossible_head_layout() -> None:
    with pytest.raises(ProbeError, match="n_head"):
        ProbeShape("bad", n_layer=1, n_embd=256, n_ff=256, n_head=3, n_head_kv=1, n_vocab=512)
    with pytest.raises(ProbeError, match="n_vocab"):
        ProbeShape("bad", n_layer=1, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=100)


# --- building a probe ----------------------------------------------------------------------------


def test_probe_is_a_quantized_gguf_of_the_shape(tiny_probe: Path) -> None:
    reader = gguf.GGUFReader(str(tiny_probe))

    def field(key: str) -> Any:
        f = reader.fields[key]
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        return f.parts[f.data[0]][0]

    s = TEST_TINY
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == s.n_layer
    assert field("llama.embedding_length") == s.n_embd
    assert field("llama.feed_forward_length") == s.n_ff
    assert field("llama.attention.head_count") == s.n_head
    assert field("llama.attention.head_count_kv") == s.n_head_kv
    assert field("llama.context_length") == s.context
    assert field("general.file_type") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == s.n_vocab

    tensors = {t.name: t for t in reader.tensors}
    expected = dict(s.tensors())
    assert set(tensors) == set(expected)
    for name, dims in expected.items():
        # GGUF lists dimensions innermost first: the reverse of numpy's (rows, cols).
        assert tuple(int(d) for d in tensors[name].shape) == tuple(reversed(dims)), name
    types = {t.tensor_type.name for t in reader.tensors}
    matrices = {tensors[n].tensor_type.name for n, d in expected.items() if len(d) == 2}
    norms = {tensors[n].tensor_type.name for n, d in expected.items() if len(d) == 1}
    assert matrices <= {"Q4_K", "Q6_K"} and "Q4_K" in matrices and "Q6_K" in matrices, types
    assert norms == {"F32"}
    assert sum(int(t.n_elements) for t in reader.tensors) == s.params
    assert not list(tiny_probe.parent.glob("*.part")) and not list(tiny_probe.parent.glob(".*raw*"))


def test_probe_loads_and_decodes_with_llama_cpp(tiny_probe: Path) -> None:
    llm = llama_cpp.Llama(model_path=str(tiny_probe), n_ctx=128, n_threads=2, verbose=False)
    assert llm.n_vocab() == TEST_TINY.n_vocab
    assert llama_cpp.llama_model_n_params(llm.model) == TEST_TINY.params
    out = llm.create_completion("hello", max_tokens=6, temperature=0.0)
    assert isinstance(out, dict)  # not streamed
    assert out["usage"]["completion_tokens"] >= 1
    # Raw token ids, as the bench feeds them.
    llm.reset()
    llm.eval([1, 300, 301, 302])
    llm.eval([303])
    assert llm.n_tokens == 5


def test_build_where_no_dir_can_be_made_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")  # dest's parent would have to be a directory here
    with pytest.raises(ProbeError, match="cannot create probe"):
        build_probe(TEST_TINY, blocker / "p.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failed_quantization_leaves_no_dest_and_no_intermediate(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    out = tmp_path / "out"
    # dest.part is a directory: the intermediate gets written, then llama.cpp cannot open its output.
    (out / "p.gguf.part").mkdir(parents=True)
    with pytest.raises(ProbeError, match="quantizing .* failed"):
        build_probe(TEST_TINY, out / "p.gguf", scratch_dir=scratch)
    assert not (out / "p.gguf").exists()
    assert list(scratch.iterdir()) == []  # the intermediate is gone too


def test_unknown_quant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="unknown quantization"):
        build_probe(TEST_TINY, tmp_path / "p.gguf", quant="Q9_Z")


# --- LLM probe -----------------------------------------------------------------------------------


def test_probe_llm_measures_the_tiny_probe(tiny_probe: Path) -> None:
    r = probe_llm(tiny_probe, threads=2, prompt_tokens=64, decode_tokens=16, repeats=3)
    for key in ("load_ms", "prefill_tok_s", "decode_tok_s", "ttft_ms", "rss_mb"):
        assert r[key] > 0, key
    # One batched decode of 64 tokens beats 16 one-token decodes per token by far on any machine.
    assert r["prefill_tok_s"] > r["decode_tok_s"]
    assert r["n_params"] == TEST_TINY.params
    assert r["general_name"] == "probe-test-tiny"
    assert len(r["runs"]["decode_tok_s"]) == 3 and sorted(r["runs"]["decode_tok_s"])[1] == r["decode_tok_s"]
    assert r["gomp_spincount"] is not None  # set for the child even when the caller has none


def test_probe_llm_of_a_corrupt_file_is_a_setup_error(tmp_path: Path, tiny_probe: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(BenchError, match="garbage.gguf failed") as info:
        probe_llm(garbage, threads=1, repeats=1)
    assert isinstance(info.value, SetupError)
    assert "\n" not in str(info.value)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_probe.read_bytes()[: tiny_probe.stat().st_size // 2])
    with pytest.raises(BenchError, match="truncated.gguf failed"):
        probe_llm(truncated, threads=1, repeats=1)


def test_probe_llm_timeout_is_a_setup_error(tiny_probe: Path) -> None:
    # Importing llama.cpp alone takes longer than this.
    with pytest.raises(BenchError, match="timed out"):
        probe_llm(tiny_probe, threads=1, timeout_s=0.01)


def test_probe_llm_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="no model file"):
        probe_llm(tmp_path / "absent.gguf", threads=1)


# --- STT and TTS probes --------------------------------------------------------------------------


def test_stt_probe_hears_the_sentence() -> None:
    stt_dir, voice = _embedded()
    result = measure_stt(stt_dir, 2, voice_path=voice, runs=2)
    assert result.ms > 0
    assert 1.5 < result.audio_s < 6.0
    assert word_error_rate(result.expected, result.transcript) == result.wer <= 0.1, result.transcript
    assert probe_stt(stt_dir, 2, voice_path=voice, runs=1) > 0


def test_stt_probe_rejects_a_wrong_transcript(monkeypatch: pytest.MonkeyPatch) -> None:
    stt_dir, voice = _embedded()
    # No transcript can beat a negative tolerance: the check really compares what was heard.
    monkeypatch.setattr(bench_mod, "STT_MAX_WER", -1.0)
    with pytest.raises(BenchError, match="STT probe: heard"):
        probe_stt(stt_dir, 2, voice_path=voice, runs=1)


def test_tts_probe_times_a_sentence() -> None:
    _stt_dir, voice = _embedded()
    assert probe_tts(voice, 1, runs=2) > 0


def test_word_error_rate() -> None:
    assert word_error_rate("Hello, world.", "hello world") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5
    assert word_error_rate("a b", "") == 1.0


# --- run_bench -----------------------------------------------------------------------------------


def _events() -> tuple[list[str], Any]:
    seen: list[str] = []

    def log(event: str, **fields: object) -> None:
        seen.append(event)

    return seen, log


def test_run_bench_measures_then_caches(tmp_path: Path, tiny_probe: Path, registry: Any) -> None:
    cache = tmp_path / "cache"
    empty_models = tmp_path / "models"  # no STT/TTS installed: they are skipped with a note
    seen, log = _events()
    doc = run_bench(hardware=HW, models_dir=empty_models, registry=registry, cache_dir=cache,
                    probe_path=tiny_probe, log=log)
    bench = Bench.from_dict(doc)
    assert bench.file_bytes == tiny_probe.stat().st_size
    assert bench.params_b == pytest.approx(TEST_TINY.params / 1e9, rel=1e-3)
    assert doc["stt_ms"] is None and doc["tts_ms"] is None and doc["small_probe"] is None and len(doc["notes"]) == 4
    assert doc["contention"] is None  # no embedded LLM and voice to measure it with (a note says so)
    assert set(doc["kernels"]["types"]) >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_1"}  # every type the registry uses
    assert bench.kernels is not None and doc["disk"]["read_mb_s"] > 0 and doc["startup"]["port_open_ms"] > 0
    assert doc["fingerprint"] == fingerprint(HW) and doc["bench_version"] == BENCH_VERSION
    assert doc["probe"]["source"] == "given-file" and doc["probe"]["path"] == str(tiny_probe)
    assert doc["probe"]["threads"] == 2
    assert "bench.llm" in seen and "bench.cached" not in seen
    cached_file = cache_path(cache, HW)
    assert json.loads(cached_file.read_text()) == doc
    # No temp file left; the kernel probes are kept (complete) for the next run.
    assert sorted(p.name for p in cache.iterdir()) == sorted([cached_file.name, "probes"])
    assert not list((cache / "probes").glob("*.part"))

    seen.clear()
    again = run_bench(hardware=HW, models_dir=empty_models, registry=registry, cache_dir=cache,
                      probe_path=tiny_probe, log=log)
    assert again == doc
    assert seen == ["bench.cached"]  # no measurement ran

    seen.clear()
    fresh = run_bench(hardware=HW, models_dir=empty_models, registry=registry, cache_dir=cache,
                      probe_path=tiny_probe, refresh=True, log=log)
    assert "bench.llm" in seen and "bench.cached" not in seen
    assert fresh["probe"]["runs"] != doc["probe"]["runs"]  # measured again: wall-clock samples never repeat
    assert json.loads(cached_file.read_text()) == fresh

    other = replace(HW, gpus=(Gpu(vendor="nvidia", name="RTX 4090", vram_gb=24.0),))
    assert fingerprint(other) != fingerprint(HW)
    seen.clear()
    run_bench(hardware=other, models_dir=empty_models, registry=registry, cache_dir=cache,
              probe_path=tiny_probe, log=log)
    assert "bench.llm" in seen and "bench.cached" not in seen
    assert cache_path(cache, other).is_file() and cache_path(cache, HW).is_file()


def test_run_bench_ignores_a_corrupt_or_foreign_cache(tmp_path: Path, tiny_probe: Path, registry: Any) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache_path(cache, HW).write_text("{not json")
    seen, log = _events()
    doc = run_bench(hardware=HW, models_dir=tmp_path, registry=registry, cache_dir=cache,
                    probe_path=tiny_probe, log=log)
    assert "bench.llm" in seen
    # The same fingerprint but another probe file: the cached figures are not about this probe.
    other_probe = tmp_path / "copy.gguf"
    other_probe.write_bytes(tiny_probe.read_bytes())
    seen.clear()
    doc2 = run_bench(hardware=HW, models_dir=tmp_path, registry=registry, cache_dir=cache,
                     probe_path=other_probe, log=log)
    assert "bench.llm" in seen and doc2["probe"]["path"] != doc["probe"]["path"]


def test_run_bench_with_embedded_speech_models(tmp_path: Path, tiny_probe: Path, registry: Any) -> None:
    stt_dir, _voice = _embedded()
    models_dir = default_models_dir()
    doc = run_bench(hardware=HW, models_dir=models_dir, registry=registry, cache_dir=tmp_path,
                    probe_path=tiny_probe)
    bench = Bench.from_dict(doc)
    assert bench.stt_ms is not None and bench.stt_ms > 0
    assert bench.tts_ms is not None and bench.tts_ms > 0
    assert doc["stt_model"] == "whisper-tiny.en" and doc["tts_model"] == "piper-en_US-joe-medium"
    assert doc["stt"]["wer"] <= 0.1 and doc["notes"] == []
    # The embedded LLM decoding while Piper speaks: both measured, the ratios the turn prediction applies.
    c = doc["contention"]
    assert c["decode_tok_s_alone"] > 0 and c["decode_tok_s_with_tts"] > 0 and c["tts_runs_with_llm"] >= 1
    assert c["decode_factor"] == round(c["decode_tok_s_with_tts"] / c["decode_tok_s_alone"], 3)


def test_fingerprint_is_stable_and_sensitive() -> None:
    assert fingerprint(HW) == fingerprint(replace(HW, disk_free_gb=1.0, notes=("x",)))
    assert fingerprint(HW) == fingerprint(replace(HW, ram_gb=23.6))  # rounding: MemTotal wobbles
    for changed in (replace(HW, cpu_model="Other"), replace(HW, cpu_cores=4), replace(HW, cpu_flags=("avx2",)),
                    replace(HW, ram_gb=8.0), replace(HW, arch="arm64"), replace(HW, os="darwin")):
        assert fingerprint(changed) != fingerprint(HW)


def test_real_tinyllama_is_preferred_when_installed(tmp_path: Path, registry: Any) -> None:
    model = registry.models[PROBE_MODEL_ID]
    models_dir = tmp_path / "models"
    real = models_dir / model.dest
    real.parent.mkdir(parents=True)
    with open(real, "wb") as fh:
        fh.truncate(model.file_bytes - 1)  # wrong size: not trusted
    assert bench_mod.real_probe_path(registry, models_dir) is None
    with open(real, "wb") as fh:
        fh.truncate(model.file_bytes)  # sparse: no disk used
    assert bench_mod.real_probe_path(registry, models_dir) == real
    path, source = bench_mod._choose_probe(registry, models_dir, tmp_path / "cache", None)
    assert (path, source) == (real, "tinyllama-file")
    path, source = bench_mod._choose_probe(registry, tmp_path / "none", tmp_path / "cache", None)
    assert source == "tinyllama-shaped-random" and path == bench_mod.random_probe_path(tmp_path / "cache")


def test_a_changed_engine_adapter_is_measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A result cached before the STT short window went on predicting the old, 5x slower transcript.
    from local_ai_server.setup import bench as bench_mod

    before = fingerprint(HW)
    fake_file = tmp_path / "local_ai_server" / "setup" / "bench.py"
    fake_engines = tmp_path / "local_ai_server" / "engines"
    fake_file.parent.mkdir(parents=True)
    fake_engines.mkdir(parents=True)
    for src in (Path(bench_mod.__file__).resolve().parent.parent / "engines").glob("*.py"):
        (fake_engines / src.name).write_bytes(src.read_bytes())
    monkeypatch.setattr(bench_mod, "__file__", str(fake_file))
    assert fingerprint(HW) == before  # same sources, same fingerprint
    (fake_engines / "stt.py").write_text((fake_engines / "stt.py").read_text() + "\n# changed\n")
    assert fingerprint(HW) != before
