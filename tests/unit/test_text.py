"""Tests for local_ai_server.text: the streaming sentence splitter and clean_for_speech."""

from __future__ import annotations

import random
from typing import Any

import pytest

from local_ai_server.text import SentenceSplitter, clean_for_speech, has_speakable


def split_all(text: str, **kwargs: Any) -> list[str]:
    """Push text in one go, then flush."""
    splitter = SentenceSplitter(**kwargs)
    return splitter.push(text) + splitter.flush()


def split_chunked(text: str, sizes: list[int], **kwargs: Any) -> list[str]:
    """Push text in chunks of the given sizes (cycled), then flush."""
    splitter = SentenceSplitter(**kwargs)
    out: list[str] = []
    pos = 0
    k = 0
    while pos < len(text):
        size = sizes[k % len(sizes)]
        out += splitter.push(text[pos : pos + size])
        pos += size
        k += 1
    return out + splitter.flush()


def random_deltas(text: str, seed: int) -> list[str]:
    """Cut text into 1-3 character deltas, like an LLM token stream."""
    rng = random.Random(seed)
    deltas: list[str] = []
    pos = 0
    while pos < len(text):
        size = rng.randint(1, 3)
        deltas.append(text[pos : pos + size])
        pos += size
    return deltas


PARAGRAPHS = [
    "Hello there. How are you today? I'm doing well! Thanks for asking.",
    (
        "Mr. Smith met Dr. Jones and Prof. Brown on St. Patrick's day. They talked about Bitcoin vs. gold, "
        "stocks, bonds, etc. Then they went home at 5 p.m. The end."
    ),
    "The price rose 3.5 percent. Version 2.0.1 is out! Pi is about 3.14159.",
    'He said "Stop." Then he left. She asked (quietly): "Why?" Nobody answered.',
    "Well... maybe not. Hmm… I think so. Wait... what? Really?! Yes.",
    "J. R. R. Tolkien wrote The Hobbit. The U.S. Army is large. E.g. this one, i.e. that one.",
    "No. It is not possible. See No. 5 in the list.",
    "Here are the steps:\n1. Preheat the oven.\n2. Mix the flour\n3. Bake it\n\nThat's all! Enjoy.",
    "## Summary\n\n**Bold** statement here. *Emphasis* too. Check [the docs](https://example.com/a.b). Done 🎉",
    (
        "This paragraph has no punctuation at all and it just keeps going and going without any end in "
        "sight because the model forgot how to stop talking and nobody told it to use a period so we must "
        "cut it somewhere sensible before the speech synthesizer gets bored waiting for a boundary that "
        "never comes and the caller hangs up"
    ),
    (
        "Sure thing, here is a long answer with clauses; it has commas, semicolons, and colons: all of them "
        "— dashes too — so the first clause can be spoken early. Then a second sentence follows."
    ),
    "Temperatures reach 30°C in July. That's hot! 🔥🔥 Stay cool.\n- Drink water\n- Stay inside",
    "Call 555-1234 now. Or email me at test@example.com. Bye!",
]

CONFIGS: list[dict[str, Any]] = [
    {},
    {"min_chars": 20},
    {"max_chars": 60},
    {"first_clause_chars": 15},
    {"first_clause_chars": 30, "max_chars": 80, "min_chars": 10},
    {"first_clause_chars": 20, "first_clause_words": 4, "clause_tail_words": 2},  # the turn's own
    {"first_clause_chars": 5, "first_clause_words": 2, "clause_tail_words": 1, "max_chars": 50},
    {"clean": False},
    {"clean": False, "max_chars": 40},
]


