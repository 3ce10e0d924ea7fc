"""A Realtime conversation's items on the core's history: deletes and truncations reach the next prompt."""

from __future__ import annotations

import pytest

from local_ai_server.fronts import realtime_render as R
from local_ai_server.fronts.realtime_items import Conversation, Item, heard_text
from local_ai_server.fronts.realtime_parse import Invalid
from local_ai_server.session import Session

pytestmark = pytest.mark.unit


class Rig:
    """A conversation on a session, with responses whose turns write the history as the core does."""

    def __init__(self) -> None:
        self.session = Session(id=1)
        self.conv = Conversation(self.session)
        self.ids = R.Ids()

    def user(self, text: str, kind: str = "message") -> str:
        item_id = self.ids.new("item")
        self.conv.add(Item(item_id, kind, "user"))
        if kind == "message":
            self.conv.user(item_id, text)
        else:
            self.conv.output(item_id, text)
        return item_id

    def respond(self, answer: str, *, spoken: list[tuple[str, float]] | None = None, settle: bool = True,
                outputs: bool = False) -> R.Response:
        """A response: its exchange opened, its answer streamed, and (if `settle`) its turn's history written."""
        resp = R.Response(self.ids, self.ids.new("resp"), self.ids.new("item"), True, "audio/pcm")
        resp.history_key = resp.id
        self.conv.add(Item(resp.item_id, "message", "assistant"))
        user_text = "\n".join(p.text for p in [*(self.conv.outputs if outputs else []), *self.conv.pending])
        self.conv.open(resp, outputs)
        resp.opening(None)
        resp.text_delta(answer, 1)
        for sentence, ms in spoken or []:
            resp.audio_deltas(b"", sentence, ms)
        resp.closing("completed")
        if settle:
            self.written(resp, user_text)
        return resp

    def written(self, resp: R.Response, user_text: str) -> None:
        self.session.add_turn(user_text, resp.deltas.text, key=resp.history_key)
        self.conv.settle(resp.item_id)


def test_deleting_items_removes_their_text_from_what_the_model_reads() -> None:
    rig = Rig()
    q1 = rig.user("What is the capital of France?")
    a1 = rig.respond("Paris.").item_id
    q2 = rig.user("And of Italy?")
    q3 = rig.user("Be brief.")
    a2 = rig.respond("Rome.").item_id
    assert rig.session.history == [("user", "What is the capital of France?"), ("assistant", "Paris."),
                                   ("user", "And of Italy?\nBe brief."), ("assistant", "Rome.")]
    rig.conv.delete(rig.conv.find(q2, "delete", None))
    rig.conv.delete(rig.conv.find(a1, "delete", None))
    assert rig.session.history == [("user", "What is the capital of France?"), ("user", "Be brief."),
                                   ("assistant", "Rome.")]
    rig.conv.delete(rig.conv.find(q3, "delete", None))  # the last part of a user message: the message goes
    rig.conv.delete(rig.conv.find(q1, "delete", None))
    assert rig.session.history == [("assistant", "Rome.")]
    assert rig.conv.last == a2 and list(rig.conv.items) == [a2]


def test_an_unknown_or_deleted_item_is_an_error_and_changes_nothing() -> None:
    rig = Rig()
    q1 = rig.user("Hi")
    rig.respond("Hello.")
    before = list(rig.session.history)
    with pytest.raises(Invalid) as info:
        rig.conv.find("item_nope", "delete", "evt_1")
    assert (info.value.code, info.value.param, info.value.event_id) == ("item_delete_invalid_item_id", "item_id",
                                                                        "evt_1")
    rig.conv.delete(rig.conv.find(q1, "delete", None))
    with pytest.raises(Invalid):
        rig.conv.find(q1, "delete", None)
    assert rig.session.history == before[1:]


