"""A Realtime conversation's items on the core's history: which history message holds each item's text, and
conversation.item.delete / .truncate applied to it, so the next response reads the edited conversation (no I/O).

The core keeps the conversation as text exchanges (Session.history), one per response, tagged with the
request id of the response's turn: the user message (the texts of the items it answered, joined) and the
answer (an assistant message, or a function call as text). An edit of an exchange whose turn still runs waits
until the turn has written it (`settle`), then applies.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import structlog

from ..errors import RequestId
from ..session import Session
from .realtime_fields import Invalid, short
from .realtime_render import Response

log = structlog.get_logger(__name__)

MAX_ITEMS = 512  # items remembered (for delete and truncate); the history itself keeps far fewer
_WORD = re.compile(r"\S+")


@dataclass(eq=False)
class Exchange:
    """One response's exchange in the history: the user-side items it answered, in the order joined, and its key."""

    key: RequestId
    parts: list[Item] = field(default_factory=list)
    answer: Item | None = None
    settled: bool = False  # the turn ended: its messages are in the history (if any were written)
    user_edited: bool = False
    answer_edited: bool = False


@dataclass(eq=False)
class Item:
    """One item: a user message (typed or heard), a function call's output, an assistant message or a call."""

    id: str
    kind: str  # "message" | "function_call" | "function_call_output"
    role: str  # the history message its text is in: "user" or "assistant"
    text: str = ""  # its text in that message (user side)
    exchange: Exchange | None = None  # None while it waits for a response (user side)
    response: Response | None = None  # the response that produces it (assistant side)
    call_id: str | None = None  # a function call's
    deleted: bool = False
    cut: str | None = None  # truncated: what the history keeps of the answer
    audio_end_ms: int | None = None  # truncated at