# ---------------------------------------------------------------------------
# Streaming equivalence and invariants
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("paragraph", PARAGRAPHS, ids=range(len(PARAGRAPHS)))
def test_token_stream_matches_whole_push(paragraph: str, config: dict[str, Any]) -> None:
    whole = split_all(paragraph, **config)
    for seed in range(5):
        splitter = SentenceSplitter(**config)
        streamed: list[str] = []
        for delta in random_deltas(paragraph, seed):
            streamed += splitter.push(delta)
        streamed += splitter.flush()
        assert streamed == whole
    for sizes in ([1], [2], [3], [7], [1, 5, 2]):
        assert split_chunked(paragraph, sizes, **config) == whole


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("paragraph", PARAGRAPHS, ids=range(len(PARAGRAPHS)))
def test_invariants(paragraph: str, config: dict[str, Any]) -> None:
    splitter = SentenceSplitter(**config)
    pushed: list[str] = []
    for delta in random_deltas(paragraph, 1):
        pushed += splitter.push(delta)
    flushed = splitter.flush()
    pieces = pushed + flushed
    assert all(has_speakable(p) for p in pieces)
    assert all(p == p.strip() and p for p in pieces)
    # Something was said, so the answer's last piece (the one marked is_final) exists.
    if pushed:
        assert flushed
    # Nothing is lost or reordered.
    if config.get("clean", True):
        assert " ".join(pieces).split() == clean_for_speech(paragraph).split()
    else:
        assert " ".join(pieces).split() == paragraph.split()
    max_chars = config.get("max_chars", 300)
    assert all(len(p) <= max_chars for p in pieces)


# ---------------------------------------------------------------------------
# Boundaries
# ---------------------------------------------------------------------------


def test_waits_for_the_next_sentence_to_start() -> None:
    s = SentenceSplitter()
    assert s.push("Hello there.") == []
    assert s.push(" ") == []
    assert s.push('"') == []  # an opening quote is not speakable yet
    assert s.push("H") == ["Hello there."]
    assert s.push("i.") == []
    assert s.flush() == ['"Hi.']


def test_first_sentence_emitted_while_generation_continues() -> None:
    s = SentenceSplitter()
    assert s.push("It is sunny today. Tomorrow") == ["It is sunny today."]
    assert s.push(" it will rain. And") == ["Tomorrow it will rain."]
    assert s.flush() == ["And"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two. Three.", ["One.", "Two.", "Three."]),
        ("Really?! Yes!!! OK?", ["Really?!", "Yes!!!", "OK?"]),
        ("Wait… What?", ["Wait…", "What?"]),
        ("Wait... What?", ["Wait...", "What?"]),
        ("Well... maybe later. Fine.", ["Well... maybe later.", "Fine."]),
        ("Well… maybe later.", ["Well… maybe later."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("She left (finally.) Good.", ["She left (finally.)", "Good."]),
        ("“Go!” she said. “Now.” OK.", ["“Go!” she said.", "“Now.”", "OK."]),
        ('"Why?" he asked. Nobody knew.', ['"Why?" he asked.', "Nobody knew."]),
        ("**Done.** Next step.", ["Done.", "Next step."]),
        ("It costs 3.5 dollars. Cheap.", ["It costs 3.5 dollars.", "Cheap."]),
        ("Pi is 3.14159 roughly. Yes.", ["Pi is 3.14159 roughly.", "Yes."]),
        ("I was born in 1990. Then I grew up.", ["I was born in 1990.", "Then I grew up."]),
        ("Visit example.com today. Bye.", ["Visit example.com today.", "Bye."]),
        ("Mr. Smith is here. Mrs. Smith too.", ["Mr. Smith is here.", "Mrs. Smith too."]),
        ("Ask Ms. Lee or Dr. Who. Or Prof. X.", ["Ask Ms. Lee or Dr. Who.", "Or Prof. X."]),
        ("We met on St. Patrick's day. Fun.", ["We met on St. Patrick's day.", "Fun."]),
        ("Cats vs. Dogs is a classic. Sure.", ["Cats vs. Dogs is a classic.", "Sure."]),
        ("Apples, pears, etc. Are fruit.", ["Apples, pears, etc. Are fruit."]),
        ("Fruit, e.g. Apples. Or i.e. Pears.", ["Fruit, e.g. Apples.", "Or i.e. Pears."]),
        ("At 5 a.m. Sharp. Or 6 p.m. Late.", ["At 5 a.m. Sharp.", "Or 6 p.m. Late."]),
        ("Martin Luther King Jr. Was great.", ["Martin Luther King Jr. Was great."]),
        ("The U.S. Army is big. Yes.", ["The U.S. Army is big.", "Yes."]),
        ("See No. 5 please. Thanks.", ["See No. 5 please.", "Thanks."]),
        ("No. It is not. Sorry.", ["No.", "It is not.", "Sorry."]),
        ("J. R. R. Tolkien wrote it. True.", ["J. R. R. Tolkien wrote it.", "True."]),
        ("Written by J.R.R. Tolkien. True.", ["Written by J.R.R. Tolkien.", "True."]),
        ("So did I. Then we left.", ["So did I.", "Then we left."]),
        ("Approx. five people came. Ok.", ["Approx. five people came.", "Ok."]),
        ("Hello . World", ["Hello.", "World"]),
        ("Hi! 😀 Bye.", ["Hi!", "Bye."]),
        ("Hi. 😀", ["Hi."]),
        ("...", []),
        ("", []),
    ],
)
def test_boundaries(text: str, expected: list[str]) -> None:
    assert split_all(text) == expected
    assert split_chunked(text, [1]) == expected


def test_newlines_end_sentences() -> None:
    text = "Here is a list:\n- apples\n- pears\n\nSecond paragraph without a period\n\nThird"
    expected = ["Here is a list:", "apples", "pears", "Second paragraph without a period", "Third"]
    assert split_all(text) == expected
    assert split_chunked(text, [1]) == expected


def test_numbered_list_markers_are_not_sentences() -> None:
    text = "Steps:\n1. Mix the flour.\n2. Add water\n10. Bake it"
    expected = ["Steps:", "Mix the flour.", "Add water", "Bake it"]
    assert split_all(text) == expected
    assert split_all(text, clean=False) == ["Steps:", "1. Mix the flour.", "2. Add water", "10. Bake it"]


def test_heading_and_markdown_are_cleaned() -> None:
    text = "# Title\nSome **bold** and `code` here. A [link](http://x.y/z). Done"
    assert split_all(text) == ["Title", "Some bold and code here.", "A link.", "Done"]


def test_clean_false_keeps_raw_text() -> None:
    assert split_all("Some **bold** text. Next 🎉", clean=False) == ["Some **bold** text.", "Next 🎉"]


# ---------------------------------------------------------------------------
# Length limits
# ---------------------------------------------------------------------------


def test_max_chars_without_punctuation_splits_at_spaces() -> None:
    words = [f"word{i}" for i in range(200)]
    text = " ".join(words)
    pieces = split_all(text, max_chars=100)
    assert len(pieces) > 5
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces).split() == words  # cut only between words
    assert split_chunked(text, [2, 1, 3], max_chars=100) == pieces


