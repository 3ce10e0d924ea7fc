"""Admission: calls in progress against LOCAL_MAX_CALLS, the default derived from the cores, /ready's `full`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from local_ai_server import config
from local_ai_server.admission import Admission, default_max_calls
from local_ai_server.config import ConfigError, from_env


def test_calls_are_admitted_up_to_the_limit_and_the_next_is_refused() -> None:
    a = Admission(2)
    assert a.admit(1) and a.admit(2)
    assert a.full() and a.active == 2
    assert not a.admit(3)
    assert a.refused == 1 and not a.admitted(3)
    # A call already admitted keeps its place, whatever it asks next.
    assert a.admit(1) and a.refused == 1


def test_a_released_place_is_taken_by_the_next_call() -> None:
    a = Admission(1)
    assert a.admit(7)
    assert not a.admit(8)
    a.release(7)
    a.release(7)  # twice (stop_session, then the connection's end): no harm
    a.release(99)  # a connection that never took a place
    assert not a.full() and a.active == 0
    assert a.admit(8) and a.admitted(8)


def test_zero_means_no_limit() -> None:
    a = Admission(0)
    assert all(a.admit(i) for i in range(1000))
    assert not a.full() and a.refused == 0


def test_default_is_four_calls_per_core_and_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [default_max_calls(c) for c in (1, 2, 4, 16)] == [4, 8, 16, 64]
    monkeypatch.setattr(config, "cpu_count", lambda: 2)
    assert from_env({}, models_dir=Path("/m")).max_calls == 8
    assert from_env({"LOCAL_MAX_CALLS": "3"}, models_dir=Path("/m")).max_calls == 3
    assert from_env({"LOCAL_MAX_CALLS": "0"}, models_dir=Path("/m")).max_calls == 0
    with pytest.raises(ConfigError, match="LOCAL_MAX_CALLS"):
        from_env({"LOCAL_MAX_CALLS": "-1"}, models_dir=Path("/m"))


def test_ready_says_full_while_every_place_is_taken() -> None:
    from local_ai_server import probes
    from local_ai_server.hub import Hub

    hub = Hub(from_env({"LOCAL_MAX_CALLS": "1", "LOCAL_LLM_MODEL_PATH": "/nonexistent.gguf"}, models_dir=Path("/m")))
    try:
        hub.engines.missing = lambda modes=("stt", "llm", "tts"): []  # type: ignore[method-assign]
        hub.engines.warming = False
        assert probes.probe("/ready", hub).status_code == 200
        assert hub.admit(1, "ava")
        response = probes.probe("/ready", hub)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert json.loads(response.body) == {"status": "full", "calls": 1, "max_calls": 1, "message": (
            "every call place is taken: new calls are refused busy, calls in progress go on")}
        assert not hub.admit(2, "wyoming")
        assert 'las_calls_refused_total{front="wyoming"} 1.0' in hub.metrics.render().decode()
        assert "las_calls_active 1.0" in hub.metrics.render().decode()
        hub.release(1)
        assert probes.probe("/ready", hub).status_code == 200
        # Draining wins over full: the load balancer must see the instance going away.
        hub.admit(3, "ava")
        hub.draining = True
        assert json.loads(probes.probe("/ready", hub).body)["status"] == "draining"
    finally:
        for ex in (hub.engines.stt_exec, hub.engines.tts_exec, hub.engines.aux_exec):
            ex.shutdown(wait=False)
