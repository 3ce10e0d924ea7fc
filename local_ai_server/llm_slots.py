"""A worker's generations: several held at once, the most urgent advanced token by token, others paused.

Between two tokens the worker reads the parent's messages (a new generation, a cancel, a change of
urgency) and advances the most urgent runnable generation; switching parks the running one's state in
the engine (its KV cache and sampler) and restores the other's. An engine that cannot park holds one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .errors import describe
from .priority import HELD

# Longest a generated token waits in the worker to travel with the next ones: briefly while the first
# sentence is being written (the caller waits for it), longer after that (later sentences are spoken
# while earlier ones play, so nobody waits for them). Every message wakes the server and the client,
# and on a small machine each wake-up stalls the decode: fewer messages, faster tokens.
COALESCE_S = 0.025
COALESCE_LATE_S = 0.1
FAST_PHASE_S = 1.0
# Generations one worker holds at once when its engine can park them: a held or paused answer keeps its slot
# (and a copy of its KV cells, 22 KB a token for SmolLM2-135M), so one per call a worker may serve at once.
SLOTS = 8


@dataclass(eq=False)
class Generation:
    """One answer being generated in this worker."""

    job_id: int
    it: Iterator[str]
    level: int
    order: int
    t0: float = field(default_factory=time.monotonic)
    first: float | None = None
    tokens: int = 0
    pending: list[str] = field(default_factory=list)
    last_send: float = 0.0
    cancelled: bool = False
    parked: Any = None  # the engine's state of this generation while another one runs
    usage: dict[str, int] | None = None
    switches: int = 0
    switch_s: float = 0.0  # spent parking this answer and restoring it
    decode_s: float = 0.0  # spent decoding after its first token (not paused)
    started: bool = False  # the engine has begun it (its prompt is, or is being, decoded)


class Slots:
    """The generations of one worker and the loop that serves them; `run` returns when told to stop."""

    def __init__(self, conn: Connection, engine: Any, usage: Callable[[], dict[str, int]]) -> None:
        self.conn = conn
        self.engine = engine
        self.usage = usage
        park = getattr(engine, "park", None)
        can_park = getattr(engine, "can_park", None)
        self.parks = park is not None and (can_park is None or bool(can_park()))
        self.gens: list[Generation] = []
        self.loaded: Generation | None = None  # whose state the engine holds now
        self.stop = False
        self._order = 0

    @property
    def capacity(self) -> int:
        """How many generations the parent may hand this worker at once."""
        return SLOTS if self.parks else 1

    def handle(self, msg: tuple[Any, ...]) -> None:
        """One message from the parent."""
        kind = msg[0]
        if kind == "stop":
            self.stop = True
            for g in self.gens:
                g.cancelled = True
        elif kind == "gen":
            job_id, messages, sampling = msg[1], msg[2], msg[3]
            level = msg[4] if len(msg) > 4 else 0
            self._order += 1
            g = Generation(job_id, iter(()), level, self._order)
            g.it = self.engine.stream(messages, sampling, lambda g=g: g.cancelled)
            self.gens.append(g)
        elif kind in ("cancel", "level"):
            for g in self.gens:
                if g.job_id == msg[1]:
                    if kind == "cancel":
                        g.cancelled = True
                    else:
                        g.level = msg[2]

    def pump(self, block: bool) -> bool:
        """Read waiting messages (waiting for one if `block`); False when the parent is gone."""
        try:
            if block:
                self.handle(self.conn.recv())
            while self.conn.poll():
                self.handle(self.conn.recv())
        except (EOFError, OSError):
            self.stop = True
            for g in self.gens:
                g.cancelled = True
            return False
        return True

    def step(self) -> bool:
        """End cancelled generations, advance the most urgent one by a token; False when none is runnable."""
        for g in [g for g in self.gens if g.cancelled]:
            self._end(g)
        runnable = [g for g in self.gens if g.level < HELD]
        if not runnable:
            now = time.monotonic()
            for held in self.gens:
                self._flush(held, now)  # what a held answer made before it was held goes out now
            return False
        g = min(runnable, key=lambda x: (x.level, x.order))
        try:
            self._load(g)
            g.started = True
            t0 = time.monotonic()
            delta = next(g.it)
            if g.first is not None:
                g.decode_s += time.monotonic() - t0
        except StopIteration:
            self._end(g)
            return True
        except (BrokenPipeError, EOFError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - the request fails, the worker lives on
            self._drop(g)
            self.conn.send(("err", g.job_id, describe(exc)))
            return True
        now = time.monotonic()
        g.tokens += 1
        if g.first is None:
            g.first = now
            g.usage = self.usage()  # before another generation can change what the engine reports
        g.pending.append(delta)
        window = COALESCE_S if now - g.first < FAST_PHASE_S else COALESCE_LATE_S
        if now - g.last_send >= window or g.tokens == 1:
            self._flush(g, now)
        return True

    def _load(self, g: Generation) -> None:
        """Make `g` the generation whose state the engine holds (parking the one that held it)."""
        if self.loaded is g:
            return
        cur = self.loaded
        if cur is not None and cur in self.gens:
            self._flush(cur, time.monotonic())  # a paused answer's tokens must not wait for its resumption
            t0 = time.perf_counter()
            cur.parked = self.engine.park()
            cur.switches += 1
            cur.switch_s += time.perf_counter() - t0
        self.loaded = None
        if g.parked is not None:
            t0 = time.perf_counter()
            state, g.parked = g.parked, None
            self.engine.unpark(state)
            g.switch_s += time.perf_counter() - t0
        self.loaded = g

    def _flush(self, g: Generation, now: float) -> None:
        if g.pending:
            self.conn.send(("tok", g.job_id, "".join(g.pending), len(g.pending)))
            g.pending.clear()
            g.last_send = now

    def _drop(self, g: Generation) -> None:
        self.gens.remove(g)
        if self.loaded is g:
            self.loaded = None  # its leftovers stay in the engine: a next prompt may reuse their prefix
        g.parked = None
        close = getattr(g.it, "close", None)
        if close is not None:
            close()

    def _end(self, g: Generation) -> None:
        """`g` completed or was cancelled: send its last tokens and its end."""
        self._drop(g)
        self._flush(g, time.monotonic())
        elapsed = time.monotonic() - g.t0
        decode_s = g.decode_s
        # Read at the first token; without one, the engine's figures are this answer's only if it began.
        usage = g.usage if g.usage is not None else self.usage() if g.started else {}
        self.conn.send(("done", g.job_id, {
            **usage,
            "tokens": g.tokens,
            "cancelled": g.cancelled,
            "first_token_ms": None if g.first is None else round((g.first - g.t0) * 1000, 1),
            "total_ms": round(elapsed * 1000, 1),
            "decode_tok_s": round((g.tokens - 1) / decode_s, 2) if g.tokens > 1 and decode_s > 0 else None,
            "switches": g.switches,
            "switch_ms": round(g.switch_s * 1000, 2),
        }))

    def run(self) -> bool:
        """Serve until every generation has ended; False when the worker must stop (told to, or orphaned)."""
        while self.gens:
            if not self.pump(block=False):
                break
            if not self.step() and self.gens and not self.stop:
                # Everything held: wait for the parent to release one (or cancel, or hand in another).
                if not self.pump(block=True):
                    break
        for g in list(self.gens):
            g.cancelled = True
            self._end(g)
        return not self.stop
