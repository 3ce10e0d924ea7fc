"""One call: its turns, history, barge-in and rollback, early answers, tool turns and TTS requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from .. import toolgate
from ..config import ServerConfig
from ..errors import Busy, Cancelled, RequestId, ServerError
from ..metrics import Metrics
from ..session import Session
from ..tasks import ErrorHandler, TaskOwner
from ..text import clean_for_speech
from ..tools import Tool, farewell_from_result, tool_result_prompt
from .events import Answer, Failure, Synthesized, ToolCalls
from .guess import Guess, SttAnswers
from .listen import Listener
from .ports import Engines, Sink, TokenSource
from .turn import FixedAnswer, Turn, Voice, run_answer, synthesize

log = structlog.get_logger(__name__)


class Call:
    """Drives one call: listening, its turns, its requests; every task belongs to the call's owner."""

    def __init__(self, session: Session, engines: Engines, sink: Sink, cfg: ServerConfig, metrics: Metrics,
                 tasks: TaskOwner) -> None:
        self.session = session
        self.engines = engines
        self.sink = sink
        self.cfg = cfg
        self.metrics = metrics
        self.turns: set[Turn] = set()
        self.voice_turn: Turn | None = None
        self._tasks = tasks
        self.stt_answers: SttAnswers | None = None
        self.awaiting_tool_result = False  # tool calls went out; the client's tool_result finishes the turn
        self.listener = Listener(session, engines, sink, cfg.stt, metrics, tasks, self, cfg.llm.speculate)

    # ------------------------------------------------------------------ audio

    def accept_audio(self, payload: bytes, fmt: str | None, rate: int | None, request_id: RequestId, *,
                     binary: bool = False) -> None:
        """One inbound audio frame; raises UnsupportedAudio or Busy."""
        self.listener.accept(payload, fmt, rate, request_id, binary=binary)

    def settings_changed(self) -> None:
        """The segmentation thresholds changed."""
        self.listener.settings_changed()

    def error(self, err: ServerError) -> None:
        """Tell the client, and count it."""
        self.metrics.errors.labels(err.code).inc()
        self.sink.control(Failure(err))

    # ------------------------------------------------------------------ what listening hands over

    def answer_stt_with(self, front: SttAnswers) -> None:
        """Let `front` answer the stt mode's finals (and start its answers early, held, if speculating)."""
        self.stt_answers = front
        self.listener.answers_stt = True

    def guess(self, text: str, mode: str, request_id: RequestId) -> Guess | None:
        """Start answering an early transcript, held until the final confirms it."""
        snap = self.engines.pool.snapshot()
        if snap["state"] != "ready" or snap["busy"] >= snap["workers"] or snap["queued"]:
            return None  # a guess must never make another caller's answer wait for a worker
        if mode == "stt":
            turn = self.stt_answers.guess(text, request_id) if self.stt_answers is not None else None
            if turn is None:
                return None
        else:
            turn = self.start_turn(text, kind="voice", request_id=request_id, speak=(mode == "full"),
                                   stream_tokens=False, held=True)
        turn.timings["speculated"] = turn.timings["start"]
        self.metrics.speculative_turns.labels("started").inc()
        return Guess(text, mode, turn, len(self.session.history), self.session.history_epoch)

    def drop_guess(self, guess: Guess) -> None:
        """Forget an early answer unheard."""
        if not guess.turn.cancelled:
            guess.turn.cancel()
        self.metrics.speculative_turns.labels("discarded").inc()

    def heard(self, text: str, mode: str, request_id: RequestId, ended_at: float, stt_ms: float,
              guess: Guess | None) -> None:
        """A final transcript: let the early answer speak if it answered exactly this, else answer now."""
        if guess is not None and not self._still_valid(guess, text, mode):
            self.drop_guess(guess)
            guess = None
        if guess is not None:
            guess.turn.timings.update(utterance_end=ended_at, stt_ms=stt_ms)
        if mode == "stt":  # the front answers: it confirms the guess (or drops it) itself
            if self.stt_answers is not None:
                self.stt_answers.heard(text, request_id, guess)
            elif guess is not None:
                self.drop_guess(guess)
            return
        if guess is not None:
            if self.voice_turn is not None and self.voice_turn is not guess.turn and not self.voice_turn.cancelled:
                self.voice_turn.cancel()  # the caller spoke again: the previous answer stops, as for any final
            self.voice_turn = guess.turn
            self.confirm(guess)
            return
        self.start_turn(text, kind="voice", request_id=request_id, speak=(mode == "full"), stream_tokens=False,
                        timings={"utterance_end": ended_at, "stt_ms": stt_ms})

    def _still_valid(self, guess: Guess, text: str, mode: str) -> bool:
        s, turn = self.session, guess.turn
        return not (turn.cancelled or turn.failed or guess.text != text or guess.mode != mode
                    or guess.history_len != len(s.history) or guess.epoch != s.history_epoch)

    def confirm(self, guess: Guess) -> None:
        """The final confirmed the guess: everything it held goes out now, in order."""
        self.metrics.speculative_turns.labels("confirmed").inc()
        guess.turn.release()

    # ------------------------------------------------------------------ turns

    def start_turn(self, text: str, *, kind: str, request_id: RequestId, speak: bool, stream_tokens: bool,
                   context: tuple[tuple[str, str], ...] | None = None, timings: dict[str, float] | None = None,
                   held: bool = False, answer: str | None = None, remember: str | None = None,
                   mark: dict[str, Any] | None = None) -> Turn:
        """Start an answer; a new voice turn cancels the voice turn still in flight (the caller spoke again).

        A `held` (early) voice turn sends nothing and cancels nothing until it is confirmed. `answer` is
        spoken as it is, without the LLM (a farewell); `remember` is what the history keeps of `text`;
        `mark` sets the turn's markings (audio_mode, response_mode, flags).
        """
        if kind == "voice" and not held and self.voice_turn is not None and not self.voice_turn.cancelled:
            self.voice_turn.cancel()
        elif kind != "voice":
            self._check_inflight(request_id)
        turn = Turn(kind=kind, request_id=request_id, timings=dict(timings or {}), held=held, **(mark or {}))
        turn.timings.setdefault("start", time.monotonic())
        self._run(turn, self._answer(turn, text, speak, stream_tokens, context, answer, remember),
                  lambda exc: self._turn_error(turn, _as_server_error(exc, "the answer")))
        if kind == "voice" and not held:
            self.voice_turn = turn
            self.awaiting_tool_result = False  # the caller spoke on: the tool's turn is over
        return turn

    def _run(self, turn: Turn, coro: Coroutine[Any, Any, None], on_error: ErrorHandler) -> Turn:
        """Run a turn's work as a task of this call; the turn is in flight until that task ends."""
        turn.task = self._tasks.spawn(coro, on_error=on_error)
        self.turns.add(turn)
        turn.task.add_done_callback(lambda _t: self.turns.discard(turn))
        return turn

    def _turn_error(self, turn: Turn, err: ServerError) -> None:
        """An error of a turn: to the client, or, for an early turn, a reason not to confirm it."""
        if turn.held:
            turn.failed = True
            return
        err.request_id = turn.request_id
        self.error(err)

    def _voice(self, speak: bool) -> Voice | None:
        if not speak:
            return None
        enc, rate, _fb = self.session.output_format()
        return Voice(self.engines, self.sink, enc, rate, lambda coro: self._tasks.spawn(coro), self._turn_error,
                     pace_ahead_s=self.cfg.pace_ahead_s if self.cfg.scheduling == "priority" else None)

    async def _answer(self, turn: Turn, text: str, speak: bool, stream_tokens: bool,
                      context: tuple[tuple[str, str], ...] | None, fixed: str | None, remember: str | None) -> None:
        s = self.session
        messages = s.messages_for(text, self.engines.default_prompt, context)
        epoch = s.history_epoch
        remembered = text if remember is None else remember
        log.info("llm.request", session=s.id, call_id=s.call_id, kind=turn.kind, turn=turn.id,
                 messages=len(messages), history=len(s.history), context=context is not None,
                 system_prompt_chars=len(messages[0][1]) if messages[0][0] == "system" else 0,
                 interrupted=s.interrupted, fixed=fixed is not None)
        voice = self._voice(speak)
        tools = self.call_tools() if turn.kind == "voice" and speak and fixed is None else ()
        try:
            if tools:
                # As AVA's server does: a tool the caller's words call for is decided before speaking.
                gated = await toolgate.gate(self.engines.pool, self.engines.sampling(), user_text=text,
                                            tools=tools, policy=s.tool_policy, messages=messages)
                if gated is not None:
                    self._send_gated(turn, gated, text, epoch)
                    return
                turn.flags["tool_gateway_done"] = True
            job: TokenSource = (FixedAnswer(fixed) if fixed is not None
                                else self.engines.pool.submit(messages, self.engines.sampling()))
        except ServerError as err:
            self._turn_error(turn, err)
            return
        try:
            answer = await run_answer(turn, job, voice, stream_tokens=stream_tokens, sink=self.sink)
        except ServerError as err:
            if err.code != "cancelled":
                self._turn_error(turn, err)
            return
        except asyncio.CancelledError:
            # Cancelled (barge-in, a new utterance, disconnect): the requester was answered `cancelled` by
            # cancel_all. The caller heard (part of) this answer: keep it so the conversation stays
            # coherent, unless the history was reset meanwhile or the client asked for a rollback.
            if context is None and turn.parts and not turn.held and not turn.rollback:
                s.add_turn(remembered, "".join(turn.parts).strip(), epoch, key=turn.request_id)
            raise
        response = Answer(answer, turn.request_id, turn.response_mode, turn.flags, usage=_usage(job.stats))

        def finish() -> None:
            self.sink.data(response, turn)
            if context is None:
                s.add_turn(remembered, answer, epoch, key=turn.request_id)
            s.interrupted = False  # the answer after an interruption has been given
            self._log_turn(turn, job.stats, len(answer))

        turn.emit(finish)

    def _log_turn(self, turn: Turn, stats: dict[str, Any], chars: int) -> None:
        t = turn.timings
        base = t.get("utterance_end", t["start"])

        def ms(key: str) -> float | None:
            return round((t[key] - base) * 1000, 1) if key in t else None

        # An early answer's first token may come before the end of the utterance: negative here.
        first_token, first_audio = ms("llm_first_token"), ms("first_audio")
        total = round((time.monotonic() - base) * 1000, 1)
        if first_token is not None:
            self.metrics.turn_seconds.labels("llm_first_token").observe(max(0.0, first_token) / 1000)
        if first_audio is not None:
            self.metrics.turn_seconds.labels("first_audio").observe(first_audio / 1000)
        self.metrics.turn_seconds.labels("total").observe(total / 1000)
        log.info("turn.done", session=self.session.id, call_id=self.session.call_id, kind=turn.kind,
                 stt_ms=round(t["stt_ms"], 1) if "stt_ms" in t else None, llm_first_token_ms=first_token,
                 first_audio_ms=first_audio, total_ms=total, tokens=stats.get("tokens"),
                 decode_tok_s=stats.get("decode_tok_s"), chars=chars, speculative="speculated" in t)

    # ------------------------------------------------------------------ tools

    def call_tools(self) -> tuple[Tool, ...]:
        """The tools this call may use (its declared tools, narrowed to the allowed names)."""
        return toolgate.usable_tools(self.session.tools, self.session.allowed_tools)

    def _send_gated(self, turn: Turn, gated: toolgate.ToolDecision, text: str, epoch: int) -> None:
        """A voice turn that became a tool call: the calls, nothing spoken."""
        s = self.session
        event = ToolCalls(gated.answer, [c.wire() for c in gated.calls], gated.path, gated.structured_attempts,
                          None, gated=True)

        def send() -> None:
            self.sink.data(event, turn)
            s.add_turn(text, gated.answer or f"(I used the tool {gated.calls[0].name}.)", epoch, key=turn.request_id)
            self.awaiting_tool_result = True
            log.info("turn.tool_call", session=s.id, call_id=s.call_id, tools=[c.name for c in gated.calls],
                     tool_path=gated.path)

        turn.emit(send)

    def find_tools(self, *, text: str, latest_user_text: str, tools: tuple[Tool, ...] | None,
                   allowed_tools: tuple[str, ...] | None, policy: str | None, choice: Any,
                   request_id: RequestId) -> Turn:
        """Find the tool calls an answer makes (or the question calls for); answered by one ToolCalls."""
        self._check_inflight(request_id)
        turn = Turn(kind="llm_tool_request", request_id=request_id)
        coro = self._find_tools(turn, text, latest_user_text, tools, allowed_tools, policy, choice)
        return self._run(turn, coro, lambda exc: self._turn_error(turn, _as_server_error(exc, "the tool search")))

    async def _find_tools(self, turn: Turn, text: str, latest_user_text: str, tools: tuple[Tool, ...] | None,
                          allowed: tuple[str, ...] | None, policy: str | None, choice: Any) -> None:
        s = self.session
        usable = toolgate.usable_tools(tools if tools is not None else s.tools,
                                       allowed if allowed is not None else s.allowed_tools)
        question = latest_user_text or text
        try:
            found = await toolgate.find_tool_calls(
                self.engines.pool, self.engines.sampling(), text=text, latest_user_text=latest_user_text,
                tools=usable, policy=policy or s.tool_policy, choice=choice,
                messages=s.messages_for(question, self.engines.default_prompt))
        except ServerError as err:
            if err.code != "cancelled":  # answered by the cancel itself
                self._turn_error(turn, err)
            return
        log.info("tool_request.done", session=s.id, call_id=s.call_id, tools=[c.name for c in found.calls],
                 tool_path=found.path)
        answer = found.answer if found.path == "parser" else text
        self.awaiting_tool_result = bool(found.calls)
        self.sink.data(ToolCalls(answer, [c.wire() for c in found.calls], found.path, found.structured_attempts,
                                 turn.request_id), turn)

    def tool_result(self, *, tool_name: str, result: Any, is_error: bool, request_id: RequestId,
                    encoding: str | None = None, rate: int | None = None) -> Turn:
        """The answer a tool's result calls for, spoken in every mode; a successful hangup needs no LLM."""
        s = self.session
        self.awaiting_tool_result = False
        if encoding is not None or rate is not None:
            s.output_encoding, s.output_sample_rate_hz, _fb = s.output_format(encoding, rate)
        terminal = tool_name == toolgate.HANGUP and not is_error
        flags = {"tool_result_final": True, "tool_gateway_done": True,
                 "tool_path": "terminal_farewell" if terminal else "none"}
        mark = {"audio_mode": "tool_result", "response_mode": "tool_result", "flags": flags}
        remember = f"(The tool {tool_name} {'failed' if is_error else 'returned'}.)"
        if terminal:
            return self.start_turn("", kind="tool_result", request_id=request_id, speak=True, stream_tokens=False,
                                   answer=farewell_from_result(result), remember=remember, mark=mark)
        return self.start_turn(tool_result_prompt(tool_name, result, is_error), kind="tool_result",
                               request_id=request_id, speak=True, stream_tokens=False, remember=remember, mark=mark)

    # ------------------------------------------------------------------ TTS requests

    def speak_text(self, text: str, *, request_id: RequestId, encoding: str | None = None,
                   rate: int | None = None) -> Turn:
        """Synthesize a whole text, answered by one Synthesized; a barge-in cancels it like an answer."""
        self._check_inflight(request_id)
        turn = Turn(kind="tts_request", request_id=request_id)
        enc, rate_n, _fb = self.session.output_format(encoding, rate)
        return self._run(turn, self._speak_text(turn, text, enc, rate_n),
                         lambda exc: self._speech_failed(turn, text, enc, rate_n, exc))

    async def _speak_text(self, turn: Turn, text: str, enc: str, rate: int) -> None:
        try:
            # Text with nothing a voice can say (symbols only) is answered with no audio.
            words = clean_for_speech(text)
            payload = await synthesize(self.engines, words, enc, rate) if words else b""
        except ServerError as err:
            self._speech_failed(turn, text, enc, rate, err)
            return
        self.sink.data(Synthesized(text, payload, enc, rate, turn.request_id), turn)

    def _speech_failed(self, turn: Turn, text: str, enc: str, rate: int, exc: BaseException) -> None:
        """A TTS request that failed: the error, and an empty answer (a client waiting for one stops now)."""
        err = _as_server_error(exc, "speech synthesis")
        err.request_id = turn.request_id
        self.error(err)
        self.sink.data(Synthesized(text, b"", enc, rate, turn.request_id), turn)

    def _check_inflight(self, request_id: RequestId) -> None:
        """One connection may not queue unbounded work: past the cap, requests get `busy`."""
        explicit = sum(1 for t in self.turns if t.kind != "voice" and not t.cancelled)
        if explicit >= self.cfg.max_inflight_requests:
            raise Busy(f"too many requests in flight on this connection (max {self.cfg.max_inflight_requests})",
                       request_id=request_id)

    # ------------------------------------------------------------------ cancellation

    def cancel_all(self, rollback: bool = False) -> int:
        """Cancel every turn in flight (barge-in); returns how many were cancelled.

        Each request cancelled here is answered `cancelled` now: a task cancelled before it first ran never
        reaches its own handlers, and its requester would wait forever. With `rollback`, the interrupted
        exchange leaves no trace in the history: a turn cut off here records nothing, and if none was
        running, the answer the caller was still hearing (generated, being played out) is forgotten.
        """
        n = 0
        cut_answer = False
        for turn in list(self.turns):
            if turn.cancelled or (turn.task is not None and turn.task.done()):
                continue  # answered already (its reply may still wait to be sent)
            turn.rollback = rollback
            cut_answer = cut_answer or (turn.kind in ("voice", "tool_result") and not turn.held)
            turn.cancel()
            if turn.kind != "voice" and not turn.held:  # voice and held turns have no requester waiting for a reply
                self.error(Cancelled(f"{turn.kind} cancelled", request_id=turn.request_id))
            n += 1
        # An answer already complete may still wait for a slow reader: none of its audio may follow the ack.
        self.sink.discard_speech()
        if rollback:
            if cut_answer:
                self.session.interrupted = True
            else:
                self.session.rollback()
        return n

    def stop_speech(self) -> None:
        """Forget buffered audio and the utterance in progress (stop_session, new call)."""
        self.listener.reset()
        self.awaiting_tool_result = False

    def between_turns(self) -> bool:
        """Nothing of a turn under way: no utterance, no answer or request in flight, no tool result awaited."""
        return self.listener.quiet and not self.turns and not self.awaiting_tool_result

    async def close(self) -> None:
        """The connection closed: cancel everything this call had in flight, and wait for it to end."""
        self.listener.closed = True
        self.cancel_all()
        await self._tasks.aclose()


def _usage(stats: dict[str, Any]) -> dict[str, int]:
    """The token counts an LLM job reported (output, and the prompt's when the engine told them)."""
    names = {"tokens": "output_tokens", "prompt_tokens": "input_tokens", "cached_tokens": "cached_tokens"}
    return {name: int(stats[key]) for key, name in names.items() if isinstance(stats.get(key), int)}


def _as_server_error(exc: BaseException, what: str) -> ServerError:
    """A failure as the error a client may see: ours as it is, anything else as `internal`."""
    return exc if isinstance(exc, ServerError) else ServerError(f"internal error in {what}")