def test_a_waiting_user_message_deleted_is_not_answered() -> None:
    rig = Rig()
    q1 = rig.user("Forget me.")
    rig.user("Answer me.")
    rig.conv.delete(rig.conv.find(q1, "delete", None))
    assert rig.conv.pending_texts == ["Answer me."]
    out = rig.user("(The tool f returned: 1)", kind="function_call_output")
    rig.conv.delete(rig.conv.find(out, "delete", None))
    assert rig.conv.outputs == []


def test_an_edit_of_a_response_whose_turn_still_runs_applies_once_it_wrote_the_history() -> None:
    rig = Rig()
    rig.user("Tell me a story.")
    resp = rig.respond("Once upon a time.", settle=False)
    rig.conv.delete(rig.conv.find(resp.item_id, "delete", None))
    assert rig.session.history == []  # nothing written yet, nothing to edit yet
    rig.written(resp, "Tell me a story.")  # the cancelled turn writes what it generated, then settles
    assert rig.session.history == [("user", "Tell me a story.")]


def test_truncation_keeps_what_was_heard() -> None:
    rig = Rig()
    rig.user("Count.")
    spoken = [("One, two.", 1000.0), ("Three, four, five, six.", 2000.0), ("Seven.", 500.0)]
    resp = rig.respond("One, two. **Three**, four, five, six. Seven.", spoken=spoken)
    item = rig.conv.check_truncate(resp.item_id, 0, 2000, None)
    rig.conv.truncate(item, 2000)  # one second into the second sentence: half its words
    assert rig.session.history[-1] == ("assistant", "One, two. **Three**, four,")
    # Again, shorter: the cut is made from the whole answer, never from the cut one.
    with pytest.raises(Invalid) as info:
        rig.conv.check_truncate(resp.item_id, 0, 2001, "evt_t")  # beyond the audio it now has
    assert (info.value.param, info.value.event_id) == ("audio_end_ms", "evt_t")
    rig.conv.truncate(rig.conv.check_truncate(resp.item_id, 0, 1000, None), 1000)
    assert rig.session.history[-1] == ("assistant", "One, two.")
    rig.conv.truncate(rig.conv.check_truncate(resp.item_id, 0, 0, None), 0)
    assert rig.session.history == [("user", "Count.")]  # nothing was heard: no answer left


def test_a_bad_truncate_changes_nothing() -> None:
    rig = Rig()
    q = rig.user("Hi")
    resp = rig.respond("Hello there.", spoken=[("Hello there.", 800.0)])
    before = list(rig.session.history)
    for item_id, index, end, param in [(resp.item_id, 0, 801, "audio_end_ms"), (resp.item_id, 1, 10, "content_index"),
                                       (q, 0, 0, "item_id"), ("item_x", 0, 0, "item_id")]:
        with pytest.raises(Invalid) as info:
            rig.conv.check_truncate(item_id, index, end, None)
        assert info.value.param == param
    assert rig.session.history == before


@pytest.mark.parametrize(("end_ms", "heard"), [
    (0, ""), (499, ""), (500, "Hello,"), (999, "Hello,"), (1000, "Hello, world!"), (2000, "Hello, world! It is"),
    (1500, "Hello, world! It"), (3000, "Hello, world! It is a fine day."), (10_000, "Hello, world! It is a fine day."),
])
def test_heard_text(end_ms: int, heard: str) -> None:
    spoken = [("Hello, world!", 1000.0), ("It is a fine day.", 2000.0)]
    assert heard_text("Hello, world! It is a fine day.", spoken, end_ms) == heard


def test_heard_text_finds_spoken_words_in_markdown_and_skips_silences() -> None:
    transcript = "Here is a list:\n- **apples**\n- `pears`\n\nEnjoy!"
    spoken = [("Here is a list:", 900.0), ("apples pears", 800.0), ("", 20.0), ("Enjoy!", 500.0)]
    assert heard_text(transcript, spoken, 1700) == "Here is a list:\n- **apples**\n- `pears`"
    assert heard_text(transcript, spoken, 3000) == transcript
