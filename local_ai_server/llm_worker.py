"""The LLM worker process: load one engine, then serve generate, cancel and stop messages over a pipe.

The engine comes from a factory the pool hands each worker: llama-cpp-python by default (imported inside
the worker only), a scripted stand-in in the unit tests, which then run the real processes and pipes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from .engines.llm import LlmParams, SamplingParams
from .errors import describe
from .heap import malloc_trim

# Longest a generated token waits in the worker to travel with the next ones: briefly while the first
# sentence is being written (the caller waits for it), longer after that (later sentences are spoken
# while earlier ones play, so nobody waits for them). Every message wakes the server and the client,
# and on a small machine each wake-up stalls the decode: fewer messages, faster tokens.
COALESCE_S = 0.025
COALESCE_LATE_S = 0.1
FAST_PHASE_S = 1.0
# A worker idle this long hands its freed heap back to the OS (glibc keeps it otherwise); back-to-back
# requests never wait for the trim.
IDLE_TRIM_S = 1.0
# A worker loads and warms up its model this much nicer than the server (in a thread of its own), then
# serves at the server's priority: a reload or a replacement worker takes only CPU the calls being served
# leave, and the server's event loop is not kept waiting for a core on a small machine.
LOAD_NICE = 10


class Engine(Protocol):
    """What a worker needs of a loaded model (engines.llm.LlamaEngine is the real one).

    An engine may also offer `last_usage()`: the last answer's prompt_tokens (and cached_tokens), sent
    with its end.
    """

    path: Path

    def warm_up(self) -> None: ...

    def stream(
        self, messages: list[tuple[str, str]], sampling: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[str]: ...

    def describe(self) -> dict[str, Any]: ...


# Called in the worker process with (model file, load parameters); it must be picklable (a top-level
# function or an instance of a top-level class), since it travels to a spawned process.
EngineFactory = Callable[[Path, LlmParams], Engine]


def llama_engine(model_path: Path, params: LlmParams) -> Engine:
    """The default engine factory: llama-cpp-python, imported here, in the worker process only."""
    from .engines.llm import LlamaEngine

    return LlamaEngine(model_path, params)


def _load(engine_factory: EngineFactory, source: Path, params: LlmParams) -> Engine:
    """Load and warm up the model in a thread of its own at LOAD_NICE (Linux: a thread's nice is its own).

    Elsewhere the nice value is the whole process's and could not be lowered back, so the model loads at
    normal priority in the calling thread.
    """
    if not sys.platform.startswith("linux"):
        engine = engine_factory(source, params)
        engine.warm_up()
        return engine
    loaded: list[Engine] = []
    failed: list[BaseException] = []

    def load() -> None:
        try:
            with contextlib.suppress(OSError):  # a nice value at its ceiling already: load as it is
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, 0) + LOAD_NICE)
            engine = engine_factory(source, params)
            engine.warm_up()
            loaded.append(engine)
        except BaseException as exc:  # noqa: BLE001 - raised again in the worker's main thread
            failed.append(exc)

    loader = threading.Thread(target=load, name="llm-load")
    loader.start()
    loader.join()
    if failed:
        raise failed[0]
    return loaded[0]


def serve(
    conn: Connection,
    model_path: str | None,
    params: LlmParams,
    pinned: str | None = None,
    engine_factory: EngineFactory = llama_engine,
    *,
    trim_factory: Callable[[], Any] = malloc_trim,
    idle_trim_s: float = IDLE_TRIM_S,
) -> None:
    """Worker process body: load the model once, then serve generate/load/stop requests.

    `pinned` names the very file the other workers loaded (the parent's open descriptor of it), so a
    replacement worker loads that model even if the path has been replaced since.
    """
    # The parent owns Ctrl-C and SIGTERM handling; a worker only stops when told or when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if model_path is None:
            raise FileNotFoundError(model_path)
        source = pinned if pinned is not None and os.path.isfile(pinned) else model_path
        engine = _load(engine_factory, Path(source), params)
        engine.path = Path(model_path)  # what status reports, not /proc/<pid>/fd/<n>
        # What loading made lives as long as the worker: keep it out of the collection after each answer.
        gc.collect()
        gc.freeze()
        conn.send(("ready", engine.describe(), None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("ready", None, describe(exc)))
        return
    trim = trim_factory()
    trimmed = False  # loading and warm-up freed a lot
    while True:
        try:
            if trim is not None and not trimmed and not conn.poll(idle_trim_s):
                trim(0)
                trimmed = True
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent is gone: exit rather than linger as an orphan
        kind = msg[0]
        if kind == "stop":
            return
        if kind != "gen":
            continue  # a late cancel for a finished job
        trimmed = False
        if not _generate(conn, engine, *msg[1:]):
            return


def _usage(engine: Engine) -> dict[str, int]:
    """The last answer's prompt token counts, from an engine that tells them (prompt_tokens, cached_tokens)."""
    last_usage = getattr(engine, "last_usage", None)
    return dict(last_usage()) if callable(last_usage) else {}


def _generate(conn: Connection, engine: Engine, job_id: int, messages: list[tuple[str, str]],
              sampling: SamplingParams) -> bool:
    """Stream one answer to the parent; False when the worker must stop (told to, or the parent is gone)."""
    cancelled = stop_after = False
    tokens = 0
    t0 = time.monotonic()
    first: float | None = None

    def should_stop() -> bool:
        nonlocal cancelled, stop_after
        while conn.poll():
            try:
                m = conn.recv()
            except (EOFError, OSError):
                stop_after = cancelled = True
                return True
            if m[0] == "cancel" and m[1] == job_id:
                cancelled = True
            elif m[0] == "stop":
                stop_after = cancelled = True
        return cancelled

    try:
        # Tokens are coalesced for up to COALESCE_S (the first goes at once): a pipe message and a loop
        # wake-up per token cost the decode a measurable share of the cores on a small machine.
        pending: list[str] = []
        last_send = 0.0
        for delta in engine.stream(messages, sampling, should_stop):
            tokens += 1
            now = time.monotonic()
            if first is None:
                first = now
            pending.append(delta)
            window = COALESCE_S if now - first < FAST_PHASE_S else COALESCE_LATE_S
            if now - last_send >= window or tokens == 1:
                conn.send(("tok", job_id, "".join(pending), len(pending)))
                pending.clear()
                last_send = now
        if pending:
            conn.send(("tok", job_id, "".join(pending), len(pending)))
        elapsed = time.monotonic() - t0
        decode_s = elapsed - ((first or t0) - t0)
        conn.send(
            (
                "done",
                job_id,
                {
                    **_usage(engine),
                    "tokens": tokens,
                    "cancelled": cancelled,
                    "first_token_ms": None if first is None else round((first - t0) * 1000, 1),
                    "total_ms": round(elapsed * 1000, 1),
                    "decode_tok_s": round((tokens - 1) / decode_s, 2) if tokens > 1 and decode_s > 0 else None,
                },
            )
        )
    except (BrokenPipeError, EOFError, OSError):
        return False
    except Exception as exc:  # noqa: BLE001 - the request fails, the worker lives on
        conn.send(("err", job_id, describe(exc)))
    return not stop_after