class Conversation:
    """The items of one Realtime connection, in order, and the edits that reach the core's history."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.items: collections.OrderedDict[str, Item] = collections.OrderedDict()
        self.pending: list[Item] = []  # user messages no response has answered yet
        self.outputs: list[Item] = []  # function outputs no response has answered yet
        self.last: str | None = None
        self._running: dict[str, Exchange] = {}  # exchanges whose turn has not ended, by output item id

    # ------------------------------------------------------------------ items in

    def add(self, item: Item) -> str | None:
        """`item` is now the conversation's last; returns the item before it (previous_item_id)."""
        previous, self.last = self.last, item.id
        self.items[item.id] = item
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)
        return previous

    def user(self, item_id: str, text: str) -> None:
        """A user message's text (typed, or its transcript): the next response answers it."""
        item = self.items.get(item_id)
        if item is not None and text:
            item.text = text
            self.pending.append(item)

    def output(self, item_id: str, text: str) -> None:
        """A function output, as the history will keep it: the next response answers it."""
        item = self.items.get(item_id)
        if item is not None:
            item.text = text
            self.outputs.append(item)

    @property
    def pending_texts(self) -> list[str]:
        """The texts of the user messages waiting for a response."""
        return [i.text for i in self.pending]

    def open(self, resp: Response, outputs: bool) -> None:
        """`resp` answers the waiting user messages (and the function outputs, if `outputs`) in its exchange."""
        ex = Exchange(resp.history_key)
        ex.parts = [*(self.outputs if outputs else []), *self.pending]
        self.pending = []
        if outputs:
            self.outputs = []
        answer = self.items.get(resp.item_id)
        if answer is not None:
            answer.response, answer.exchange, ex.answer = resp, ex, answer
        for part in ex.parts:
            part.exchange = ex
        self._running[resp.item_id] = ex
        while len(self._running) > MAX_ITEMS:  # never more than a few: every turn ends
            self._running.pop(next(iter(self._running)))

    def called(self, item_id: str, call_id: str) -> None:
        """The response's output item became a function call."""
        item = self.items.get(item_id)
        if item is not None:
            item.kind, item.call_id = "function_call", call_id

    def settle(self, item_id: str) -> None:
        """The turn of the response whose output item is `item_id` ended: its exchange is in the history now."""
        ex = self._running.pop(item_id, None)
        if ex is not None:
            ex.settled = True
            self._apply(ex)

    # ------------------------------------------------------------------ edits

    def find(self, item_id: str, op: str, event_id: str | None) -> Item:
        """The item, or the `error` an unknown id gets (code item_<op>_invalid_item_id, as OpenAI's)."""
        item = self.items.get(item_id)
        if item is None:
            raise Invalid(f"the conversation has no item {short(item_id)}", code=f"item_{op}_invalid_item_id",
                          param="item_id", event_id=event_id)
        return item

    def delete(self, item: Item) -> None:
        """Remove `item`: from what waits for a response, or from its exchange in the history."""
        del self.items[item.id]
        if self.last == item.id:
            self.last = next(reversed(self.items), None)
        item.deleted = True
        self.pending = [i for i in self.pending if i is not item]
        self.outputs = [i for i in self.outputs if i is not item]
        ex = item.exchange
        log.info("realtime.item_deleted", session=self.session.id, item=item.id, kind=item.kind, role=item.role,
                 answered=ex is not None)
        if ex is None:
            return
        if item.role == "user":
            ex.user_edited = True
        else:
            ex.answer_edited = True
        self._apply(ex)

    def check_truncate(self, item_id: str, content_index: int, audio_end_ms: int, event_id: str | None) -> Item:
        """The assistant message to truncate, or the `error` a bad truncate gets (and nothing changes)."""
        item = self.find(item_id, "truncate", event_id)
        if item.kind != "message" or item.role != "assistant" or item.response is None:
            raise Invalid("only assistant message items can be truncated", param="item_id", event_id=event_id)
        if content_index != 0:
            raise Invalid("an assistant message has one content part: content_index must be 0",
                          param="content_index", event_id=event_id)
        audio_ms = int(item.response.audio_ms) if item.audio_end_ms is None else item.audio_end_ms
        if audio_end_ms > audio_ms:
            raise Invalid(f"audio_end_ms {audio_end_ms} is beyond the item's audio ({audio_ms} ms)",
                          param="audio_end_ms", event_id=event_id)
        return item

    def truncate(self, item: Item, audio_end_ms: int) -> None:
        """Keep of the answer's text only what its audio had said by `audio_end_ms`."""
        resp = item.response
        assert resp is not None  # check_truncate made sure
        item.cut, item.audio_end_ms = heard_text(resp.deltas.text, resp.spoken, audio_end_ms), audio_end_ms
        log.info("realtime.item_truncated", session=self.session.id, item=item.id, audio_end_ms=audio_end_ms,
                 audio_ms=round(resp.audio_ms), chars=len(item.cut), of_chars=len(resp.deltas.text))
        if item.exchange is not None:
            item.exchange.answer_edited = True
            self._apply(item.exchange)

    def _apply(self, ex: Exchange) -> None:
        """Write an exchange's edits into the history, once its turn has written it."""
        if not ex.settled:
            return
        if ex.user_edited:
            self.session.edit_message(ex.key, "user", "\n".join(p.text for p in ex.parts if not p.deleted))
        answer = ex.answer
        if ex.answer_edited and answer is not None:
            self.session.edit_message(ex.key, "assistant", None if answer.deleted else answer.cut)


def heard_text(transcript: str, spoken: list[tuple[str, float]], audio_end_ms: float) -> str:
    """The start of `transcript` that the audio had said by `audio_end_ms`.

    `spoken` is each speech chunk's sentence and duration, in order. Sentences whose audio ended by then
    are heard whole; of the sentence playing then, the share of its words that the share of its audio
    played holds (a voice speaks a sentence at an even pace). The spoken words are then found in the
    transcript (speech has its markdown and symbols removed), which is cut after the last one.
    """
    heard: list[str] = []
    t = 0.0
    for sentence, ms in spoken:
        words = sentence.split()
        if t + ms <= audio_end_ms:
            heard += words
            t += ms
            continue
        if ms > 0:
            heard += words[:int(len(words) * (audio_end_ms - t) / ms)]
        break
    return _cut_after(transcript, heard)


def _norm(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


def _cut_after(transcript: str, words: list[str]) -> str:
    """`transcript` up to the last of `words` found in it, in order (a word not found is skipped)."""
    tokens = [(m.end(), _norm(m.group())) for m in _WORD.finditer(transcript)]
    pos, end = 0, 0
    for word in words:
        w = _norm(word)
        if not w:
            continue
        # Look a little ahead only: speech drops symbols, never more than a few written tokens in a row.
        for j in range(pos, min(pos + 8, len(tokens))):
            if tokens[j][1] == w:
                end, pos = tokens[j][0], j + 1
                break
    return transcript[:end]
