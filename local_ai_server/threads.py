"""The thread environment every process that loads a model needs, set before the model libraries load."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# libgomp (llama.cpp, CTranslate2) busy-waits 300k spins after each parallel region by default; on a small
# box that starves the other stages. Capped, it sleeps soon after: the figures in the README need it.
GOMP_SPINCOUNT = "1000"


def thread_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set the thread variables in `env` (this process's environment by default) unless already set."""
    target = os.environ if env is None else env
    target.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    return target
