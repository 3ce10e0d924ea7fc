"""The installer's constraints on the plan: --cpu-only, --gpu, the llama.cpp build, tiers that cannot be fetched."""

from __future__ import annotations

import pytest

from local_ai_server.setup.plan import Constraints, PlanError, make_plan
from local_ai_server.setup.registry import Registry, load_registry
from tests.paths import REPO
from tests.unit.setup.test_hardware import machine


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REPO / "registry.json")


def gpu_tiers(registry: Registry) -> set[str]:
    return {t.name for t in registry.tiers.values() if t.requirements.get("gpu") is True}


def test_cpu_only_keeps_a_gpu_box_on_the_cpu(registry: Registry) -> None:
    plan = make_plan(registry, machine("ryzen-7950x-rtx4090"), constraints=Constraints(gpu="off"))
    assert plan.tier not in gpu_tiers(registry) and plan.chosen.device.kind == "cpu"
    for a in plan.assessments:
        if a.tier in gpu_tiers(registry):
            assert not a.fits and "GPU tiers are disabled (--cpu-only)" in a.reasons


def test_cpu_only_alias_resolves_to_the_cpu_variant(registry: Registry) -> None:
    plan = make_plan(registry, machine("ryzen-7950x-rtx4090"), tier="medium", constraints=Constraints(gpu="off"))
    assert plan.tier == "MEDIUM_CPU"
    assert make_plan(registry, machine("ryzen-7950x-rtx4090"), tier="medium").tier == "MEDIUM_GPU"


def test_gpu_required_on_a_gpu_box_gets_a_gpu_tier(registry: Registry) -> None:
    plan = make_plan(registry, machine("ryzen-7950x-rtx4090"), constraints=Constraints(gpu="require",
                                                                                      llama_backend="cuda"))
    assert plan.tier in gpu_tiers(registry)
    cpu_rows = [a for a in plan.assessments if a.tier not in gpu_tiers(registry)]
    assert cpu_rows and all(not a.fits for a in cpu_rows)


def test_gpu_required_without_a_gpu_fails_saying_why(registry: Registry) -> None:
    with pytest.raises(PlanError) as info:
        make_plan(registry, machine("xeon-e5-2660v3"), constraints=Constraints(gpu="require"))
    assert "--gpu" in str(info.value) and "needs a GPU, none detected" in str(info.value)


def test_a_cpu_build_cannot_serve_a_gpu_tier(registry: Registry) -> None:
    # An NVIDIA card without the CUDA toolkit: llama.cpp was built for the CPU, so no GPU tier.
    plan = make_plan(registry, machine("ryzen-7950x-rtx4090"), constraints=Constraints(llama_backend="cpu"))
    assert plan.tier not in gpu_tiers(registry)
    heavy_gpu = next(a for a in plan.assessments if a.tier == "HEAVY_GPU")
    assert not heavy_gpu.fits
    assert any("built for cpu" in r and "cuda" in r for r in heavy_gpu.reasons)
    # The matching build keeps it.
    assert make_plan(registry, machine("ryzen-7950x-rtx4090"),
                     constraints=Constraints(llama_backend="cuda")).tier == "HEAVY_GPU"


def test_amd_needs_a_hip_build(registry: Registry) -> None:
    hw = machine("amd-rx7900xtx")
    assert make_plan(registry, hw, constraints=Constraints(llama_backend="hip")).tier.endswith("_GPU")
    assert not make_plan(registry, hw, constraints=Constraints(llama_backend="cuda")).tier.endswith("_GPU")


def test_apple_needs_metal(registry: Registry) -> None:
    hw = machine("apple-m1")
    medium_gpu = {b: next(a for a in make_plan(registry, hw, constraints=Constraints(llama_backend=b)).assessments
                          if a.tier == "MEDIUM_GPU") for b in ("metal", "cpu")}
    assert medium_gpu["metal"].fits and medium_gpu["metal"].device.kind == "gpu"
    assert not medium_gpu["cpu"].fits
    assert any("built for cpu" in r and "metal" in r for r in medium_gpu["cpu"].reasons)


def test_unreachable_tiers_fall_back_and_say_what_was_preferred(registry: Registry) -> None:
    hw = machine("ryzen-7950x-rtx4090")
    blocked = {t.name.lower(): "its files come from huggingface.co, which this machine cannot reach (x)"
               for t in registry.tiers.values() if t.name != "embedded"}
    plan = make_plan(registry, hw, constraints=Constraints(unavailable=blocked))
    assert plan.tier == "embedded"
    assert plan.preferred == "HEAVY_GPU"
    assert plan.fallback is not None and plan.fallback.startswith("HEAVY_GPU suits this machine")
    assert "installing embedded instead" in plan.fallback and plan.why[0] == plan.fallback
    doc = plan.to_dict(registry)
    assert doc["preferred_tier"] == "HEAVY_GPU" and doc["fallback"] == plan.fallback
    assert doc["inputs"]["constraints"]["unavailable"] == blocked
    # Every tier still carries its prediction, so the operator sees what a mirror would buy.
    assert {row["tier"] for row in doc["tiers"]} == {t.name for t in registry.tiers.values()}


def test_no_fallback_note_when_nothing_better_was_blocked(registry: Registry) -> None:
    hw = machine("this-machine")
    plan = make_plan(registry, hw, constraints=Constraints(unavailable={"heavy_gpu": "unreachable"}))
    assert plan.fallback is None and plan.preferred is None


def test_requested_tier_that_cannot_be_fetched_is_refused(registry: Registry) -> None:
    with pytest.raises(PlanError) as info:
        make_plan(registry, machine("this-machine"), tier="light",
                  constraints=Constraints(unavailable={"light_cpu": "its files come from huggingface.co, which "
                                                                    "this machine cannot reach (x)"}))
    assert "LIGHT_CPU cannot be installed from here" in str(info.value)
