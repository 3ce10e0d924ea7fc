"""Tests for configuration: AVA environment variables, selection paths, validation, thread budget and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from local_ai_server import __main__ as cli
from local_ai_server import config
from local_ai_server.config import (
    DEFAULT_SYSTEM_PROMPT,
    ConfigError,
    ServerConfig,
    from_env,
    is_loopback,
    thread_budget,
    validate,
)
from local_ai_server.setup.registry import load_registry
from local_ai_server.setup.selection import default_registry_path, read_selection, write_selection

SEL = {"stt": Path("/sel/stt/whisper"), "llm": Path("/sel/llm/model.gguf"), "tts": Path("/sel/tts/voice.onnx")}


def build(env: dict[str, str], **kwargs: object) -> ServerConfig:
    """from_env with a fixed models dir."""
    return from_env(env, models_dir=Path("/models"), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the thread defaults independent of the machine running the tests."""
    monkeypatch.setattr(config, "cpu_count", lambda: 4)


# ---------------------------------------------------------------- from_env


def test_from_env_reads_every_ava_variable() -> None:
    env = {
        "LOCAL_WS_HOST": "0.0.0.0",
        "LOCAL_WS_PORT": "9001",
        "LOCAL_WS_AUTH_TOKEN": "tok-123",
        "LOCAL_STT_MODEL_PATH": "/m/stt",
        "LOCAL_LLM_MODEL_PATH": "/m/llm.gguf",
        "LOCAL_TTS_MODEL_PATH": "/m/tts.onnx",
        "LOCAL_LLM_THREADS": "3",
        "LOCAL_LLM_CONTEXT": "4096",
        "LOCAL_LLM_MAX_TOKENS": "64",
        "LOCAL_LLM_TEMPERATURE": "0.25",
        "LOCAL_LLM_SYSTEM_PROMPT": "  Be short.  ",
        "LOCAL_STT_IDLE_MS": "2500",
        "LOCAL_LOG_LEVEL": "DEBUG",
    }
    cfg = build(env, selection_paths=SEL, tier="embedded")
    assert (cfg.host, cfg.port, cfg.auth_token) == ("0.0.0.0", 9001, "tok-123")
    assert cfg.stt.model_path == Path("/m/stt")
    assert cfg.llm.model_path == Path("/m/llm.gguf")
    assert cfg.tts.model_path == Path("/m/tts.onnx")
    assert (cfg.llm.threads, cfg.llm.context, cfg.llm.max_tokens) == (3, 4096, 64)
    assert cfg.llm.temperature == pytest.approx(0.25)
    assert cfg.llm.system_prompt == "Be short."
    assert cfg.stt.idle_ms == 2500
    assert cfg.log_level == "debug"
    assert cfg.tier == "embedded" and cfg.models_dir == Path("/models")
    validate(cfg)  # non-loopback host is fine with a token


def test_from_env_defaults(four_cores: None) -> None:
    cfg = build({})
    assert (cfg.host, cfg.port, cfg.auth_token) == ("127.0.0.1", 8765, None)
    assert (cfg.stt.model_path, cfg.llm.model_path, cfg.tts.model_path) == (None, None, None)
    assert (cfg.llm.threads, cfg.stt.threads, cfg.tts.threads) == thread_budget(4) == (4, 4, 2)
    assert (cfg.llm.context, cfg.llm.max_tokens, cfg.llm.temperature) == (2048, 128, 0.4)
    assert cfg.llm.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert (cfg.stt.idle_ms, cfg.log_level, cfg.log_json, cfg.tier) == (5000, "info", None, None)
    validate(cfg)


def test_blank_values_count_as_unset() -> None:
    cfg = build({"LOCAL_WS_AUTH_TOKEN": "   ", "LOCAL_WS_PORT": "", "LOCAL_LLM_MODEL_PATH": " "},
                selection_paths=SEL)
    assert cfg.auth_token is None and cfg.port == 8765 and cfg.llm.model_path == SEL["llm"]


def test_selection_paths_used_when_env_paths_absent() -> None:
    cfg = build({}, selection_paths=SEL)
    assert (cfg.stt.model_path, cfg.llm.model_path, cfg.tts.model_path) == (SEL["stt"], SEL["llm"], SEL["tts"])


