"""The remote-backend tests' engine (local_ai_server.harness_engine) and their server environment."""

from __future__ import annotations

from local_ai_server.harness_engine import ALIAS, Engine
from local_ai_server.harness_engine import remote_env as engine_env

__all__ = ["ALIAS", "Engine", "remote_env"]


def remote_env(url: str, **extra: str) -> dict[str, str]:
    """Our server on the remote backend, probing it often, with long greedy answers on demand."""
    return engine_env(url, **{"LOCAL_LLM_REMOTE_PROBE_S": "0.5", "LOCAL_LLM_MAX_TOKENS": "1500",
                              "LOCAL_LLM_TEMPERATURE": "0", "LOCAL_LLM_REPEAT_PENALTY": "1.0", **extra})
