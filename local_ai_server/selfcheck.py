"""Install-time smoke test: load the selected LLM and decode a few tokens (a bad build crashes here)."""

from __future__ import annotations

import sys
import time

from local_ai_server.threads import thread_env

thread_env()


def main() -> int:
    """Decode a short answer with the selected LLM; exit 0 and print tok/s, or exit 1 with a reason."""
    from .config import cpu_count
    from .engines.llm import LlamaEngine, LlmParams, SamplingParams
    from .setup.selection import default_models_dir, read_selection

    models_dir = default_models_dir()
    selection = read_selection(models_dir)
    if selection is None:
        print(f"selfcheck: no selected.json in {models_dir}", file=sys.stderr)
        return 1
    path = selection.path("llm")
    engine = LlamaEngine(path, LlmParams(context=512, threads=min(cpu_count(), 8), batch=64, gpu_layers=0))
    t0 = time.monotonic()
    tokens = sum(1 for _ in engine.stream([("user", "Say hello.")], SamplingParams(8, 0.0, 1.0, 1.0),
                                          lambda: False))
    elapsed = time.monotonic() - t0
    print(f"selfcheck: LLM ok ({tokens} tokens in {elapsed * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
