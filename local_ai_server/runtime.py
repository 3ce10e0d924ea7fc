"""The loaded engines (STT, VAD, TTS, LLM pool), their executors, loading, switching and state."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from .config import ServerConfig
from .engines.llm import LlmParams, SamplingParams
from .engines.stt import Transcript, WhisperStt
from .engines.tts import PiperTts
from .engines.vad import SileroVad
from .errors import InvalidField, ModelLoadError, NotReady, describe
from .llm_pool import LlmPool
from .llm_remote import BACKEND as REMOTE
from .llm_remote import RemoteLlm
from .metrics import Metrics
from .model_status import model_status
from .priority import STT_PRIORITY, PriorityExecutor
from .runtime_turn import TurnDetection
from .vad import VadStream

log = structlog.get_logger(__name__)
T = TypeVar("T")

FETCH_HINT = "run: .venv/bin/python model_setup.py download"


@dataclass
class EngineState:
    """Load state of one stage, for status and /ready."""

    state: str = "missing"  # missing | loading | ready | failed
    error: str | None = None
    path: Path | None = None
    loaded_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Engines(TurnDetection):
    """Owns every model and the threads they run on; the event loop only awaits them."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.stt: WhisperStt | None = None
        self.tts: PiperTts | None = None
        self.vad: SileroVad | None = None
        self.stt_state = EngineState(path=cfg.stt.model_path)
        self.tts_state = EngineState(path=cfg.tts.model_path)
        self.vad_state = EngineState()
        # Critical path first (priority.py); "fifo": in arrival order, as a plain thread pool.
        fifo = cfg.scheduling == "fifo"
        self.stt_exec = PriorityExecutor(cfg.stt.concurrency, name="stt", fifo=fifo)
        self.tts_exec = PriorityExecutor(cfg.tts.concurrency, name="tts", fifo=fifo)
        # Model loading, hashing, big base64/JSON decoding: never on the loop, never behind a transcription.
        self.aux_exec = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="aux")
        self.pool: LlmPool | RemoteLlm = (self._make_remote(cfg.llm.remote_model) if cfg.llm.backend == REMOTE
                                          else self._make_pool(cfg.llm.model_path))
        self.warming = True
        self.started_at = time.time()
        self.stt_inflight = 0  # transcriptions queued or running: partials yield to finals
        # Server-wide system prompt: global switch_model may replace the configured one at run time.
        self.default_prompt = cfg.llm.system_prompt

    def _make_pool(self, path: Path | None) -> LlmPool:
        c = self.cfg.llm
        return LlmPool(
            path,
            LlmParams(context=c.context, threads=c.threads, batch=c.batch, gpu_layers=c.gpu_layers,
                      warmup_system_prompt=c.system_prompt),
            workers=c.workers,
            scheduling=self.cfg.scheduling,
            max_queue=c.max_queue,
            infer_timeout_s=c.infer_timeout_s,
            on_event=self.metrics.on_pool_event,
        )

    def _make_remote(self, model: str | None) -> RemoteLlm:
        c = self.cfg.llm
        if not c.remote_url:
            raise InvalidField("no remote LLM configured (LOCAL_LLM_REMOTE_URL)")
        return RemoteLlm(c.remote_url, c.remote_api_key, model, concurrency=c.remote_concurrency,
                         max_queue=c.max_queue, first_token_timeout_s=c.remote_timeout_s,
                         infer_timeout_s=c.infer_timeout_s, probe_interval_s=c.remote_probe_s,
                         on_event=self.metrics.on_pool_event)

    # ------------------------------------------------------------------ loading

    async def start(self) -> None:
        """Load every configured model concurrently, off the loop; failures are recorded, not raised."""
        await asyncio.gather(
            self._load_stt(self.cfg.stt.model_path),
            self._load_tts(self.cfg.tts.model_path),
            self._load_vad(),
            self._load_turn(),
            self.pool.start(),
        )
        self.warming = False
        log.info("models.loaded", stt=self.stt_state.state, tts=self.tts_state.state, llm=self.pool.state,
                 vad=self.vad_state.state, turn=self.turn is not None)

    async def run_aux(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work on the auxiliary threads."""
        return await asyncio.get_running_loop().run_in_executor(self.aux_exec, fn, *args)

    async def _load_vad(self) -> None:
        self.vad_state.state = "loading"
        try:
            self.vad = await self.run_aux(SileroVad)
            self.vad_state.state = "ready"
        except Exception as exc:  # noqa: BLE001 - recorded for status
            self.vad_state.state, self.vad_state.error = "failed", describe(exc)
            log.error("vad.load_failed", error=self.vad_state.error)

    async def _load_stt(self, path: Path | None) -> None:
        if path is None:
            self.stt_state = EngineState(state="missing", error="no STT model installed")
            return
        self.stt_state.state = "loading"

        def load() -> WhisperStt:
            engine = self._new_stt(path)
            engine.warm_up()
            return engine

        try:
            self.stt = await self.run_aux(load)
            self.stt_state = EngineState(state="ready", path=path, loaded_at=time.time())
        except Exception as exc:  # noqa: BLE001
            self.stt_state = EngineState(state="failed", path=path, error=f"STT model could not be loaded "
                                                                          f"({describe(exc)})")
            log.error("stt.load_failed", error=self.stt_state.error)

    async def _load_tts(self, path: Path | None) -> None:
        if path is None:
            self.tts_state = EngineState(state="missing", error="no TTS voice installed")
            return
        self.tts_state.state = "loading"

        def load() -> PiperTts:
            engine = self._new_tts(path)
            engine.warm_up()
            return engine

        try:
            self.tts = await self.run_aux(load)
            self.tts_state = EngineState(state="ready", path=path, loaded_at=time.time(),
                                         extra={"sample_rate_hz": self.tts.sample_rate})
        except Exception as exc:  # noqa: BLE001
            self.tts_state = EngineState(state="failed", path=path, error=f"TTS voice could not be loaded "
                                                                          f"({describe(exc)})")
            log.error("tts.load_failed", error=self.tts_state.error)

    def _new_stt(self, path: Path) -> WhisperStt:
        c = self.cfg.stt
        return WhisperStt(path, threads=c.threads, compute_type=c.compute_type, language=c.language,
                          beam_size=c.beam_size, device=c.device, pad_s=c.pad_s)

    def _new_tts(self, path: Path) -> PiperTts:
        return PiperTts(path, threads=self.cfg.tts.threads)

    # ------------------------------------------------------------------ switching

    def resolve_model_path(self, raw: str) -> Path:
        """A client-supplied model path, confined to the models directory unless the operator allows any.

        Whatever the OS refuses about it (NUL, over-long names, an unknown user's home) is the client's
        error, answered as `invalid_field`.
        """
        try:
            p = Path(raw).expanduser()
            if not p.is_absolute():
                p = self.cfg.models_dir / p
            p = p.resolve()
        except (OSError, ValueError, RuntimeError):
            raise InvalidField("model path is not a valid path") from None
        if not self.cfg.allow_any_model_path:
            root = self.cfg.models_dir.resolve()
            if p != root and root not in p.parents:
                raise InvalidField("model path must be inside the models directory")
        return p

    async def model_file_exists(self, path: Path) -> bool:
        """Whether a model (a file, or an STT model's folder) is there, checked off the loop."""
        def exists() -> bool:
            try:
                return path.exists()
            except (OSError, ValueError):
                return False

        return await self.run_aux(exists)

    async def switch_stt(self, path: Path) -> None:
        """Load a new STT model; the old one keeps serving until the new one is ready."""
        try:
            engine = await self.run_aux(self._new_stt, path)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"STT model could not be loaded ({describe(exc)})") from None
        self.stt = engine
        self.stt_state = EngineState(state="ready", path=path, loaded_at=time.time())

    async def switch_tts(self, path: Path) -> None:
        """Load a new TTS voice; the old one keeps serving until the new one is ready."""
        try:
            engine = await self.run_aux(self._new_tts, path)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"TTS voice could not be loaded ({describe(exc)})") from None
        self.tts = engine
        self.tts_state = EngineState(state="ready", path=path, loaded_at=time.time(),
                                     extra={"sample_rate_hz": engine.sample_rate})

    async def switch_llm(self, path: Path) -> None:
        """Load a new LLM into fresh workers; the old workers finish what they hold."""
        if isinstance(self.pool, RemoteLlm) or (self.pool.state in ("empty", "failed") and not self.pool._workers):
            # Nothing serving: build a new pool so its state reflects the new model.
            pool = self._make_pool(path)
            await pool.start()
            if pool.state != "ready":
                raise ModelLoadError(pool.error or "LLM model could not be loaded")
            await self._replace_llm(pool)
            return
        await self.pool.load(path)

    async def switch_remote(self, model: str | None) -> None:
        """Serve the LLM from the configured remote backend with `model`; refused unless it answers ready."""
        remote = self._make_remote(model)
        await remote.start()
        if remote.state != "ready":
            error = remote.error or "remote LLM backend is not ready"
            await remote.close()
            raise ModelLoadError(error)
        await self._replace_llm(remote)

    async def _replace_llm(self, new: LlmPool | RemoteLlm) -> None:
        """Serve from `new`; the old backend is closed (its answers in progress end `cancelled`)."""
        old, self.pool = self.pool, new
        if old is not new:
            await old.close()

    async def switch_models(self, *, stt: str | None = None, llm: str | None = None, tts: str | None = None,
                            system_prompt: str | None = None, dry_run: bool = False) -> tuple[str, str, list[str]]:
        """A global model switch: validate every path, then load each changed model off the loop.

        Returns (status, message, changed); raises InvalidField or ModelLoadError.
        """
        plan: list[tuple[str, Path]] = []
        remote: list[str | None] = []  # llm "openai:<model>": the remote backend (at most one entry)
        for kind, raw in (("stt", stt), ("llm", llm), ("tts", tts)):
            if raw is None:
                continue
            if kind == "llm" and raw.startswith(f"{REMOTE}:"):
                name = raw.split(":", 1)[1].strip() or self.cfg.llm.remote_model
                if not self.cfg.llm.remote_url:
                    raise InvalidField("no remote LLM configured (LOCAL_LLM_REMOTE_URL)")
                pool = self.pool
                if not (isinstance(pool, RemoteLlm) and pool.model == name and pool.state == "ready"):
                    remote.append(name)
                continue
            path = self.resolve_model_path(raw)
            current = {"stt": self.stt_state.path, "llm": self.pool.model_path, "tts": self.tts_state.path}[kind]
            if not await self.model_file_exists(path):
                raise InvalidField(f"{kind} model path does not exist")
            if current is not None and path == current.resolve():
                continue
            plan.append((kind, path))
        changed = [f"{k}_model_path" for k, _ in plan] + ["llm_model_path" for _ in remote]
        if system_prompt is not None and system_prompt != self.default_prompt:
            # Applied even with dry_run: AVA's engine sends its prompt as a dry-run global switch.
            self.default_prompt = system_prompt or self.cfg.llm.system_prompt
            changed.insert(0, "system_prompt")
        if not changed:
            return "no_change", "already in use", []
        if dry_run:
            return "success", "dry run: " + ", ".join(changed) if plan else "system prompt updated", changed
        for kind, path in plan:
            await {"stt": self.switch_stt, "tts": self.switch_tts, "llm": self.switch_llm}[kind](path)
        for name in remote:
            await self.switch_remote(name)
        log.info("switch_model.done", changed=changed)
        return "success", "switched " + ", ".join(changed), changed

    async def reload(self, what: str, model_path: str | None = None) -> str:
        """Reload the LLM (from its path or `model_path`) or every model; returns what was done."""
        if isinstance(self.pool, RemoteLlm) and not model_path:
            await self.pool.check()  # a remote engine is reloaded by its operator: probe it now
            if what == "llm":
                return f"remote LLM re-checked ({self.pool.state})"
        if what == "llm" or model_path:
            path = self.resolve_model_path(model_path) if model_path else self.pool.model_path
            if path is None:
                raise InvalidField("no LLM model configured to reload")
            if model_path and not await self.model_file_exists(path):
                raise InvalidField("llm model path does not exist")
            await self.switch_llm(path)
            return f"LLM reloaded ({path.name})"
        if self.stt_state.path is not None:
            await self.switch_stt(self.stt_state.path)
        if self.tts_state.path is not None:
            await self.switch_tts(self.tts_state.path)
        if self.pool.model_path is not None and not isinstance(self.pool, RemoteLlm):
            await self.switch_llm(self.pool.model_path)
        return "models reloaded"

    # ------------------------------------------------------------------ work

    def stt_available(self) -> bool:
        """Whether audio can be segmented: a VAD, and an STT model loaded or loading."""
        return self.vad is not None and self.stt_state.state not in ("missing", "failed")

    def stt_loaded(self) -> bool:
        """Whether a transcription can start now."""
        return self.stt is not None

    def vad_stream(self) -> VadStream:
        """Fresh voice-activity state for one audio stream."""
        if self.vad is None:
            raise NotReady(self.vad_state.error or "VAD is not ready")
        return self.vad.stream()

    async def transcribe(self, audio: np.ndarray, kind: str = "final") -> Transcript:
        """Transcribe on the STT threads; raises NotReady when no STT model is loaded."""
        stt = self.stt
        if stt is None:
            raise NotReady(self.stt_state.error or "STT is not ready")
        return await self.run_stt(kind, stt.transcribe, audio)

    async def run_stt(self, kind: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the STT threads: counted in flight, its wait and its time observed as `kind`."""
        t0 = time.perf_counter()
        self.stt_inflight += 1
        try:
            priority = STT_PRIORITY.get(kind, 1)
            result = await asyncio.wrap_future(self.stt_exec.submit(priority, self._waited("stt", fn, *args)))
        finally:
            self.stt_inflight -= 1
        self.metrics.stt_seconds.labels(kind).observe(time.perf_counter() - t0)
        return result

    def _waited(self, stage: str, fn: Callable[..., T], *args: Any) -> Callable[[], T]:
        """`fn(*args)` for an executor, observing how long it waited there for a free thread of `stage`."""
        queued = time.perf_counter()

        def run() -> T:
            self.metrics.queue_wait.labels(stage).observe(time.perf_counter() - queued)  # thread-safe
            return fn(*args)

        return run

    async def synthesize(self, text: str, due: float | None = None) -> tuple[np.ndarray, int]:
        """Synthesize on the TTS threads, the audio needed soonest (`due`, monotonic) first: (audio, rate)."""
        tts = self.tts
        if tts is None:
            raise NotReady(self.tts_state.error or "TTS is not ready")
        t0 = time.perf_counter()
        when = time.monotonic() if due is None else due
        audio = await asyncio.wrap_future(self.tts_exec.submit(when, self._waited("tts", tts.synthesize_all, text)))
        self.metrics.tts_seconds.observe(time.perf_counter() - t0)
        return audio, tts.sample_rate

    def sampling(self) -> SamplingParams:
        """Sampling parameters from the config."""
        c = self.cfg.llm
        return SamplingParams(max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p,
                              repeat_penalty=c.repeat_penalty)

    # ------------------------------------------------------------------ state

    def missing(self, modes: tuple[str, ...] = ("stt", "llm", "tts")) -> list[str]:
        """Stages the pipeline needs that are not ready, as human-readable reasons."""
        out: list[str] = []
        if "stt" in modes:
            if self.stt_state.state != "ready":
                out.append(f"stt: {self.stt_state.error or self.stt_state.state}")
            if self.vad_state.state != "ready":
                out.append(f"vad: {self.vad_state.error or self.vad_state.state}")
        if "llm" in modes and self.pool.state != "ready":
            out.append(f"llm: {self.pool.error or self.pool.state}")
        if "tts" in modes and self.tts_state.state != "ready":
            out.append(f"tts: {self.tts_state.error or self.tts_state.state}")
        return out

    def model_status(self) -> dict[str, Any]:
        """The `models` object of status_response."""
        return model_status(self)

    async def close(self) -> None:
        """Stop the pool and the threads."""
        await self.pool.close()
        self.stt_exec.shutdown()
        self.tts_exec.shutdown()
        self.aux_exec.shutdown(wait=False, cancel_futures=True)
