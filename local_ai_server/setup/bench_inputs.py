"""What the bench measures with: the probe LLM file (installed, given, or a random one of its shape) and the
installed STT and TTS models."""

from __future__ import annotations

from pathlib import Path

from local_ai_server.setup.bench_llm import BenchError
from local_ai_server.setup.bench_speech import DEFAULT_STT_MODEL, DEFAULT_TTS_MODEL
from local_ai_server.setup.probe import TINYLLAMA_1B, ProbeShape
from local_ai_server.setup.registry import Model, Registry, SetupError
from local_ai_server.setup.selection import read_selection

PROBE_MODEL_ID = "tinyllama-1.1b-chat-v1.0-q4_k_m"
PROBE_SHAPE = TINYLLAMA_1B
PROBE_QUANT = "Q4_K_M"
# The tier whose STT and TTS models are the measurement's reference (what plan.Bench defaults to).
REFERENCE_TIER = "embedded"


def random_probe_path(cache_dir: Path, shape: ProbeShape = PROBE_SHAPE, quant: str = PROBE_QUANT) -> Path:
    """Where the random-weight probe of `shape` is cached."""
    return Path(cache_dir) / "probes" / f"{shape.name}-random-{quant.lower()}.gguf"


def real_probe_path(registry: Registry, models_dir: Path) -> Path | None:
    """The installed real TinyLlama file, if present with the registry's size."""
    model = registry.models.get(PROBE_MODEL_ID)
    if model is None:
        return None
    path = Path(models_dir) / model.dest
    expected = next((f.size_bytes for f in model.files if f.path == model.dest), None)
    try:
        return path if path.is_file() and path.stat().st_size == expected else None
    except OSError:
        return None


def choose_probe(registry: Registry, models_dir: Path, cache_dir: Path,
                 probe_path: Path | None) -> tuple[Path, str]:
    """(the probe file, its source): `probe_path`, else the installed TinyLlama, else the random probe's path."""
    model = registry.models.get(PROBE_MODEL_ID)
    if probe_path is not None:
        path = Path(probe_path)
        if not path.is_file():
            raise BenchError(f"probe file not found: {path}")
        real_size = model.file_bytes if model is not None else None
        return path, "tinyllama-file" if path.stat().st_size == real_size else "given-file"
    real = real_probe_path(registry, models_dir)
    if real is not None:
        return real, "tinyllama-file"
    return random_probe_path(cache_dir), "tinyllama-shaped-random"


def speech_models(registry: Registry, models_dir: Path) -> tuple[Model | None, Model | None, Model | None]:
    """(STT model, Piper voice to speak the STT input, TTS model): installed ones, reference tier first."""
    candidates: dict[str, list[str]] = {"stt": [DEFAULT_STT_MODEL], "tts": [DEFAULT_TTS_MODEL]}
    tier = registry.tiers.get(REFERENCE_TIER)
    if tier is not None:
        for role in candidates:
            candidates[role].insert(0, tier.models[role])
    try:
        selection = read_selection(models_dir)
    except SetupError:
        selection = None
    if selection is not None:
        for role in candidates:
            candidates[role].append(selection.model(role).id)
    installed = {role: [m for m in (registry.models.get(i) for i in ids)
                        if m is not None and is_installed(m, models_dir)]
                 for role, ids in candidates.items()}
    stt = installed["stt"][0] if installed["stt"] else None
    tts = installed["tts"][0] if installed["tts"] else None
    # The STT input is spoken by the joe voice when it is there (what the figures in MODELS.md used).
    voice = next((m for m in installed["tts"] if m.id == DEFAULT_TTS_MODEL), tts)
    return stt, voice, tts


def is_installed(model: Model, models_dir: Path) -> bool:
    """Whether every file of `model` is in `models_dir` with its registry size."""
    try:
        return all((models_dir / f.path).stat().st_size == f.size_bytes for f in model.files)
    except OSError:
        return False


