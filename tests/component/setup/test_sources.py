"""Which tiers can be fetched from here, checked against a real local HTTP server and a closed port."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest

from local_ai_server.setup.registry import Registry, load_registry, parse_registry
from local_ai_server.setup.sources import reachable, unavailable_tiers
from tests.installer_fixtures import FaultServer, registry_doc
from tests.paths import REPO


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nobody listens


def with_url_tier(url: str) -> Registry:
    """The test registry (tier `tiny`, all from a wheel) plus tier URL_TIER whose LLM comes from `url`."""
    doc = copy.deepcopy(registry_doc("0" * 64))
    tier = doc["tiers"]["tiny"]
    model_id = tier["models"]["llm"]
    model = copy.deepcopy(doc["models"][model_id])
    model["id"] = "url-llm"
    model["dest"] = "llm/url.gguf"
    model["files"] = [{"path": "llm/url.gguf", "size_bytes": 4, "sha256": "0" * 64,
                       "sources": [{"kind": "url", "url": url}]}]
    doc["models"]["url-llm"] = model
    doc["tiers"]["URL_TIER"] = {**copy.deepcopy(tier), "models": {**tier["models"], "llm": "url-llm"}}
    return parse_registry(doc, source="test")


def test_reachable_on_a_live_server_even_for_a_missing_path(fault_server: FaultServer) -> None:
    assert reachable(f"{fault_server.base_url}/no/such/file", timeout=5) is None


def test_unreachable_closed_port_and_unknown_host() -> None:
    assert reachable(f"http://127.0.0.1:{closed_port()}/x", timeout=5) is not None
    why = reachable("http://no-such-host.invalid/x", timeout=5)
    assert why is not None and "no-such-host.invalid" in why


def test_url_tier_available_when_host_answers(fault_server: FaultServer, tmp_path: Path) -> None:
    reg = with_url_tier(f"{fault_server.base_url}/llm.gguf")
    assert unavailable_tiers(reg, tmp_path) == {}


def test_url_tier_unavailable_when_host_does_not_answer(tmp_path: Path) -> None:
    reg = with_url_tier(f"http://127.0.0.1:{closed_port()}/llm.gguf")
    out = unavailable_tiers(reg, tmp_path)
    assert set(out) == {"url_tier"}  # the wheel-only tier is still fine
    assert "127.0.0.1" in out["url_tier"] and "cannot reach" in out["url_tier"]


def test_mirror_that_answers_makes_the_tier_available(fault_server: FaultServer, tmp_path: Path) -> None:
    reg = with_url_tier("https://huggingface.co/org/repo/resolve/main/llm.gguf")
    probed: list[str] = []

    def probe(url: str) -> str | None:
        probed.append(url)
        return None if url.startswith(fault_server.base_url) else "unreachable"

    assert unavailable_tiers(reg, tmp_path, mirror=fault_server.base_url, probe=probe) == {}
    assert probed[0].startswith(fault_server.base_url)


def test_offline_never_probes_and_blocks_url_tiers(tmp_path: Path) -> None:
    reg = with_url_tier("https://huggingface.co/org/repo/resolve/main/llm.gguf")

    def probe(url: str) -> str | None:
        raise AssertionError(f"offline must not contact {url}")

    out = unavailable_tiers(reg, tmp_path, offline=True, probe=probe)
    assert set(out) == {"url_tier"} and "--offline" in out["url_tier"]


def test_a_file_already_present_needs_no_source(tmp_path: Path) -> None:
    reg = with_url_tier(f"http://127.0.0.1:{closed_port()}/llm.gguf")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "url.gguf").write_bytes(b"abcd")  # the registry's size: 4 bytes
    assert unavailable_tiers(reg, tmp_path, offline=True) == {}
    (tmp_path / "llm" / "url.gguf").write_bytes(b"abc")  # a truncated file does not count
    assert set(unavailable_tiers(reg, tmp_path, offline=True)) == {"url_tier"}


def test_each_host_is_probed_once(tmp_path: Path) -> None:
    calls: list[str] = []

    def probe(url: str) -> str | None:
        calls.append(url)
        return "down"

    out = unavailable_tiers(load_registry(REPO / "registry.json"), tmp_path, probe=probe)
    assert calls == ["https://huggingface.co/"]
    assert "embedded" not in out  # PyPI wheels: the installer reaches the package index anyway
    assert {"light_cpu", "medium_cpu", "heavy_cpu", "medium_gpu", "heavy_gpu"} <= set(out)


@pytest.mark.parametrize("offline", [False, True])
def test_real_registry_embedded_is_always_available(tmp_path: Path, offline: bool) -> None:
    out = unavailable_tiers(load_registry(REPO / "registry.json"), tmp_path, offline=offline,
                            probe=lambda url: "down")
    assert "embedded" not in out