def test_env_paths_win_over_selection_per_role() -> None:
    cfg = build({"LOCAL_LLM_MODEL_PATH": "/env/llm.gguf"}, selection_paths=SEL)
    assert cfg.llm.model_path == Path("/env/llm.gguf")
    assert (cfg.stt.model_path, cfg.tts.model_path) == (SEL["stt"], SEL["tts"])


def test_env_path_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = build({"LOCAL_TTS_MODEL_PATH": "~/voice.onnx"})
    assert cfg.tts.model_path == tmp_path / "voice.onnx"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOCAL_WS_PORT", "http"),
        ("LOCAL_WS_PORT", "-1"),
        ("LOCAL_LLM_THREADS", "0"),
        ("LOCAL_LLM_THREADS", "two"),
        ("LOCAL_LLM_CONTEXT", "64"),
        ("LOCAL_LLM_CONTEXT", "2048.0"),
        ("LOCAL_LLM_MAX_TOKENS", "0"),
        ("LOCAL_LLM_TEMPERATURE", "warm"),
        ("LOCAL_STT_IDLE_MS", "99"),
        ("LOCAL_STT_IDLE_MS", "soon"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        build({name: value})
    assert name in str(info.value)


def test_port_above_65535_is_config_error() -> None:
    with pytest.raises(ConfigError, match="LOCAL_WS_PORT"):
        validate(build({"LOCAL_WS_PORT": "70000"}))


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- validate


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    assert is_loopback(host)
    validate(build({"LOCAL_WS_HOST": host}))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com", "128.0.0.1"])
def test_non_loopback_host_without_token_refused(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="LOCAL_WS_AUTH_TOKEN"):
        validate(build({"LOCAL_WS_HOST": host}))
    validate(build({"LOCAL_WS_HOST": host, "LOCAL_WS_AUTH_TOKEN": "secret"}))


def test_hostname_starting_with_127_is_not_loopback() -> None:
    assert not is_loopback("127.attacker.example")


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error"])
def test_valid_log_levels(level: str) -> None:
    validate(build({"LOCAL_LOG_LEVEL": level}))


def test_bad_log_level_refused() -> None:
    with pytest.raises(ConfigError, match="LOCAL_LOG_LEVEL"):
        validate(build({"LOCAL_LOG_LEVEL": "verbose"}))


# ---------------------------------------------------------------- thread budget


@pytest.mark.parametrize(
    ("cores", "expected"), [(1, (1, 1, 1)), (2, (2, 2, 1)), (8, (8, 4, 2)), (64, (8, 4, 2))]
)
def test_thread_budget(cores: int, expected: tuple[int, int, int]) -> None:
    assert thread_budget(cores) == expected


def test_cpu_count_is_positive() -> None:
    assert config.cpu_count() >= 1


# ---------------------------------------------------------------- load_config (flags > env > selected.json)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models dir holding a selected.json for the embedded tier (the model files themselves are absent)."""
    d = tmp_path / "models"
    write_selection(d, load_registry(default_registry_path()), "embedded")
    return d


def test_load_config_uses_selection(models_dir: Path) -> None:
    sel = read_selection(models_dir)
    assert sel is not None
    cfg = cli.load_config(["--models-dir", str(models_dir)], env={})
    assert cfg.models_dir == models_dir.resolve()
    assert cfg.tier == sel.tier == "embedded"
    assert cfg.llm.model_path == models_dir.resolve() / sel.llm.path
    assert cfg.stt.model_path == models_dir.resolve() / sel.stt.path
    assert cfg.tts.model_path == models_dir.resolve() / sel.tts.path


def test_load_config_hand_written_selection(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    data = {"schema_version": 1, "tier": "custom"}
    for role, rel in (("stt", "stt/w"), ("llm", "llm/x.gguf"), ("tts", "tts/v.onnx")):
        data[role] = {"id": f"{role}-id", "path": rel, "display": role.upper()}
    (d / "selected.json").write_text(json.dumps(data), encoding="utf-8")
    cfg = cli.load_config([], env={"LOCAL_MODELS_DIR": str(d)})
    assert cfg.tier == "custom" and cfg.models_dir == d.resolve()
    assert cfg.llm.model_path == d.resolve() / "llm" / "x.gguf"


def test_load_config_env_over_selection(models_dir: Path) -> None:
    env = {"LOCAL_LLM_MODEL_PATH": "/env/llm.gguf", "LOCAL_WS_PORT": "7001", "LOCAL_LOG_LEVEL": "warning"}
    cfg = cli.load_config(["--models-dir", str(models_dir)], env=env)
    assert cfg.llm.model_path == Path("/env/llm.gguf")
    assert cfg.tts.model_path == models_dir.resolve() / "tts" / "en_US-joe-medium.onnx"
    assert (cfg.port, cfg.log_level) == (7001, "warning")


def test_load_config_flags_over_env(models_dir: Path) -> None:
    env = {
        "LOCAL_LLM_MODEL_PATH": "/env/llm.gguf", "LOCAL_STT_MODEL_PATH": "/env/stt",
        "LOCAL_TTS_MODEL_PATH": "/env/tts.onnx", "LOCAL_WS_PORT": "7001", "LOCAL_WS_HOST": "127.0.0.2",
        "LOCAL_LLM_WORKERS": "3", "LOCAL_LOG_LEVEL": "warning",
    }
    argv = ["--models-dir", str(models_dir), "--llm-model", "/flag/llm.gguf", "--stt-model", "/flag/stt",
            "--tts-model", "/flag/tts.onnx", "--port", "7002", "--host", "localhost", "--llm-workers", "2",
            "--log-level", "ERROR", "--log-json"]
    cfg = cli.load_config(argv, env=env)
    assert cfg.llm.model_path == Path("/flag/llm.gguf")
    assert cfg.stt.model_path == Path("/flag/stt")
    assert cfg.tts.model_path == Path("/flag/tts.onnx")
    assert (cfg.port, cfg.host, cfg.llm.workers, cfg.log_level, cfg.log_json) == (
        7002, "localhost", 2, "error", True)


def test_load_config_models_dir_flag_over_env(models_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = cli.load_config(["--models-dir", str(models_dir)], env={"LOCAL_MODELS_DIR": str(empty)})
    assert cfg.models_dir == models_dir.resolve() and cfg.tier == "embedded"
    cfg = cli.load_config([], env={"LOCAL_MODELS_DIR": str(empty)})
    assert cfg.models_dir == empty.resolve() and cfg.tier is None and cfg.llm.model_path is None


def test_load_config_does_not_mutate_the_given_env(models_dir: Path) -> None:
    env = {"LOCAL_WS_PORT": "7001"}
    cli.load_config(["--models-dir", str(models_dir), "--port", "7002"], env=env)
    assert env == {"LOCAL_WS_PORT": "7001"}


def test_load_config_validates(models_dir: Path) -> None:
    with pytest.raises(ConfigError, match="LOCAL_WS_AUTH_TOKEN"):
        cli.load_config(["--models-dir", str(models_dir), "--host", "0.0.0.0"], env={})
    cfg = cli.load_config(["--models-dir", str(models_dir), "--host", "0.0.0.0"],
                          env={"LOCAL_WS_AUTH_TOKEN": "t"})
    assert cfg.auth_token == "t"


def test_main_reports_config_error_and_exits_2(models_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOCAL_WS_PORT", "not-a-port")
    assert cli.main(["--models-dir", str(models_dir)]) == 2
    assert "LOCAL_WS_PORT" in capsys.readouterr().err


def test_main_reports_corrupt_selection_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "selected.json").write_text("{not json", encoding="utf-8")
    assert cli.main(["--models-dir", str(tmp_path)]) == 2
    assert "selection" in capsys.readouterr().err


def test_scheduling_and_pace() -> None:
    cfg = build({})
    assert cfg.scheduling == "priority" and cfg.pace_ahead_s == 5.0
    cfg = build({"LOCAL_SCHEDULING": "FIFO", "LOCAL_PACE_AHEAD_S": "3.5"})
    assert cfg.scheduling == "fifo" and cfg.pace_ahead_s == 3.5
    with pytest.raises(ConfigError, match="LOCAL_SCHEDULING"):
        build({"LOCAL_SCHEDULING": "lifo"})
    with pytest.raises(ConfigError, match="LOCAL_PACE_AHEAD_S"):
        validate(build({"LOCAL_PACE_AHEAD_S": "0"}))
