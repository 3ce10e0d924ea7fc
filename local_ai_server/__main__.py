"""Command line: flags and environment -> frozen config -> logging -> run the server."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import structlog

from . import logsetup
from .config import ConfigError, ServerConfig, from_env, validate, with_overrides
from .heap import limit_arenas
from .setup.installation import InstallRecord, InstallRecordError, read_record
from .setup.registry import SetupError
from .setup.selection import default_models_dir, read_selection
from .threads import thread_env


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag also has an environment variable (shown in --help)."""
    p = argparse.ArgumentParser(
        prog="local-ai-server",
        description="Self-hosted voice AI over WebSocket (AVA local_ai_server protocol v2).",
    )
    p.add_argument("--host", help="bind address (LOCAL_WS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (LOCAL_WS_PORT, default 8765; 0 picks a free one)")
    p.add_argument("--models-dir", type=Path, help="models directory with selected.json (LOCAL_MODELS_DIR)")
    p.add_argument("--stt-model", type=Path, help="faster-whisper model directory (LOCAL_STT_MODEL_PATH)")
    p.add_argument("--llm-model", type=Path, help="GGUF file (LOCAL_LLM_MODEL_PATH)")
    p.add_argument("--tts-model", type=Path, help="Piper .onnx voice (LOCAL_TTS_MODEL_PATH)")
    p.add_argument("--llm-workers", type=int, help="LLM worker processes (LOCAL_LLM_WORKERS, default 1)")
    p.add_argument("--llm-backend", choices=("local", "openai"),
                   help="local worker pool or an OpenAI-compatible server (LOCAL_LLM_BACKEND, default local)")
    p.add_argument("--llm-url", help="the remote LLM's base URL, e.g. http://127.0.0.1:8080/v1 (LOCAL_LLM_REMOTE_URL)")
    p.add_argument("--llm-model-name", help="the remote LLM's model name (LOCAL_LLM_REMOTE_MODEL; default: "
                   "the first it lists)")
    p.add_argument("--wyoming-uri", help="also serve Wyoming (Home Assistant) on tcp://HOST:PORT or unix://PATH "
                   "(LOCAL_WYOMING_URI; off by default; tcp://0.0.0.0:10300 for the usual port)")
    p.add_argument("--wyoming-zeroconf", nargs="?", const="", metavar="NAME",
                   help="announce the Wyoming service over zeroconf, optionally under NAME (LOCAL_WYOMING_ZEROCONF)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                   help="on SIGTERM, close calls still open after this long (LOCAL_DRAIN_TIMEOUT_S, default 30)")
    p.add_argument("--log-level", help="debug|info|warning|error (LOCAL_LOG_LEVEL)")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")
    return p


def load_config(argv: list[str] | None = None, env: dict[str, str] | None = None,
                warnings: list[str] | None = None) -> ServerConfig:
    """Resolve flags over environment over install.json settings over selected.json over defaults."""
    args = build_parser().parse_args(argv)
    environ = dict(os.environ if env is None else env)
    for flag, var in (("host", "LOCAL_WS_HOST"), ("port", "LOCAL_WS_PORT"), ("stt_model", "LOCAL_STT_MODEL_PATH"),
                      ("llm_model", "LOCAL_LLM_MODEL_PATH"), ("tts_model", "LOCAL_TTS_MODEL_PATH"),
                      ("llm_workers", "LOCAL_LLM_WORKERS"), ("log_level", "LOCAL_LOG_LEVEL"),
                      ("wyoming_uri", "LOCAL_WYOMING_URI"), ("llm_backend", "LOCAL_LLM_BACKEND"),
                      ("llm_url", "LOCAL_LLM_REMOTE_URL"), ("llm_model_name", "LOCAL_LLM_REMOTE_MODEL"),
                      ("drain_timeout", "LOCAL_DRAIN_TIMEOUT_S")):
        value = getattr(args, flag)
        if value is not None:
            environ[var] = str(value)
    if args.wyoming_zeroconf is not None:
        environ["LOCAL_WYOMING_ZEROCONF"] = args.wyoming_zeroconf or "1"
    models_dir = args.models_dir or (Path(environ["LOCAL_MODELS_DIR"]) if environ.get("LOCAL_MODELS_DIR")
                                     else default_models_dir())
    models_dir = models_dir.expanduser().resolve()
    selection = read_selection(models_dir)
    paths: dict[str, Path] = {}
    tier = None
    if selection is not None:
        tier = selection.tier
        paths = selection.paths()
    record = _install_record(models_dir, tier, warnings if warnings is not None else [])
    if record is not None:
        # The installer's machine-specific settings (GPU offload, ...) apply unless the operator set them.
        environ = {**record.settings, **environ}
    cfg = from_env(environ, models_dir=models_dir, selection_paths=paths, tier=tier)
    if record is not None:
        cfg = with_overrides(cfg, expected=record.status())
    if args.log_json:
        cfg = with_overrides(cfg, log_json=True)
    validate(cfg)
    return cfg


def _install_record(models_dir: Path, tier: str | None, warnings: list[str]) -> InstallRecord | None:
    """install.json when it describes the installed tier; a broken or stale one is a warning, not a stop."""
    try:
        record = read_record(models_dir)
    except InstallRecordError as exc:
        # It only carries expectations and tuning: the server runs (on defaults) without it.
        warnings.append(f"ignoring the installation record: {exc}")
        return None
    if record is not None and record.tier != tier:
        warnings.append(f"ignoring the installation record: it is for tier {record.tier}, "
                        f"the selection is {tier}; re-run ./install.sh")
        return None
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `local-ai-server` console script."""
    arenas = limit_arenas()  # before any thread exists (the server and its engines are imported below)
    thread_env()  # before llama.cpp or CTranslate2 load; the LLM worker processes inherit it
    warnings: list[str] = []
    try:
        cfg = load_config(argv, warnings=warnings)
    except (ConfigError, SetupError, ValueError) as exc:
        print(f"local-ai-server: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(cfg.log_level, cfg.log_json)
    log = structlog.get_logger("local_ai_server")
    for warning in warnings:
        log.warning("server.config_warning", warning=warning)
    log.info("server.starting", host=cfg.host, port=cfg.port, tier=cfg.tier,
             stt=str(cfg.stt.model_path) if cfg.stt.model_path else None,
             llm=str(cfg.llm.model_path) if cfg.llm.model_path and cfg.llm.backend == "local" else None,
             llm_backend=cfg.llm.backend, llm_url=cfg.llm.remote_url if cfg.llm.backend != "local" else None,
             tts=str(cfg.tts.model_path) if cfg.tts.model_path else None,
             llm_threads=cfg.llm.threads, stt_threads=cfg.stt.threads, tts_threads=cfg.tts.threads,
             auth=cfg.auth_token is not None, malloc_arenas=arenas,
             wyoming=str(cfg.wyoming_uri) if cfg.wyoming_uri else None)
    from .server import run

    try:
        asyncio.run(run(cfg))
    except OSError as exc:
        log.error("server.failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