def test_max_chars_emits_before_the_answer_ends() -> None:
    s = SentenceSplitter(max_chars=50)
    out: list[str] = []
    for _ in range(30):
        out += s.push("blah ")
    assert out  # speech started long before flush
    assert all(len(p) <= 50 for p in out)


def test_max_chars_prefers_clause_punctuation() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta, iota kappa lambda mu nu xi omicron pi rho sigma"
    pieces = split_all(text, max_chars=60)
    assert pieces[0] == "alpha beta gamma delta epsilon zeta eta theta,"
    assert " ".join(pieces).split() == text.split()


def test_max_chars_hard_cut_for_a_single_long_token() -> None:
    text = "x" * 130 + " end"
    pieces = split_all(text, max_chars=50)
    assert pieces == ["x" * 50, "x" * 50, "x" * 30 + " end"]


def test_natural_boundary_beyond_max_chars_loses_to_forced_cut() -> None:
    text = "a " * 40 + "b. Next."
    pieces = split_all(text, max_chars=30)
    assert all(len(p) <= 30 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_min_chars_merges_short_sentences() -> None:
    assert split_all("Hi. Yes. Okay then, let us begin. Go.", min_chars=10) == [
        "Hi. Yes. Okay then, let us begin.",
        "Go.",
    ]
    assert split_all("- a\n- b\n- c d e f g h", min_chars=5) == ["a b", "c d e f g h"]


def test_first_clause_chars_cuts_only_the_first_piece() -> None:
    text = "Well, that is a really good question, and I have an answer, which is long. Second, part."
    pieces = split_all(text, first_clause_chars=20)
    assert pieces == [
        "Well, that is a really good question,",
        "and I have an answer, which is long.",
        "Second, part.",
    ]
    assert split_chunked(text, [1], first_clause_chars=20) == pieces
    assert split_all(text) == [
        "Well, that is a really good question, and I have an answer, which is long.",
        "Second, part.",
    ]


def test_first_clause_chars_dashes_and_non_clauses() -> None:
    assert split_all("The answer is simple — forty two. Yes.", first_clause_chars=10) == [
        "The answer is simple —",
        "forty two.",
        "Yes.",
    ]
    assert split_all("There were 1,000,000 people here - amazing. Yes.", first_clause_chars=10) == [
        "There were 1,000,000 people here -",
        "amazing.",
        "Yes.",
    ]
    # A hyphen inside a word, a time and a number are not clause boundaries.
    assert split_all("A well-known fact at 10:30 is 1,000 strong. Yes.", first_clause_chars=5) == [
        "A well-known fact at 10:30 is 1,000 strong.",
        "Yes.",
    ]


def test_first_clause_resets_after_flush() -> None:
    s = SentenceSplitter(first_clause_chars=10)
    assert s.push("First answer here,") == []
    assert s.push(" with a clause. ") == ["First answer here,"]
    assert s.push("Go") == ["with a clause."]
    assert s.flush() == ["Go"]
    assert s.push("Second answer here, with a clause. Go") == ["Second answer here,", "with a clause."]


TURN: dict[str, Any] = {"first_clause_chars": 20, "first_clause_words": 4, "clause_tail_words": 2}  # voice/turn.py's


def test_long_first_sentence_is_cut_at_its_first_clause_only() -> None:
    text = "Well, that is a really good question, and I have an answer for you. Second, it is long, as you see it."
    assert split_all(text, **TURN) == [
        "Well, that is a really good question,",  # "Well," alone has too few words
        "and I have an answer for you.",
        "Second, it is long, as you see it.",  # later sentences are spoken whole
    ]


def test_short_sentences_are_spoken_whole() -> None:
    # The tail after the comma is too short: the clause alone would sound choppy.
    assert split_all("The capital of France is Paris, France. It is big.", **TURN) == [
        "The capital of France is Paris, France.", "It is big."]
    # Two words after the comma, the second of which ends the sentence: still whole.
    assert split_all("The weather today is lovely, all day.", **TURN) == ["The weather today is lovely, all day."]
    # Too few words before the comma (though over 20 characters).
    assert split_all("Extraordinarily wonderful, that is what the weather is today.", **TURN) == [
        "Extraordinarily wonderful, that is what the weather is today."]
    # A paragraph break ends the sentence within the tail.
    assert split_all("The weather today is lovely, mostly\nAnd more.", **TURN) == [
        "The weather today is lovely, mostly", "And more."]


def test_a_clause_goes_out_as_soon_as_the_tail_is_long_enough() -> None:
    s = SentenceSplitter(**TURN)
    assert s.push("The weather today is lovely,") == []
    assert s.push(" warm") == []
    assert s.push(" and") == []  # "and" could still be the last word of the sentence
    assert s.push(" sun") == ["The weather today is lovely,"]  # before the sentence's end is generated
    assert s.push("ny. ") == []
    assert s.push("Bye") == ["warm and sunny."]
    assert s.flush() == ["Bye"]


def test_clause_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        SentenceSplitter(first_clause_chars=10, first_clause_words=-1)
    with pytest.raises(ValueError):
        SentenceSplitter(first_clause_chars=10, clause_tail_words=-1)


# ---------------------------------------------------------------------------
# flush / reset
# ---------------------------------------------------------------------------


def test_flush_behaviour() -> None:
    s = SentenceSplitter()
    assert s.flush() == []
    assert s.push("   ") == []
    assert s.flush() == []
    assert s.push("🎉 ✨") == []
    assert s.flush() == []
    assert s.push("Trailing words without a period") == []
    assert s.flush() == ["Trailing words without a period"]
    assert s.flush() == []
    assert s.push("Ends with abbreviation etc.") == []
    assert s.flush() == ["Ends with abbreviation etc."]


def test_flush_splits_pending_sentences() -> None:
    s = SentenceSplitter()
    assert s.push("One. Two.") == ["One."]
    assert s.flush() == ["Two."]


def test_reset_discards_buffer() -> None:
    s = SentenceSplitter()
    s.push("Half a sent")
    s.reset()
    assert s.push("Fresh start. Yes") == ["Fresh start."]
    assert s.flush() == ["Yes"]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        SentenceSplitter(max_chars=0)
    with pytest.raises(ValueError):
        SentenceSplitter(min_chars=-1)


def test_long_stream_stays_fast() -> None:
    s = SentenceSplitter()
    sentence = "This is a sentence with some words in it, and a clause. "
    text = sentence * 400
    out: list[str] = []
    for delta in random_deltas(text, 3):
        out += s.push(delta)
    out += s.flush()
    assert len(out) == 400


# ---------------------------------------------------------------------------
# clean_for_speech / has_speakable
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Hello world", "Hello world"),
        ("**bold** and __also bold__", "bold and also bold"),
        ("*em* and _em_", "em and em"),
        ("a snake_case_name here", "a snake case name here"),
        ("use `pip install x` now", "use pip install x now"),
        ("~~old~~ new", "old new"),
        ("# Heading", "Heading"),
        ("### Sub heading\ntext", "Sub heading text"),
        ("- item one\n- item two", "item one item two"),
        ("* star item\n+ plus item", "star item plus item"),
        ("1. first\n2) second\n10. tenth", "first second tenth"),
        ("> quoted text", "quoted text"),
        ("see [the docs](https://example.com/x_y) now", "see the docs now"),
        ("![a cat](cat.png) sleeps", "a cat sleeps"),
        ("Great job! 🎉🎉", "Great job!"),
        ("I ❤️ Python 🐍", "I Python"),
        ("Thumbs 👍🏽 up", "Thumbs up"),
        ("Family 👨‍👩‍👧 time", "Family time"),
        ("Flag 🇺🇸 here", "Flag here"),
        ("✅ Done", "Done"),
        ("Go → there", "Go there"),
        ("It is 25°C", "It is 25°C"),
        ("Price: $5 or €4, 50%", "Price: $5 or €4, 50%"),
        ("x   y\n\n\tz", "x y z"),
        ("Hello , world !", "Hello, world!"),
        ("---\ntext\n***", "text"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "a b 1 2"),
        ("```python\nprint(1)\n```", "print(1)"),
        ("Café naïve 東京 Привет", "Café naïve 東京 Привет"),
        ("2 + 2 = 4", "2 + 2 = 4"),
        ("🎉🎉🎉", ""),
        ("**", ""),
        ("...", ""),
        ("", ""),
        ("   \n ", ""),
    ],
)
def test_clean_for_speech(raw: str, clean: str) -> None:
    assert clean_for_speech(raw) == clean
    assert clean_for_speech(clean) == clean  # idempotent on its own output


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a", True), ("7", True), ("東", True), ("...", False), ("🎉 !", False), ("", False), ("_", False)],
)
def test_has_speakable(text: str, expected: bool) -> None:
    assert has_speakable(text) is expected


