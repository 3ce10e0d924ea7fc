"""Tests for per-connection Session state: call ids, chat history, prompts and output format precedence."""

from __future__ import annotations

import pytest

from local_ai_server.session import DEFAULT_CALL_ID, Session

DEFAULT_PROMPT = "default prompt"


def test_new_session_defaults() -> None:
    s = Session(id=1)
    assert s.call_id == DEFAULT_CALL_ID == "unknown"
    assert s.history == [] and s.max_history_turns == 8


def test_new_call_id_resets_history_and_tool_context() -> None:
    s = Session(id=1, call_id="a")
    s.add_turn("hi", "hello")
    s.allowed_tools, s.tool_policy = ("hangup_call",), "strict"
    assert s.adopt_call_id("b") is True
    assert s.call_id == "b" and s.history == [] and s.allowed_tools == () and s.tool_policy == "auto"


def test_same_call_id_keeps_history() -> None:
    s = Session(id=1, call_id="a")
    s.add_turn("hi", "hello")
    s.allowed_tools, s.tool_policy = ("hangup_call",), "strict"
    assert s.adopt_call_id("a") is False
    assert s.history == [("user", "hi"), ("assistant", "hello")] and s.allowed_tools == ("hangup_call",)


@pytest.mark.parametrize("call_id", [None, ""])
def test_missing_call_id_keeps_current_call(call_id: str | None) -> None:
    s = Session(id=1, call_id="a")
    s.add_turn("hi", "hello")
    assert s.adopt_call_id(call_id) is False
    assert s.call_id == "a" and len(s.history) == 2


def test_first_call_id_replaces_unknown() -> None:
    s = Session(id=1)
    assert s.adopt_call_id("call-1") is True and s.call_id == "call-1"


def test_messages_for_uses_default_prompt() -> None:
    s = Session(id=1)
    assert s.messages_for("What time is it?", DEFAULT_PROMPT) == [
        ("system", DEFAULT_PROMPT), ("user", "What time is it?")]


def test_messages_for_session_prompt_wins_and_history_included() -> None:
    s = Session(id=1, system_prompt="session prompt")
    s.add_turn("one", "uno")
    assert s.messages_for("two", DEFAULT_PROMPT) == [
        ("system", "session prompt"), ("user", "one"), ("assistant", "uno"), ("user", "two")]


def test_messages_for_context_replaces_history() -> None:
    s = Session(id=1)
    s.add_turn("history question", "history answer")
    ctx = (("user", "ctx q"), ("assistant", "ctx a"))
    assert s.messages_for("now", DEFAULT_PROMPT, ctx) == [
        ("system", DEFAULT_PROMPT), ("user", "ctx q"), ("assistant", "ctx a"), ("user", "now")]


def test_messages_for_empty_context_drops_history() -> None:
    s = Session(id=1)
    s.add_turn("history question", "history answer")
    assert s.messages_for("now", DEFAULT_PROMPT, ()) == [("system", DEFAULT_PROMPT), ("user", "now")]


def test_messages_for_context_with_own_system_message_wins_over_prompts() -> None:
    s = Session(id=1, system_prompt="session prompt")
    ctx = (("system", "context prompt"), ("user", "q"), ("assistant", "a"))
    msgs = s.messages_for("next", DEFAULT_PROMPT, ctx)
    assert msgs == [("system", "context prompt"), ("user", "q"), ("assistant", "a"), ("user", "next")]
    assert sum(1 for role, _ in msgs if role == "system") == 1


def test_messages_for_does_not_mutate_history() -> None:
    s = Session(id=1)
    s.add_turn("q", "a")
    s.messages_for("next", DEFAULT_PROMPT)
    assert s.history == [("user", "q"), ("assistant", "a")]


def test_add_turn_trims_to_max_history_turns() -> None:
    s = Session(id=1, max_history_turns=2)
    for i in range(5):
        s.add_turn(f"q{i}", f"a{i}")
    assert s.history == [("user", "q3"), ("assistant", "a3"), ("user", "q4"), ("assistant", "a4")]


def test_add_turn_without_answer_stores_only_user_text() -> None:
    s = Session(id=1)
    s.add_turn("q", "")
    assert s.history == [("user", "q")]


def test_add_turn_default_keeps_eight_turns() -> None:
    s = Session(id=1)
    for i in range(20):
        s.add_turn(f"q{i}", f"a{i}")
    assert len(s.history) == 16 and s.history[0] == ("user", "q12") and s.history[-1] == ("assistant", "a19")


def test_add_turn_trim_never_leaves_orphan_assistant() -> None:
    s = Session(id=1, max_history_turns=1)
    s.add_turn("q0", "a0")
    s.add_turn("q1", "")  # the answer was cancelled before any text
    assert s.history[0][0] == "user"


def test_output_format_default_is_mulaw_8000() -> None:
    assert Session(id=1).output_format() == ("mulaw", 8000, False)


def test_output_format_session_default_used_when_request_has_none() -> None:
    s = Session(id=1, output_encoding="linear16", output_sample_rate_hz=24000)
    assert s.output_format() == ("linear16", 24000, False)
    assert s.output_format(None, None) == ("linear16", 24000, False)


def test_output_format_request_wins_over_session() -> None:
    s = Session(id=1, output_encoding="linear16", output_sample_rate_hz=24000)
    assert s.output_format("mulaw", 8000) == ("mulaw", 8000, False)
    assert s.output_format("slin16", 16000) == ("linear16", 16000, False)


def test_output_format_request_rate_only_uses_session_encoding() -> None:
    s = Session(id=1, output_encoding="linear16", output_sample_rate_hz=24000)
    assert s.output_format(None, 48000) == ("linear16", 48000, False)
    assert s.output_format(None, 8000) == ("linear16", 8000, False)


