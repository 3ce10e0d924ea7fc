"""The cost model: every registry LLM's recorded shape and tensor types, its per-token bytes and weights, the
rates a recorded benchmark gives, the ranges, the turn's contention and the cold start; no model runs here."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from local_ai_server.setup.cli_common import expectation_lines
from local_ai_server.setup.llm_shape import LlmShape, ShapeError, q4_k_m_more_bits, shape_from_dict
from local_ai_server.setup.plan import Bench, cpu_device, make_plan, predict
from local_ai_server.setup.plan_cost import KernelRates, calibration, llm_cost, measured_cost, reference_errors
from local_ai_server.setup.probe_typed import block_pool
from local_ai_server.setup.registry import Registry, load_registry
from local_ai_server.setup.turn import compare
from tests.paths import INSTALLER_FIXTURES, REPO
from tests.unit.setup.test_hardware import machine

pytestmark = pytest.mark.unit

# `model_setup.py bench` (version 3) on the 2-core EPYC these tests were written on, and a
# `bench/predict_check.py --out` run there: per round, the rates measured and every CPU tier's LLM measured.
RECORDED_BENCH = INSTALLER_FIXTURES / "this-machine" / "bench-v3.json"
RECORDED_CHECK = INSTALLER_FIXTURES / "this-machine" / "predict-check.json"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REPO / "registry.json")


def recorded_bench() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RECORDED_BENCH.read_text())
    return doc


def shape(registry: Registry, model_id: str) -> LlmShape:
    s = registry.models[model_id].shape
    assert s is not None
    return s


# --- the recorded shapes ---------------------------------------------------------------------------


def test_every_llm_in_the_registry_has_a_shape_with_its_source(registry: Registry) -> None:
    llms = [m for m in registry.models.values() if m.role == "llm"]
    assert len(llms) >= 7
    for m in llms:
        assert m.shape is not None, m.id
        assert len(m.shape.source) > 80, m.id  # where each fact came from


def test_recorded_tensors_add_up_to_the_published_file_sizes(registry: Registry) -> None:
    # The tensors' bytes plus a header (vocabulary, merges, chat template) make the published size; files
    # sharing a tokenizer leave the same header: a wrong type anywhere would shift it by megabytes.
    headers: dict[str, list[int]] = {}
    for m in registry.models.values():
        if m.shape is None:
            continue
        header = m.file_bytes - m.shape.tensor_bytes
        assert 1_000_000 < header < 10_000_000, (m.id, header)
        headers.setdefault(f"{m.shape.arch}-{m.shape.n_vocab // 1000}", []).append(header)
    qwen = headers["qwen2-151"] + headers["qwen2-152"]
    llama32 = headers["llama-128"]
    assert len(qwen) == 3 and max(qwen) - min(qwen) < 16_384
    assert len(llama32) == 2 and max(llama32) - min(llama32) < 16_384
    # The embedded file's header was read from the file itself: its tensor data starts there.
    assert registry.models["smollm2-135m-instruct-q4_1"].file_bytes - \
        shape(registry, "smollm2-135m-instruct-q4_1").tensor_bytes == 1_785_664


def test_parameter_counts_match_what_llama_cpp_reports(registry: Registry) -> None:
    assert shape(registry, "tinyllama-1.1b-chat-v1.0-q4_k_m").params == 1_100_048_384
    assert shape(registry, "smollm2-135m-instruct-q4_1").params == 134_515_008
    assert shape(registry, "llama-3.2-1b-instruct-q4_k_m").params == 1_235_814_400


def test_a_token_reads_the_output_projection_but_not_an_untied_embedding(registry: Registry) -> None:
    qwen = shape(registry, "qwen2.5-0.5b-instruct-q4_k_m")  # untied on disk: Q5_0 embedding, Q8_0 output
    per_token = sum(qwen.decode_bytes().values())
    embd = next(t for t in qwen.tensors() if t.name == "token_embd.weight")
    assert per_token == qwen.tensor_bytes - embd.nbytes - _vectors(qwen)
    assert per_token < 0.81 * registry.models[qwen.name].file_bytes  # file size overstates it by ~25 %
    assert qwen.decode_bytes()["Q8_0"] > 0.35 * per_token  # the output projection dominates a small model
    llama = shape(registry, "llama-3.2-3b-instruct-q4_k_m")  # tied: the embedding is the output
    assert sum(llama.decode_bytes().values()) == llama.tensor_bytes - _vectors(llama)


def _vectors(s: LlmShape) -> int:
    return sum(-(-t.nbytes // 32) * 32 for t in s.tensors() if t.rows == 1) + \
        sum(-(-t.nbytes // 32) * 32 - t.nbytes for t in s.tensors() if t.rows > 1)


def test_q4_k_m_more_bits_layers() -> None:
    assert q4_k_m_more_bits(24) == (0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23)
    assert len(q4_k_m_more_bits(28)) == 14 and len(q4_k_m_more_bits(16)) == 8


@pytest.mark.parametrize(("change", "message"), [
    ({"n_embd": 900}, "divide"),
    ({"tensor_types": {"attn_q": "Q4_K"}}, "missing"),
    ({"arch": "gpt2"}, "arch"),
    ({"tensor_types_extra": 1}, "unknown key"),
])
def test_bad_architectures_are_refused(registry: Registry, change: dict[str, Any], message: str) -> None:
    doc = shape(registry, "tinyllama-1.1b-chat-v1.0-q4_k_m").to_dict() | change
    with pytest.raises(ShapeError, match=message):
        shape_from_dict("x", doc)


def test_a_type_whose_block_does_not_divide_the_row_is_refused(registry: Registry) -> None:
    doc = shape(registry, "qwen2.5-0.5b-instruct-q4_k_m").to_dict()
    doc["tensor_types"] = doc["tensor_types"] | {"attn_q": "Q4_K"}  # 896 is no multiple of 256
    with pytest.raises(ShapeError, match="block of 256"):
        shape_from_dict("x", doc)


@pytest.mark.parametrize("kind", ["F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_probe_blocks_are_valid_small_weights(kind: str) -> None:
    import gguf
    from gguf import quants

    weights = quants.dequantize(block_pool(kind).reshape(-1), gguf.GGMLQuantizationType[kind])
    assert np.isfinite(weights).all() and 0.003 < float(weights.std()) < 0.05 and float(abs(weights).max()) < 0.2


# --- rates from a recorded benchmark ---------------------------------------------------------------


def test_rates_come_from_the_recorded_kernel_probes(registry: Registry) -> None:
    rates = KernelRates.from_bench(recorded_bench())
    assert rates is not None
    assert set(rates.decode_ms_per_mb) >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_1"}
    assert rates.decode_overhead.b > 0  # each layer costs a token something, whatever its width
    for table in (rates.decode_ms_per_mb, rates.prefill_ms_per_mparam, rates.ttft_ms_per_mparam):
        assert all(v > 0 for v in table.values())


def test_the_recorded_predict_check_is_reproduced_and_within_its_error(registry: Registry) -> None:
    # For each recorded round (a quiet moment of the 2-core EPYC: other processes used 0.01 cores): the rates
    # measured then, priced through today's code, give the prediction the round recorded; the three tiers
    # whose LLM the installer models were within 10 % every round. The embedded LLM, which the installer
    # measures instead of modelling, is the model's weak end (30 narrow layers): within 45 %.
    check = json.loads(RECORDED_CHECK.read_text())
    for rnd in check["rounds"]:
        for row in rnd["rows"]:
            rates = KernelRates.from_bench({"kernels": row["kernels"]})
            assert rates is not None
            refs = [(shape(registry, m), measured) for m, measured in row["references"].items()]
            assert row["model"] not in row["references"]  # never calibrated on the model being checked
            calib = calibration(rates, refs)
            assert calib == pytest.approx(row["figures_calibration"], abs=0.001)
            cost = llm_cost(shape(registry, row["model"]), rates, {}, calib)
            got = {"decode_tok_s": cost.decode_tok_s.p50, "prefill_tok_s": cost.prefill_tok_s.p50,
                   "ttft_ms": cost.ttft_ms.p50}
            for key, value in got.items():
                fig = row["figures"][key]
                assert value == pytest.approx(fig["predicted"], rel=0.01), (row["model"], key)
                limit = 0.45 if row["tier"] == "embedded" else 0.10
                assert abs(value - fig["measured"]) / fig["measured"] < limit, (row["model"], key)


def test_the_references_calibrate_the_model(registry: Registry) -> None:
    rates = KernelRates.from_bench(recorded_bench())
    assert rates is not None
    tiny = shape(registry, "tinyllama-1.1b-chat-v1.0-q4_k_m")
    probe = recorded_bench()["probe"]
    calib = calibration(rates, [(tiny, probe)])
    assert set(calib) == {"decode_tok_s", "prefill_tok_s", "ttft_ms"} and all(0.5 <= v <= 2 for v in calib.values())
    # With one reference, the calibrated model reproduces it (where the factor was not clamped to 0.5-2: this
    # recorded bench ran on a busy machine); its residual error is what remains.
    cost = llm_cost(tiny, rates, {}, calib)
    got = {"decode_tok_s": cost.decode_tok_s.p50, "prefill_tok_s": cost.prefill_tok_s.p50, "ttft_ms": cost.ttft_ms.p50}
    residual = reference_errors(rates, [(tiny, probe)], calib)
    free = [k for k, v in calib.items() if 0.5 < v < 2]
    assert free
    for key in free:
        assert got[key] == pytest.approx(probe[key], rel=1e-6) and residual[key] < 1e-6
    assert "calibrated on the reference LLMs" in cost.how


def test_the_embedded_llm_is_taken_as_measured(registry: Registry) -> None:
    bench = Bench.from_dict(recorded_bench())
    models = registry.tier_models("embedded")
    pred = predict(models, cpu_device(machine("this-machine")), bench, registry)
    small = recorded_bench()["small_probe"]
    assert pred.decode_tok_s == small["decode_tok_s"] and "decode_tok_s" in pred.measured
    assert pred.bounds["decode_tok_s"] <= min(small["runs"]["decode_tok_s"])
    cost = measured_cost(small)
    assert cost.decode_tok_s.measured and cost.ttft_ms.bound >= max(small["runs"]["ttft_ms"])


def test_bounds_are_pessimistic_and_widen_away_from_the_probes(registry: Registry) -> None:
    measured = KernelRates.from_bench(recorded_bench())
    assert measured is not None
    assert measured.spread > 0  # the recorded repeats disagreed: that noise alone widens every range
    rates = replace(measured, spread=0.0)  # so that the other causes show
    small, big = shape(registry, "qwen2.5-0.5b-instruct-q4_k_m"), shape(registry, "qwen2.5-7b-instruct-q4_k_m")
    a, b = llm_cost(small, rates, {}), llm_cost(big, rates, {})
    for cost in (a, b):
        assert cost.decode_tok_s.bound < cost.decode_tok_s.p50 and cost.ttft_ms.bound > cost.ttft_ms.p50
    assert b.decode_tok_s.p50 / b.decode_tok_s.bound > a.decode_tok_s.p50 / a.decode_tok_s.bound  # 4 GB/token
    unmeasured = replace(rates, decode_ms_per_mb={k: v for k, v in rates.decode_ms_per_mb.items() if k != "Q5_0"})
    c = llm_cost(small, unmeasured, {})
    assert c.decode_tok_s.p50 / c.decode_tok_s.bound > a.decode_tok_s.p50 / a.decode_tok_s.bound
    assert "no probe measured" in c.how
    errors = reference_errors(rates, [(shape(registry, "smollm2-135m-instruct-q4_1"), recorded_bench()["small_probe"])])
    d = llm_cost(small, rates, errors)
    assert d.decode_tok_s.bound <= a.decode_tok_s.bound


def test_the_tier_is_chosen_by_the_pessimistic_bound(registry: Registry) -> None:
    hw = machine("this-machine")
    bench = Bench.from_dict(recorded_bench())
    plan = make_plan(registry, hw, bench=bench)
    for a in plan.assessments:
        if a.meets_targets:
            req = registry.tiers[a.tier.lower()].requirements
            assert a.prediction.bound("decode_tok_s") >= req.get("min_decode_tok_s", 10)
            assert a.prediction.bound("first_audio_ms") <= req.get("max_first_audio_ms", 1500)
    # A tier whose p50 meets a target but whose bound does not is refused, and the reason gives the range.
    light = next(a for a in plan.assessments if a.tier == "LIGHT_CPU")
    target = (light.prediction.decode_tok_s + light.prediction.bound("decode_tok_s")) / 2
    raised = {**registry.tiers["light_cpu"].requirements, "min_decode_tok_s": target}
    tiers = dict(registry.tiers) | {"light_cpu": replace(registry.tiers["light_cpu"], requirements=raised)}
    strict = replace(registry, tiers=tiers)
    refused = next(a for a in make_plan(strict, hw, bench=bench).assessments if a.tier == "LIGHT_CPU")
    assert not refused.meets_targets and any("at worst" in r for r in refused.reasons)


def test_the_turn_applies_the_measured_contention(registry: Registry) -> None:
    doc = recorded_bench()
    hw, models = machine("this-machine"), registry.tier_models("embedded")
    calm = doc | {"contention": {"decode_factor": 1.0, "tts_factor": 1.0}}
    busy = doc | {"contention": {"decode_factor": 0.4, "tts_factor": 1.5}}
    a = predict(models, cpu_device(hw), Bench.from_dict(calm), registry)
    b = predict(models, cpu_device(hw), Bench.from_dict(busy), registry)
    assert a.turn_decode_tok_s == pytest.approx(a.decode_tok_s)
    assert b.turn_decode_tok_s < 0.8 * b.decode_tok_s and b.decode_tok_s == a.decode_tok_s
    assert b.tts_first_ms == pytest.approx(1.5 * a.tts_first_ms)
    assert b.first_audio_ms > a.first_audio_ms and b.turn_ms > a.turn_ms
    assert "contention measured here" in b.how["turn"]


def test_the_cold_start_grows_with_the_files_and_a_slow_disk(registry: Registry) -> None:
    doc = recorded_bench()
    hw = machine("this-machine")
    bench = Bench.from_dict(doc)
    small = predict(registry.tier_models("embedded"), cpu_device(hw), bench, registry)
    big = predict(registry.tier_models("MEDIUM_CPU"), cpu_device(hw), bench, registry)
    slow = predict(registry.tier_models("embedded"), cpu_device(hw),
                   Bench.from_dict(doc | {"disk": {"read_mb_s": doc["disk"]["read_mb_s"] / 10}}), registry)
    assert 0 < small.ready_ms < big.ready_ms and small.ready_ms < slow.ready_ms
    assert small.bounds["ready_ms"] > small.ready_ms
    assert "measured" in small.how["ready"]


def test_without_a_benchmark_every_figure_is_an_estimate_with_a_wide_range(registry: Registry) -> None:
    pred = predict(registry.tier_models("MEDIUM_CPU"), cpu_device(machine("xeon-e5-2660v3")))
    assert pred.measured == ()
    assert pred.bounds["decode_tok_s"] <= pred.decode_tok_s / 1.5 + 0.01
    assert pred.bounds["ready_ms"] > pred.ready_ms > 0
    lines = expectation_lines(pred.to_dict(), pred.bounds_dict(), pred.measured)
    assert any(line.startswith("decode (the LLM alone):") and "(at worst" in line and line.endswith("estimate")
               for line in lines)
    assert any(line.startswith("cold start to /ready:") for line in lines)


def test_verify_says_whether_a_measurement_fell_in_the_promised_range() -> None:
    rows = compare({"turn_decode_tok_s": 31.0, "ready_ms": 4000.0, "stt_ms": 400.0},
                   {"turn_decode_tok_s": 40.0, "ready_ms": 3000.0, "stt_ms": 380.0},
                   {"turn_decode_tok_s": 33.0, "ready_ms": 4500.0, "stt_ms": 420.0})
    assert rows["turn_decode_tok_s"]["within_bound"] is False
    assert rows["ready_ms"]["within_bound"] is True and rows["stt_ms"]["within_bound"] is True


def test_the_registry_refuses_an_architecture_that_cannot_be(registry: Registry) -> None:
    from local_ai_server.setup.registry import RegistryError, parse_registry

    doc = json.loads((REPO / "registry.json").read_text())
    broken = json.loads(json.dumps(doc))
    broken["models"]["qwen2.5-0.5b-instruct-q4_k_m"]["architecture"]["n_layer"] = "24"
    with pytest.raises(RegistryError, match=r"qwen2.5-0.5b-instruct-q4_k_m.*n_layer must be an integer"):
        parse_registry(broken)
    misplaced = json.loads(json.dumps(doc))
    misplaced["models"]["piper-en_US-joe-medium"]["architecture"] = doc["models"]["smollm2-135m-instruct-q4_1"][
        "architecture"]
    with pytest.raises(RegistryError, match="describes a GGUF LLM"):
        parse_registry(misplaced)