# ---------------------------------------------------------------------------
# Seeded fuzz: random soup of the tricky tokens above
# ---------------------------------------------------------------------------

FUZZ_TOKENS = [
    "Hello", "world", "mr.", "Mr.", "Dr.", "etc.", "e.g.", "U.S.", "No.", "5", "3.5", "J.", "I.", ".", "!",
    "?", "...", "…", "?!", '"', "'", ")", "(", "“", "”", "**", "*", "_", "`", "\n", "\n\n", "- ", "1. ",
    "# ", ",", ";", ":", "—", " - ", "🎉", "x", "ok", "Yes", "yes", "a.m.", " ", "  ", "[l](u)", "東京",
    "café", "-", "10:30", "1,000", "```py\n",
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_fuzz_stream_equivalence_and_final_piece(config: dict[str, Any]) -> None:
    rng = random.Random(1234)
    for _ in range(150):
        text = "".join(rng.choice(FUZZ_TOKENS) + rng.choice(["", " "]) for _ in range(rng.randint(0, 40)))
        whole = split_all(text, **config)
        splitter = SentenceSplitter(**config)
        pushed: list[str] = []
        for delta in random_deltas(text, rng.randint(0, 10**6)):
            pushed += splitter.push(delta)
        flushed = splitter.flush()
        assert pushed + flushed == whole, text
        assert not pushed or flushed, text
        assert all(has_speakable(p) for p in whole), text
        if not config.get("clean", True):
            # Only unspeakable junk may be dropped: every letter and digit survives, in order.
            assert [c for c in "".join(whole) if c.isalnum()] == [c for c in text if c.isalnum()], text


def test_flush_keeps_words_that_cleanup_would_swallow() -> None:
    # The sentence was released because "python" followed; the last piece must not vanish.
    s = SentenceSplitter()
    assert s.push("Here is the code.\n```python") == ["Here is the code."]
    assert s.flush() == ["python"]
    assert split_all("Numbers:\n1.  ") == ["Numbers:", "1."]
