"""What the server says about itself over AVA's protocol: status, capabilities, backends, their schema."""

from __future__ import annotations

import platform
from typing import Any

from .. import protocol as P
from ..config import ServerConfig, cpu_count
from ..runtime import FETCH_HINT, Engines

# How well tools work here, in the shape AVA's engine reads (`models.llm.tool_capability`). Decisions are
# held to the declared tools by a grammar, so a call is always well formed; whether the model picks the
# right tool depends on the model, hence "partial" (AVA then sends llm_tool_request where it needs one).
TOOL_CAPABILITY = {"level": "partial", "source": "local-ai-server", "structured_mode": "grammar",
                   "notes": "tool calls are JSON held by a llama.cpp grammar to the declared tools; end of call "
                            "is recognised from the caller's words"}
NO_TOOLS = {"level": "none", "source": "local-ai-server", "notes": "no LLM loaded"}

# AVA's backend catalogue, with what this server has of it (the rest is listed as unavailable).
_STT = ("vosk", "sherpa", "kroko", "faster_whisper", "whisper_cpp", "tone")
_TTS = ("piper", "kokoro", "melotts", "silero", "matcha")
_LLM = ("llama_cpp",)


def _field(kind: str, description: str, default: Any = None, enum: list[Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, "required": False, "description": description}
    if default is not None:
        spec["default"] = default
    if enum is not None:
        spec["enum"] = enum
    return spec


def _schemas(cfg: ServerConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Each available backend's settings, with this server's values as defaults."""
    llm, stt = cfg.llm, cfg.stt
    return {
        "faster_whisper": {
            "model_path": _field("string", "CTranslate2 model folder (switch_model stt_model_path)"),
            "device": _field("string", "where it runs (LOCAL_STT_DEVICE)", stt.device, ["cpu", "cuda", "auto"]),
            "compute_type": _field("string", "precision", stt.compute_type),
            "language": _field("string", "language of the speech", stt.language),
            "threads": _field("integer", "CPU threads (LOCAL_STT_THREADS)", stt.threads),
        },
        "piper": {
            "model_path": _field("string", "voice .onnx with its .onnx.json (switch_model tts_model_path)"),
            "threads": _field("integer", "onnxruntime threads (LOCAL_TTS_THREADS)", cfg.tts.threads),
        },
        "llama_cpp": {
            "model_path": _field("string", "GGUF file (switch_model llm_model_path)"),
            "threads": _field("integer", "threads per worker (LOCAL_LLM_THREADS)", llm.threads),
            "context": _field("integer", "context window in tokens (LOCAL_LLM_CONTEXT)", llm.context),
            "batch": _field("integer", "prompt batch size", llm.batch),
            "max_tokens": _field("integer", "answer length limit (LOCAL_LLM_MAX_TOKENS)", llm.max_tokens),
            "temperature": _field("number", "sampling temperature", llm.temperature),
            "top_p": _field("number", "nucleus sampling", llm.top_p),
            "repeat_penalty": _field("number", "repetition penalty", llm.repeat_penalty),
            "gpu_layers": _field("integer", "layers offloaded to a GPU build", llm.gpu_layers),
        },
    }


def _available(engines: Engines) -> dict[str, bool]:
    return {"faster_whisper": engines.stt is not None, "piper": engines.tts is not None,
            "llama_cpp": engines.pool.state == "ready"}


def _with_rid(msg: dict[str, Any], request_id: P.RequestId) -> dict[str, Any]:
    if request_id is not None:
        msg["request_id"] = request_id
    return msg


def hardware(cfg: ServerConfig) -> dict[str, Any]:
    """What this process runs on; the installer's description (CPU model, GPU) when it left one."""
    hw: dict[str, Any] = {"cpu_cores": cpu_count(), "arch": platform.machine(), "gpu": None,
                          "llm_gpu_layers": cfg.llm.gpu_layers, "stt_device": cfg.stt.device}
    installed = (cfg.expected or {}).get("hardware")
    if isinstance(installed, dict):
        hw |= {k: installed[k] for k in ("cpu_model", "ram_gb", "gpu") if k in installed}
    return hw


def status_response(engines: Engines, cfg: ServerConfig, *, sessions: int, uptime_s: float,
                    request_id: P.RequestId) -> dict[str, Any]:
    """status_response: AVA's fields plus our extensions."""
    e = engines
    missing = e.missing()
    degraded = bool(missing) and not e.warming
    models = e.model_status()
    models["llm"]["tool_capability"] = dict(TOOL_CAPABILITY if e.pool.state == "ready" else NO_TOOLS)
    msg: dict[str, Any] = {
        "type": "status_response",
        "status": "warming_up" if e.warming else "ok",
        "stt_backend": P.STT_BACKEND,
        "tts_backend": P.TTS_BACKEND,
        "models": models,
        "config": {
            "host": cfg.host,
            "port": cfg.port,
            "auth_required": cfg.auth_token is not None,
            "models_dir": None,
            "stt_idle_ms": cfg.stt.idle_ms,
            "segment_silence_ms": cfg.stt.silence_ms,
            "segment_energy_threshold": cfg.stt.energy_threshold,
            "output_encoding": "mulaw",
            "output_sample_rate_hz": 8000,
            "llm_workers": cfg.llm.workers,
            "llm_max_queue": cfg.llm.max_queue,
            "degraded": degraded,
        },
        "degraded": degraded,
        "missing": missing,
        "tier": cfg.tier,
        "hardware": hardware(cfg),
        "expected": cfg.expected,
        "pool": e.pool.snapshot(),
        "sessions": sessions,
        "uptime_s": uptime_s,
    }
    if degraded:
        msg["hint"] = FETCH_HINT
    return _with_rid(msg, request_id)


def capabilities_response(engines: Engines, request_id: P.RequestId) -> dict[str, Any]:
    """capabilities_response: AVA's keys (true only for what is loaded here) plus our extensions."""
    have = _available(engines)
    caps = {name: False for name in ("vosk", "sherpa", "kroko_embedded", "faster_whisper", "whisper_cpp", "tone",
                                     "piper", "kokoro", "melotts", "silero", "matcha", "llama")}
    # AVA's `silero` is Silero TTS; the Silero VAD this server runs is reported as `silero_vad`.
    caps |= {"faster_whisper": have["faster_whisper"], "piper": have["piper"], "llama": have["llama_cpp"],
             "silero_vad": engines.vad is not None, "streaming_llm": True, "barge_in": True, "partials": True,
             "tool_calling": have["llama_cpp"]}
    return _with_rid({"type": "capabilities_response", "capabilities": caps}, request_id)


def backends_response(engines: Engines, request_id: P.RequestId) -> dict[str, Any]:
    """backends_response: every backend AVA knows, with whether it is available here and its schema."""
    have, schemas = _available(engines), _schemas(engines.cfg)

    def listing(names: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"name": n, "available": have.get(n, False), "schema": schemas.get(n, {})} for n in names]

    return _with_rid({"type": "backends_response", "stt": listing(_STT), "tts": listing(_TTS),
                      "llm": listing(_LLM)}, request_id)


def backend_schema_response(engines: Engines, backend_type: str, backend_name: str,
                            request_id: P.RequestId) -> dict[str, Any]:
    """backend_schema_response for one backend; an unknown type or name gets only an `error` (as AVA)."""
    catalogue = {"stt": _STT, "tts": _TTS, "llm": _LLM}
    if backend_type not in catalogue:
        return _with_rid({"type": "backend_schema_response", "error": f"Unknown backend type: {backend_type}"},
                         request_id)
    if backend_name not in catalogue[backend_type]:
        return _with_rid({"type": "backend_schema_response", "error": f"Unknown backend: {backend_name}"},
                         request_id)
    return _with_rid({"type": "backend_schema_response", "backend_type": backend_type,
                      "backend_name": backend_name, "schema": _schemas(engines.cfg).get(backend_name, {}),
                      "available": _available(engines).get(backend_name, False)}, request_id)
