"""The `models` object of status_response: what each stage runs, from where, and its state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .llm_remote import RemoteLlm

if TYPE_CHECKING:
    from .runtime import Engines


def model_status(e: Engines) -> dict[str, Any]:
    """Each model's backend, path, display name, state (and the LLM's settings; a remote one's URL, no key)."""
    c = e.cfg.llm
    llm_path = e.pool.model_path
    remote_name = e.pool.served_model if isinstance(e.pool, RemoteLlm) else None
    status: dict[str, Any] = {
        "stt": {
            "backend": "faster_whisper",
            "loaded": e.stt is not None,
            "path": str(e.stt_state.path) if e.stt_state.path else None,
            "display": e.stt_state.path.name if e.stt_state.path else None,
            "state": e.stt_state.state,
        },
        "llm": {
            "loaded": e.pool.state == "ready",
            "backend": e.pool.backend if isinstance(e.pool, RemoteLlm) else "llama_cpp",
            "path": str(llm_path) if llm_path else None,
            "display": llm_path.name if llm_path else remote_name,
            "state": e.pool.state,
            "config": {
                "context": c.context,
                "threads": c.threads,
                "batch": c.batch,
                "max_tokens": c.max_tokens,
                "temperature": c.temperature,
                "top_p": c.top_p,
                "repeat_penalty": c.repeat_penalty,
                "gpu_layers": c.gpu_layers,
            },
        },
        "tts": {
            "backend": "piper",
            "loaded": e.tts is not None,
            "path": str(e.tts_state.path) if e.tts_state.path else None,
            "display": e.tts_state.path.stem if e.tts_state.path else None,
            "state": e.tts_state.state,
        },
    }
    if isinstance(e.pool, RemoteLlm):
        status["llm"]["url"] = e.pool.url  # never the key
    return status
