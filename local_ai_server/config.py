"""Frozen configuration dataclasses, built from environment variables, flags and selected.json."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .admission import default_max_calls
from .wyoming_uri import WyomingUri, parse_uri

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a phone call. "
    "Answer in one to three short, plain sentences that sound natural when spoken aloud. "
    "Never use lists, markdown, emojis, code or symbols. "
    "If you do not know something, say so briefly."
)

BACKENDS = ("local", "openai")
SCHEDULING = ("priority", "fifo")

LOOPBACK_HOSTS = ("localhost", "::1", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (an IP literal, or a known name)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A DNS name such as 127.example.com could resolve anywhere: only the well-known names count.
        return host in LOOPBACK_HOSTS


def cpu_count() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SttConfig:
    """Speech-to-text settings (faster-whisper + Silero VAD segmentation)."""

    model_path: Path | None
    threads: int
    compute_type: str = "int8"
    device: str = "cpu"  # cpu | cuda | auto (CTranslate2 has no ROCm or Metal backend)
    # Silence appended after an utterance in its own encoder window; None: Whisper's full 30 s window.
    pad_s: float | None = 2.0
    language: str = "en"
    beam_size: int = 1
    concurrency: int = 1
    idle_ms: int = 5000
    partial_interval_ms: int = 900
    speculate_ms: int = 200
    silence_ms: int = 500
    # RMS of a 32 ms window on the int16 scale below which a window never counts as speech.
    energy_threshold: int = 100
    vad_threshold: float = 0.5
    max_utterance_s: float = 30.0
    # Audio a session may have waiting to be segmented: a client sending faster than real time is held
    # to this (frames beyond it are refused with `busy`), so its memory stays bounded.
    max_queued_s: float = 60.0
    # Turn detection (voice/endpoint.py): "vad" ends an utterance after silence_ms; "smart" asks the turn
    # detector at turn_short_ms of silence and ends it there if complete, else after turn_long_ms.
    turn_detection: str = "vad"
    turn_threshold: float = 0.5
    turn_short_ms: int = 200
    turn_long_ms: int = 1000
    turn_model_path: Path | None = None


@dataclass(frozen=True)
class LlmConfig:
    """LLM settings (llama-cpp-python in a process pool)."""

    model_path: Path | None
    threads: int
    context: int = 2048
    batch: int = 256
    max_tokens: int = 128
    temperature: float = 0.4
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    gpu_layers: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    workers: int = 1
    max_queue: int = 16
    infer_timeout_s: float = 60.0
    history_turns: int = 8
    # Start answering the speculative final at the first pause; its audio waits for the confirmed end.
    speculate: bool = True
    # "local": the worker pool above; "openai": an OpenAI-compatible server at remote_url (no GGUF needed).
    backend: str = "local"
    remote_url: str | None = None
    remote_api_key: str | None = field(default=None, repr=False)  # never printed, logged or sent
    remote_model: str | None = None
    remote_timeout_s: float = 10.0  # to the first token; infer_timeout_s bounds the whole answer
    remote_concurrency: int = 4
    remote_probe_s: float = 5.0


@dataclass(frozen=True)
class TtsConfig:
    """Text-to-speech settings (Piper)."""

    model_path: Path | None
    threads: int
    concurrency: int = 1


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, resolved once at start-up."""

    host: str
    port: int
    stt: SttConfig
    llm: LlmConfig
    tts: TtsConfig
    models_dir: Path
    auth_token: str | None = None
    max_frame_bytes: int = 8 * 1024 * 1024
    max_text_chars: int = 4000
    send_queue_max: int = 512
    # Bytes a client that does not read may make the server hold for it (replies queued + socket buffer).
    send_buffer_bytes: int = 32 * 1024 * 1024
    max_inflight_requests: int = 8
    # Calls in progress the box takes (admission.py); 0: no limit. from_env derives it from the cores.
    max_calls: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allowed_origins: tuple[str, ...] = ()
    tier: str | None = None
    # What the installer measured and predicted for this machine (install.json), for status replies.
    expected: Mapping[str, Any] | None = None
    log_level: str = "info"
    log_json: bool | None = None
    allow_any_model_path: bool = False
    missing: tuple[str, ...] = field(default_factory=tuple)
    # The Wyoming front (Home Assistant): off unless a listen address is given.
    wyoming_uri: WyomingUri | None = None
    # Announce it over zeroconf under this name ("" for the machine's MAC address); None: no announcement.
    wyoming_zeroconf: str | None = None
    # Stream conversation answers as handled-chunk events (Home Assistant's own client reads one event).
    wyoming_handle_streaming: bool = False
    # On SIGTERM: calls idle between turns are closed (1001) once the notice has passed, every call left
    # at the timeout is closed; the notice gives a load balancer time to see /ready say "draining".
    drain_timeout_s: float = 30.0
    drain_notice_s: float = 2.0
    # "priority": what a caller is waiting for goes first (LLM, STT, TTS); "fifo": first come, first served.
    scheduling: str = "priority"
    # An answer is generated and synthesized at most this much audio ahead of its playback (priority only).
    pace_ahead_s: float = 5.0