@pytest.mark.parametrize("session_enc", [None, "mulaw"])
def test_output_format_rate_only_picks_the_encoding_that_has_it(session_enc: str | None) -> None:
    s = Session(id=1, output_encoding=session_enc)
    assert s.output_format(None, 16000) == ("linear16", 16000, False)
    assert s.output_format(None, 22050) == ("linear16", 22050, False)
    assert s.output_format(None, 8000) == ("mulaw", 8000, False)


def test_output_format_request_encoding_only_uses_its_default_rate() -> None:
    assert Session(id=1).output_format("linear16") == ("linear16", 16000, False)
    assert Session(id=1).output_format("ulaw") == ("mulaw", 8000, False)


def test_output_format_session_encoding_only_uses_its_default_rate() -> None:
    assert Session(id=1, output_encoding="linear16").output_format() == ("linear16", 16000, False)


@pytest.mark.parametrize(
    ("session_enc", "session_rate", "enc", "rate"),
    [
        (None, None, "opus", None),
        (None, None, "linear16", 11025),
        (None, None, "mulaw", 16000),
        ("speex", 8000, None, None),
        ("linear16", 44100, None, None),
        (None, None, None, 11025),  # a rate no encoding supports
    ],
)
def test_output_format_unsupported_falls_back_to_default(
    session_enc: str | None, session_rate: int | None, enc: str | None, rate: int | None
) -> None:
    s = Session(id=1, output_encoding=session_enc, output_sample_rate_hz=session_rate)
    assert s.output_format(enc, rate) == ("mulaw", 8000, True)


def test_reset_history_bumps_epoch() -> None:
    s = Session(id=1, call_id="a")
    s.add_turn("q", "a")
    epoch = s.history_epoch
    s.reset_history()
    assert s.history == [] and s.history_epoch == epoch + 1
    assert s.adopt_call_id("b") and s.history_epoch == epoch + 2


def test_add_turn_from_before_a_reset_is_dropped() -> None:
    s = Session(id=1, call_id="a")
    epoch = s.history_epoch
    s.adopt_call_id("b")  # a new call starts while the old answer is still being generated
    s.add_turn("old question", "old answer", epoch)
    assert s.history == []
    s.add_turn("new question", "new answer", s.history_epoch)
    assert s.history == [("user", "new question"), ("assistant", "new answer")]


# ---------------------------------------------------------------- rollback after a barge-in


def test_rollback_forgets_the_last_exchange_and_marks_the_interruption() -> None:
    s = Session(id=1)
    s.add_turn("q1", "a1")
    s.add_turn("q2", "a2")
    assert s.rollback() and s.history == [("user", "q1"), ("assistant", "a1")]
    prompt = s.messages_for("q3", "be brief")[0][1]
    assert prompt.startswith("be brief") and "interrupted" in prompt
    s.reset_history()
    assert not s.interrupted and not s.rollback() and s.interrupted


def test_rollback_leaves_a_history_that_does_not_end_with_an_answer() -> None:
    s = Session(id=1)
    s.add_turn("q1", "")  # the answer was cut before any text
    assert not s.rollback() and s.history == [("user", "q1")]


def test_an_empty_text_answers_the_context_as_it_stands() -> None:
    s = Session(id=1)
    msgs = s.messages_for("", "sys", (("user", "hours?"), ("user", "(The tool returned: 9 to 5)")))
    assert msgs == [("system", "sys"), ("user", "hours?"), ("user", "(The tool returned: 9 to 5)")]


def test_edit_message_rewrites_or_removes_one_exchange_s_message() -> None:
    s = Session(id=1)
    s.add_turn("q1", "a1", key="r1")
    s.add_turn("q2", "a2", key="r2")
    assert s.edit_message("r1", "assistant", "a1 cut")
    assert s.edit_message("r2", "user", None)
    assert s.history == [("user", "q1"), ("assistant", "a1 cut"), ("assistant", "a2")]
    assert s.history_keys == ["r1", "r1", "r2"]
    # Unknown key, a role the exchange does not hold (any more), no key: nothing changes.
    assert not s.edit_message("r9", "user", "x") and not s.edit_message("r2", "user", "x")
    assert not s.edit_message(None, "user", "x")
    assert s.edit_message("r1", "user", "")  # "" removes, as None does
    assert s.history == [("assistant", "a1 cut"), ("assistant", "a2")]


def test_history_keys_follow_trims_rollbacks_and_resets() -> None:
    s = Session(id=1, max_history_turns=2)
    for i in range(3):
        s.add_turn(f"q{i}", f"a{i}", key=i)
    assert s.history_keys == [1, 1, 2, 2]
    assert s.rollback() and s.history_keys == [1, 1] and s.history == [("user", "q1"), ("assistant", "a1")]
    s.add_turn("q3", "", key=3)
    assert s.history_keys == [1, 1, 3]
    s.reset_history()
    assert s.history_keys == []
    s.history = [("user", "set by hand")]  # no keys for it: edits find nothing, appends stay in step
    s.add_turn("q4", "a4", key=4)
    assert s.history_keys == [None, 4, 4] and not s.edit_message(None, "user", "x")


def test_an_answer_left_first_by_an_edit_stays_until_a_trim() -> None:
    s = Session(id=1, max_history_turns=3)
    s.add_turn("q1", "a1", key=1)
    assert s.edit_message(1, "user", None)
    s.add_turn("q2", "a2", key=2)
    assert s.history == [("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    s.add_turn("q3", "a3", key=3)
    s.add_turn("q4", "a4", key=4)  # a trim: the history opens with a question again
    assert s.history[0] == ("user", "q2") and len(s.history) == 6
