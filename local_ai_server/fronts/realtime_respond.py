"""Realtime responses, one at a time: a core turn (after the core's tool decision when tools are declared),
its events rendered as the response's, and the function calls it makes instead of answering.

A response is a core turn of kind "realtime" (or first a tool decision, "llm_tool_request") whose request
id is the response's id, so every event of the core finds its response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from ..errors import RequestId, ServerError
from ..outbox import ConnectionOutbox
from ..session import Session
from ..tool_decl import Tool
from ..voice.call import Call
from ..voice.events import Answer, Event, Failure, Speech, Token, ToolCalls
from ..voice.guess import Guess
from ..voice.turn import Turn
from . import realtime_render as R
from . import realtime_tools as T
from .realtime_items import Conversation

log = structlog.get_logger(__name__)

Context = tuple[tuple[str, str], ...] | None  # the messages a response runs on instead of the conversation


class Responses:
    """The responses of one connection: started, streamed, turned into function calls, ended."""

    def __init__(self, ids: R.Ids, session: Session, call: Call, out: ConnectionOutbox,
                 on_done: Callable[[], None], conv: Conversation) -> None:
        self.ids = ids
        self.session = session
        self.call = call
        self.out = out
        self.conv = conv
        self.current: R.Response | None = None
        self.fn = T.FunctionCalls()
        self.closed = False  # the connection ended: nothing more is sent
        self._on_done = on_done  # a response ended (the front may start the next)
        self._epoch = 0
        self._context_turn = False  # the response runs on a context: the front keeps its history
        self._deciding: tuple[str, str, Context] | None = None  # a response deciding on tools: id, input, context
        self._early = 0  # held turns started (their request ids are not response ids: a dropped one leaves no trace)
        self._alias: RequestId = None  # the request id of the held turn the current response took

    @property
    def active(self) -> R.Response | None:
        """The response in progress, if any."""
        return self.current if self.current is not None and not self.current.closed else None

    def guess(self, text: str, *, audio: bool, tools: tuple[Tool, ...], choice: T.ToolChoice) -> Turn | None:
        """The turn of a response to `text`, started early and held (Call.guess); None if it would not be one."""
        usable, mode = T.forced(tools, choice)
        if self.closed or self.fn.waiting or (usable and mode != "none"):
            return None  # the response would answer function outputs, or decide on tools first
        self._early += 1
        try:
            return self.call.start_turn(text, kind="realtime", request_id=f"early_{self._early}", speak=audio,
                                        stream_tokens=True, remember=text, held=True)
        except ServerError:
            return None

    def start(self, user_text: str, item_id: str, previous: str | None, *, audio: bool, output_format: str,
              instructions: str | None, out_of_band: bool, tools: tuple[Tool, ...], choice: T.ToolChoice,
              guess: Guess | None = None) -> None:
        """A response to `user_text` (and to the function outputs waiting), its output item to be `item_id`.

        `guess` is its turn started early (held): taken if the response is what it answered, else dropped.
        """
        resp = R.Response(self.ids, self.ids.new("resp"), item_id, audio, output_format, out_of_band=out_of_band,
                          user_text=user_text, previous_item_id=previous)
        told = user_text
        outputs = not out_of_band and self.fn.waiting
        if outputs:  # answered as AVA's tool_result is: directly, with no new tool decision (which could loop)
            told, resp.user_text = self.fn.take(user_text)
        context: Context = None
        if instructions is not None or out_of_band:
            # This response alone runs on other instructions (or outside the conversation): a context.
            prompt = instructions or self.session.system_prompt or self.call.engines.default_prompt
            context = (("system", prompt), *self.session.history)
        usable, mode = T.forced(tools, choice)
        if guess is not None and (outputs or context is not None or (usable and mode != "none")
                                  or guess.text != told):
            self.call.drop_guess(guess)
            guess = None
        self.current, self._deciding = resp, None
        self._alias = guess.turn.request_id if guess is not None else None
        resp.history_key = self._alias if self._alias is not None else resp.id
        if not out_of_band:
            self.conv.open(resp, outputs)
        self._context_turn, self._epoch = context is not None, self.session.history_epoch
        self._send(resp.created())
        self._send(R.rate_limits(self.ids, self.call.engines.sampling().max_tokens))
        log.info("realtime.response", session=self.session.id, response=resp.id, audio=audio, chars=len(told),
                 instructions=instructions is not None, out_of_band=out_of_band, tools=len(usable), tool_choice=mode,
                 function_outputs=outputs, early=guess is not None)
        if guess is not None:
            self._take(resp, guess)
        elif usable and mode != "none" and not outputs and resp.user_text.strip():
            self._decide(resp, usable, mode, told, context)
        else:
            self._answer(resp, told, context)

    def on_event(self, event: Event, turn: Turn | None) -> bool:
        """A core event of a response, rendered; False when it is not a response's (the front's to handle)."""
        resp = self.active
        mine = resp is not None and self._of_current(getattr(event, "request_id", None))
        if isinstance(event, Token):
            msg = resp.text_delta(event.delta, event.tokens) if resp is not None and mine else None
            if msg is not None:
                self.out.send_data(msg, turn)
        elif isinstance(event, Speech):
            if resp is not None and mine and not resp.muted:
                ms = len(event.audio) / (1 if event.encoding == "mulaw" else 2) / event.sample_rate_hz * 1000
                for msg in resp.audio_deltas(event.audio, event.text, ms):
                    self.out.send_data(msg, turn)
        elif isinstance(event, Answer):
            if resp is not None and mine:
                resp.usage = dict(event.usage)
                self._finish(resp, "completed")
        elif isinstance(event, ToolCalls):
            if resp is not None and mine:
                self._decided(resp, event)
        elif isinstance(event, Failure):
            err = event.error
            if not self._of_current(err.request_id):
                return False  # not of a response: an audio frame refused, an engine error
            # A response's failure is told by its response.done (and its cancellation was told already).
            if resp is not None:
                self._finish(resp, "failed", R.failed_details(err.code, err.message))
        else:
            return False
        return True

    def _of_current(self, request_id: RequestId) -> bool:
        """Whether an event with this request id is the current response's (or its early turn's)."""
        cur = self.current
        return cur is not None and request_id is not None and request_id in (cur.id, self._alias)

    def mute(self) -> str | None:
        """output_audio_buffer.clear: no more audio of the response in progress; the id of the response whose
        audio that is (the last one, when none is in progress), None when there was none."""
        if self.active is not None:
            self.active.muted = True
        return self.current.id if self.current is not None else None

    def cancel(self, reason: str) -> None:
        """The response in progress ends now, `cancelled`; none of its audio follows its response.done."""
        resp = self.active
        if resp is None:
            return
        events = resp.closing("cancelled", R.cancelled_details(reason))  # closed first: its cancel is not news
        self.call.cancel_all()  # its turn is cancelled: the deltas still queued are dropped unsent
        for msg in events:
            self._send(msg)
        log.info("realtime.response_done", session=self.session.id, response=resp.id, status="cancelled",
                 reason=reason, audio_bytes=resp.audio_bytes)
        self._on_done()

    # ------------------------------------------------------------------ one response

    def _decide(self, resp: R.Response, tools: tuple[Tool, ...], mode: str, told: str, context: Context) -> None:
        """The core's tool decision (AVA's, grammar-held) first: a function call, or the answer after it."""
        try:
            turn = self.call.find_tools(text="", latest_user_text=resp.user_text, tools=tools, allowed_tools=(),
                                        policy="auto", choice=mode, request_id=resp.id)
        except ServerError as err:
            self._finish(resp, "failed", R.failed_details(err.code, err.message))
            self.conv.settle(resp.item_id)
            return
        self._deciding = (resp.id, told, context)
        if turn.task is not None:  # a decision that ends with no verdict still ends its response
            turn.task.add_done_callback(lambda _t: None if resp.item_open else self._turn_ended(resp))

    def _decided(self, resp: R.Response, event: ToolCalls) -> None:
        deciding, self._deciding = self._deciding, None
        if deciding is None or deciding[0] != resp.id:
            return
        if not event.calls:
            self._answer(resp, deciding[1], deciding[2])
            return
        name, parameters = event.calls[0]["name"], event.calls[0]["parameters"]
        call_id = self.ids.new("call")
        self.fn.made(call_id, name)
        self.conv.called(resp.item_id, call_id)
        for msg in resp.function_call(resp.previous_item_id, call_id, name, parameters):
            self._send(msg)
        if not resp.out_of_band:
            self.session.add_turn(resp.user_text, T.remembered_call(name, parameters), self._epoch,
                                  key=resp.history_key)
        log.info("realtime.function_call", session=self.session.id, response=resp.id, name=name, path=event.path)
        self._on_done()

    def _answer(self, resp: R.Response, told: str, context: Context) -> None:
        """The response as an assistant message, spoken (or written) by one core turn."""
        for msg in resp.message_opening(resp.previous_item_id):
            self._send(msg)
        try:
            turn = self.call.start_turn(told, kind="realtime", request_id=resp.id, speak=resp.audio,
                                        stream_tokens=True, context=context, remember=resp.user_text)
        except ServerError as err:
            self._finish(resp, "failed", R.failed_details(err.code, err.message))
            self.conv.settle(resp.item_id)
            return
        if turn.task is not None:
            turn.task.add_done_callback(lambda _t: self._turn_ended(resp))

    def _take(self, resp: R.Response, guess: Guess) -> None:
        """The response as its early turn's message: opened now, then what the turn held, in order."""
        for msg in resp.message_opening(resp.previous_item_id):
            self._send(msg)
        self.call.confirm(guess)
        if guess.turn.task is not None:
            guess.turn.task.add_done_callback(lambda _t: self._turn_ended(resp))

    def _turn_ended(self, resp: R.Response) -> None:
        """The response's turn is over (and wrote its history): one that ended without an answer still gets its
        response.done, and edits of its items waiting for the history apply now."""
        if not resp.closed and not self.closed:
            self._finish(resp, "failed", R.failed_details("internal", "the response ended without an answer"))
        self.conv.settle(resp.item_id)

    def _finish(self, resp: R.Response, status: str, details: dict[str, Any] | None = None) -> None:
        for msg in resp.closing(status, details):
            self._send(msg)
        if status == "completed" and self._context_turn and not resp.out_of_band:
            # The core keeps no history for a turn run on a context: this one belongs to the conversation.
            self.session.add_turn(resp.user_text, resp.deltas.text, self._epoch, key=resp.history_key)
        log.info("realtime.response_done", session=self.session.id, response=resp.id, status=status,
                 audio_bytes=resp.audio_bytes, tokens=resp.output_tokens)
        self._on_done()

    def _send(self, msg: dict[str, Any]) -> None:
        self.out.send_data(msg)