class ConfigError(ValueError):
    """A setting has a value the server cannot use."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _port(env: Mapping[str, str]) -> int:
    port = _int(env, "LOCAL_WS_PORT", 8765, 0)
    if port > 65535:
        raise ConfigError(f"LOCAL_WS_PORT must be <= 65535, got {port}")
    return port


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    return raw.lower() in ("1", "true", "yes", "on")


def _stt_pad(env: Mapping[str, str]) -> float | None:
    raw = (_get(env, "LOCAL_STT_PAD_S") or "2").lower()
    if raw in ("full", "off", "30"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"LOCAL_STT_PAD_S must be seconds (0-29) or 'full', got {raw!r}") from None
    if not 0 <= value < 30:
        raise ConfigError(f"LOCAL_STT_PAD_S must be seconds (0-29) or 'full', got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (_get(env, name) or default).lower()
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = _get(env, name)
    return Path(raw).expanduser() if raw else None


def thread_budget(cores: int) -> tuple[int, int, int]:
    """Threads for (llm, stt, tts) on a machine with `cores` cores.

    The LLM gets every core: it is the long-running stage. STT and TTS run in
    short bursts; with GOMP_SPINCOUNT capped and Piper's spinning off they share
    the cores without collapsing the LLM's decode rate (measured in bench/).
    """
    llm = max(1, min(cores, 8))
    stt = max(1, min(cores, 4))
    tts = max(1, min(cores // 2, 2))
    return llm, stt, tts


def from_env(
    env: Mapping[str, str],
    *,
    models_dir: Path,
    selection_paths: Mapping[str, Path] | None = None,
    tier: str | None = None,
) -> ServerConfig:
    """Build the config from AVA-compatible environment variables plus the installed selection."""
    sel = dict(selection_paths or {})
    llm_threads, stt_threads, tts_threads = thread_budget(cpu_count())
    stt = SttConfig(
        model_path=_path(env, "LOCAL_STT_MODEL_PATH") or sel.get("stt"),
        threads=_int(env, "LOCAL_STT_THREADS", stt_threads, 1),
        device=_choice(env, "LOCAL_STT_DEVICE", "cpu", ("cpu", "cuda", "auto")),
        pad_s=_stt_pad(env),
        # int8 weights everywhere; on a GPU the activations stay in float16 (what CUDA cores are fast at).
        compute_type=_get(env, "LOCAL_STT_COMPUTE_TYPE")
        or ("int8" if _choice(env, "LOCAL_STT_DEVICE", "cpu", ("cpu", "cuda", "auto")) == "cpu" else "int8_float16"),
        language=_get(env, "LOCAL_STT_LANGUAGE") or "en",
        idle_ms=_int(env, "LOCAL_STT_IDLE_MS", 5000, 100),
        partial_interval_ms=_int(env, "LOCAL_STT_PARTIAL_MS", 900, 0),
        speculate_ms=_int(env, "LOCAL_STT_SPECULATE_MS", 200, 0),
        silence_ms=_int(env, "LOCAL_STT_SEGMENT_SILENCE_MS", 500, 50),
        energy_threshold=_int(env, "LOCAL_STT_SEGMENT_ENERGY_THRESHOLD", 100, 0),
        max_utterance_s=_float(env, "LOCAL_STT_MAX_UTTERANCE_S", 30.0),
        max_queued_s=_float(env, "LOCAL_STT_MAX_QUEUED_S", 60.0),
        turn_detection=_choice(env, "LOCAL_TURN_DETECTION", "vad", ("vad", "smart")),
        turn_threshold=_float(env, "LOCAL_TURN_THRESHOLD", 0.5),
        turn_short_ms=_int(env, "LOCAL_TURN_SHORT_MS", 200, 50),
        turn_long_ms=_int(env, "LOCAL_TURN_LONG_MS", 1000, 100),
        # Installs from before the turn detector have no "turn" in selected.json: the registry's path.
        turn_model_path=_path(env, "LOCAL_TURN_MODEL_PATH") or sel.get("turn")
        or models_dir / "turn" / "smart-turn-v3.2-cpu.onnx",
    )
    llm = LlmConfig(
        model_path=_path(env, "LOCAL_LLM_MODEL_PATH") or sel.get("llm"),
        threads=_int(env, "LOCAL_LLM_THREADS", llm_threads, 1),
        context=_int(env, "LOCAL_LLM_CONTEXT", 2048, 128),
        batch=_int(env, "LOCAL_LLM_BATCH", 256, 8),
        max_tokens=_int(env, "LOCAL_LLM_MAX_TOKENS", 128, 1),
        temperature=_float(env, "LOCAL_LLM_TEMPERATURE", 0.4),
        top_p=_float(env, "LOCAL_LLM_TOP_P", 0.9),
        repeat_penalty=_float(env, "LOCAL_LLM_REPEAT_PENALTY", 1.1),
        gpu_layers=_int(env, "LOCAL_LLM_GPU_LAYERS", 0, -1),
        system_prompt=_get(env, "LOCAL_LLM_SYSTEM_PROMPT") or DEFAULT_SYSTEM_PROMPT,
        workers=_int(env, "LOCAL_LLM_WORKERS", 1, 1),
        max_queue=_int(env, "LOCAL_LLM_MAX_QUEUE", 16, 0),
        infer_timeout_s=_float(env, "LOCAL_LLM_INFER_TIMEOUT_SEC", 60.0),
        speculate=_bool(env, "LOCAL_LLM_SPECULATE", True),
        backend=_choice(env, "LOCAL_LLM_BACKEND", "local", BACKENDS),
        remote_url=_get(env, "LOCAL_LLM_REMOTE_URL"),
        remote_api_key=_get(env, "LOCAL_LLM_REMOTE_API_KEY"),
        remote_model=_get(env, "LOCAL_LLM_REMOTE_MODEL"),
        remote_timeout_s=_float(env, "LOCAL_LLM_REMOTE_TIMEOUT_S", 10.0),
        remote_concurrency=_int(env, "LOCAL_LLM_REMOTE_CONCURRENCY", 4, 1),
        remote_probe_s=_float(env, "LOCAL_LLM_REMOTE_PROBE_S", 5.0),
    )
    tts_model = _path(env, "LOCAL_TTS_MODEL_PATH") or sel.get("tts")
    tts = TtsConfig(model_path=tts_model, threads=_int(env, "LOCAL_TTS_THREADS", tts_threads, 1))
    host = _get(env, "LOCAL_WS_HOST") or "127.0.0.1"
    wyoming = _get(env, "LOCAL_WYOMING_URI")
    try:
        wyoming_uri = parse_uri(wyoming) if wyoming is not None else None
    except ValueError as exc:
        raise ConfigError(f"LOCAL_WYOMING_URI: {exc}") from None
    zeroconf = env.get("LOCAL_WYOMING_ZEROCONF")
    json_env = _get(env, "LOCAL_LOG_JSON")
    return ServerConfig(
        host=host,
        port=_port(env),
        stt=stt,
        llm=llm,
        tts=tts,
        models_dir=models_dir,
        auth_token=_get(env, "LOCAL_WS_AUTH_TOKEN"),
        max_frame_bytes=_int(env, "LOCAL_WS_MAX_FRAME_BYTES", 8 * 1024 * 1024, 1024),
        max_text_chars=_int(env, "LOCAL_MAX_TEXT_CHARS", 4000, 16),
        send_queue_max=_int(env, "LOCAL_WS_SEND_QUEUE_MAX", 512, 16),
        send_buffer_bytes=_int(env, "LOCAL_WS_SEND_BUFFER_BYTES", 32 * 1024 * 1024, 64 * 1024),
        max_inflight_requests=_int(env, "LOCAL_WS_MAX_INFLIGHT", 8, 1),
        max_calls=_int(env, "LOCAL_MAX_CALLS", default_max_calls(cpu_count()), 0),
        tls_cert=_path(env, "LOCAL_WS_TLS_CERT"),
        tls_key=_path(env, "LOCAL_WS_TLS_KEY"),
        allowed_origins=tuple(o.strip() for o in (_get(env, "LOCAL_WS_ALLOWED_ORIGINS") or "").split(",")
                              if o.strip()),
        tier=tier,
        log_level=(_get(env, "LOCAL_LOG_LEVEL") or "info").lower(),
        log_json=None if json_env is None else _bool(env, "LOCAL_LOG_JSON", False),
        allow_any_model_path=_bool(env, "LOCAL_ALLOW_ANY_MODEL_PATH", False),
        wyoming_uri=wyoming_uri,
        wyoming_zeroconf=None if zeroconf is None or zeroconf.strip().lower() in ("", "0", "false", "no", "off")
        else ("" if zeroconf.strip().lower() in ("1", "true", "yes", "on") else zeroconf.strip()),
        wyoming_handle_streaming=_bool(env, "LOCAL_WYOMING_HANDLE_STREAMING", False),
        drain_timeout_s=_float(env, "LOCAL_DRAIN_TIMEOUT_S", 30.0),
        drain_notice_s=_float(env, "LOCAL_DRAIN_NOTICE_S", 2.0),
        scheduling=_choice(env, "LOCAL_SCHEDULING", "priority", SCHEDULING),
        pace_ahead_s=_float(env, "LOCAL_PACE_AHEAD_S", 5.0),
    )


def validate(cfg: ServerConfig) -> None:
    """Refuse settings that would make the server unsafe or unusable."""
    if not is_loopback(cfg.host) and not cfg.auth_token:
        raise ConfigError(
            f"refusing to listen on non-loopback host {cfg.host!r} without LOCAL_WS_AUTH_TOKEN; "
            "set a token (or bind to 127.0.0.1)"
        )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("LOCAL_WS_TLS_CERT and LOCAL_WS_TLS_KEY must be set together")
    for path in (cfg.tls_cert, cfg.tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file not found: {path}")
    _validate_remote(cfg.llm)
    if not 0 <= cfg.drain_notice_s <= cfg.drain_timeout_s:
        raise ConfigError("LOCAL_DRAIN_NOTICE_S must be >= 0 and at most LOCAL_DRAIN_TIMEOUT_S "
                          f"({cfg.drain_notice_s:g} s and {cfg.drain_timeout_s:g} s given)")
    if cfg.pace_ahead_s <= 0:
        raise ConfigError(f"LOCAL_PACE_AHEAD_S must be > 0, got {cfg.pace_ahead_s:g}")
    if cfg.log_level not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"LOCAL_LOG_LEVEL must be debug|info|warning|error, got {cfg.log_level!r}")


def _validate_remote(llm: LlmConfig) -> None:
    """The remote LLM backend's settings; an error names the URL, never the key."""
    if llm.backend != "openai":
        return
    if not llm.remote_url:
        raise ConfigError("LOCAL_LLM_BACKEND=openai needs LOCAL_LLM_REMOTE_URL (e.g. http://127.0.0.1:8080/v1)")
    parts = urlsplit(llm.remote_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"LOCAL_LLM_REMOTE_URL must be an http(s) URL with a host, got {llm.remote_url!r}")
    if parts.password or parts.username:
        raise ConfigError("LOCAL_LLM_REMOTE_URL must not hold credentials; use LOCAL_LLM_REMOTE_API_KEY")
    if llm.remote_timeout_s <= 0 or llm.remote_probe_s <= 0:
        raise ConfigError("LOCAL_LLM_REMOTE_TIMEOUT_S and LOCAL_LLM_REMOTE_PROBE_S must be > 0")


def with_overrides(cfg: ServerConfig, **changes: object) -> ServerConfig:
    """A copy of `cfg` with top-level fields replaced (used by the CLI flags)."""
    return replace(cfg, **changes)  # type: ignore[arg-type]
