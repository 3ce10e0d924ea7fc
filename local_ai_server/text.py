"""Text helpers for speech: a streaming sentence splitter for LLM output and markdown/emoji cleanup for TTS."""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Final

__all__ = ["SentenceSplitter", "clean_for_speech", "has_speakable"]

# A letter or digit in any script (\w without the underscore).
_ALNUM: Final[re.Pattern[str]] = re.compile(r"[^\W_]")


def has_speakable(text: str) -> bool:
    """Tell whether text holds anything a TTS voice can say (a letter or a digit)."""
    return _ALNUM.search(text) is not None


# ---------------------------------------------------------------------------
# clean_for_speech
# ---------------------------------------------------------------------------

_CODE_FENCE = re.compile(r"^[ \t]*(?:```|~~~)[^\n]*$", re.MULTILINE)
_HRULE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.MULTILINE)
_TABLE_RULE = re.compile(r"^[ \t]*\|?(?:[ \t]*:?-{3,}:?[ \t]*\|)+(?:[ \t]*:?-{3,}:?[ \t]*)?$", re.MULTILINE)
_HEADING = re.compile(r"^[ \t]*#{1,6}(?:[ \t]+|$)", re.MULTILINE)
_BLOCKQUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.MULTILINE)
# A list marker is only dropped when words follow it on its line, so "1." alone stays speakable.
_BULLET = re.compile(
    r"^[ \t]*(?:[-*+\u2022\u25aa\u25e6\u2023\u2043]|\d{1,3}[.)])[ \t]+(?=[^\n]*[^\W_])", re.MULTILINE
)
# Spans are bounded and never cross lines, so unbalanced markers cannot make matching quadratic.
_IMAGE = re.compile(r"!\[([^\]\n]{0,300})\]\([^)\s]{0,500}\)")
_LINK = re.compile(r"\[([^\]\n]{0,300})\]\([^)\s]{0,500}\)")
_BOLD = re.compile(r"(\*\*|__)(?=\S)([^\n]{1,300}?)(?<=\S)\1")
_EM_STAR = re.compile(r"\*(?=[^\s*])([^\n]{1,300}?)(?<=[^\s*])\*")
# Underscore emphasis only at word edges, so snake_case identifiers are left to the fallback below.
_EM_UNDER = re.compile(r"(?<!\w)_(?=[^\s_])([^\n]{1,300}?)(?<=[^\s_])_(?!\w)")
_STRIKE = re.compile(r"~~(?=\S)([^\n]{1,300}?)(?<=\S)~~")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:\u2026])")

# Symbols kept although their Unicode category is "other symbol": voices say them.
_KEEP_SYMBOLS: Final[frozenset[str]] = frozenset("°")
# Joiners that shape scripts (ZWNJ in Persian) must survive; other format chars go.
_KEEP_FORMAT: Final[frozenset[str]] = frozenset("\u200c")


@functools.lru_cache(maxsize=4096)
def _char_replacement(ch: str) -> str:
    """Map one character to what TTS should see: itself, a space, or nothing."""
    if ch.isspace():
        return ch
    if ch in "*`|\u2022\u00b7":
        # Leftover markdown markers and bullets/middots carry no words; a space keeps words apart.
        return " "
    if ch == "_":
        return " "
    code = ord(ch)
    if 0x2190 <= code <= 0x21FF or 0x27F0 <= code <= 0x27FF or 0x2900 <= code <= 0x297F:
        return " "  # arrows: voices read them as "rightwards arrow" at best
    if 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF:
        return ""  # emoji variation selectors
    category = unicodedata.category(ch)
    if category == "Cc":
        return " "
    if category == "Cf":
        return ch if ch in _KEEP_FORMAT else ""
    if category in ("So", "Sk", "Cs", "Co", "Cn", "Me"):
        return ch if ch in _KEEP_SYMBOLS else ""
    return ch


def _strip_symbols(text: str) -> str:
    """Drop emoji and other symbols a TTS voice cannot pronounce."""
    if text.isascii() and text.isprintable():
        # Fast path for the common case: only the markdown leftovers need mapping.
        return text.translate(_ASCII_MARKERS)
    return "".join(_char_replacement(ch) for ch in text)


_ASCII_MARKERS: Final[dict[int, str]] = {ord(c): " " for c in "*`|_"}


def clean_for_speech(text: str) -> str:
    """Strip markdown, emoji and unspeakable symbols and collapse whitespace; "" if nothing is speakable."""
    if not text:
        return ""
    out = _CODE_FENCE.sub("", text)
    out = _HRULE.sub("", out)
    out = _TABLE_RULE.sub("", out)
    out = _HEADING.sub("", out)
    out = _BLOCKQUOTE.sub("", out)
    out = _BULLET.sub("", out)
    out = _IMAGE.sub(r"\1", out)
    out = _LINK.sub(r"\1", out)
    out = _BOLD.sub(r"\2", out)
    out = _EM_STAR.sub(r"\1", out)
    out = _EM_UNDER.sub(r"\1", out)
    out = _STRIKE.sub(r"\1", out)
    out = _strip_symbols(out)
    out = " ".join(out.split())
    out = _SPACE_BEFORE_PUNCT.sub(r"\1", out)
    return out if has_speakable(out) else ""


# ---------------------------------------------------------------------------
# SentenceSplitter
# ---------------------------------------------------------------------------

_TERMINATORS: Final[str] = ".!?\u2026"
# Closing quotes/brackets (and markdown emphasis) that belong to the sentence they follow.
_CLOSERS: Final[str] = "\"'\u201d\u2019\u00bb\u203a)]}*_`"
_OPENERS: Final[str] = "\"'\u201c\u2018\u00ab\u2039([{*_`"
_CLAUSE_MARKS: Final[str] = ",;:"
_DASHES: Final[str] = "\u2014\u2013"  # em and en dash

# Compared lower-case and without the final period; dotted forms keep their inner dots.
_ABBREVIATIONS: Final[frozenset[str]] = frozenset(
    {
        "mr", "mrs", "ms", "mx", "dr", "prof", "rev", "hon", "st", "mt", "ft", "vs", "etc", "cf", "al",
        "approx", "jr", "sr", "gen", "col", "lt", "sgt", "capt", "e.g", "i.e", "a.m", "p.m", "u.s",
    }
)  # fmt: skip
# Abbreviations only when a number follows ("No. 5", but "No. It is not." ends a sentence).
_NUMBER_ABBREVIATIONS: Final[frozenset[str]] = frozenset({"no", "nos", "nr", "vol", "pp", "fig"})
_DOTTED_INITIALS: Final[re.Pattern[str]] = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_LIST_NUMBER: Final[re.Pattern[str]] = re.compile(r"\d{1,3}\.")
# A word with its punctuation, and the space after it.
_TOKEN: Final[re.Pattern[str]] = re.compile(r"(\S+)(\s*)")

# Outcome of looking at one candidate boundary.
_NO: Final[int] = 0
_YES: Final[int] = 1
_WAIT: Final[int] = 2


class SentenceSplitter:
    """Cut streamed LLM text into speakable sentences as soon as each one is known to be complete."""

    def __init__(
        self,
        min_chars: int = 0,
        max_chars: int = 300,
        first_clause_chars: int | None = None,
        clean: bool = True,
        *,
        first_clause_words: int = 0,
        clause_tail_words: int = 0,
    ) -> None:
        """Configure the splitter; with clean=True every piece goes through clean_for_speech.

        With `first_clause_chars` set, the first piece may end at a clause mark (comma, semicolon, colon,
        dash) once it holds that many characters and `first_clause_words` words, if the sentence goes on
        for more than `clause_tail_words` words after the mark: a short sentence is spoken whole.
        """
        if max_chars < 1:
            raise ValueError("max_chars must be positive")
        if min_chars < 0 or first_clause_words < 0 or clause_tail_words < 0:
            raise ValueError("min_chars, first_clause_words and clause_tail_words must not be negative")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.first_clause_chars = first_clause_chars
        self.first_clause_words = first_clause_words
        self.clause_tail_words = clause_tail_words
        self.clean = clean
        self._buf = ""
        # Everything before this index has been judged "not a boundary" for the current
        # buffer; those verdicts never change, so streaming stays linear.
        self._scan = 0
        self._emitted = False

    def push(self, delta: str) -> list[str]:
        """Add a chunk of LLM output; return the sentences that are now complete, in order."""
        if delta:
            self._buf += delta
            if self._scan == 0:
                # Leading whitespace of a sentence is never spoken and would skew lengths.
                self._buf = self._buf.lstrip()
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End the answer: return the remaining sentences (if speakable) and reset for the next one."""
        out = self._drain(final=True)
        rest = self._render(self._buf)
        if not rest and has_speakable(self._buf):
            # Every emitted piece was released only because a letter or digit followed it,
            # so the remainder must yield a last piece even where markdown cleanup would
            # swallow it (an unclosed "```python" fence): keep the words, drop the symbols.
            rest = " ".join(_strip_symbols(self._buf).split())
        if rest:
            out.append(rest)
        self.reset()
        return out

    def reset(self) -> None:
        """Forget any buffered text, e.g. after barge-in."""
        self._buf = ""
        self._scan = 0
        self._emitted = False

    # -- internals -----------------------------------------------------------

    def _render(self, piece: str) -> str:
        """Turn a raw piece into the text handed to TTS ("" if unspeakable)."""
        if self.clean:
            return clean_for_speech(piece)
        text = " ".join(piece.split())
        return text if has_speakable(text) else ""

    def _drain(self, final: bool) -> list[str]:
        """Emit every piece the buffer can be cut into right now."""
        out: list[str] = []
        while True:
            cut = self._find_cut(final)
            if cut is None:
                return out
            piece = self._render(self._buf[:cut])
            self._buf = self._buf[cut:].lstrip()
            self._scan = 0
            if piece:
                out.append(piece)
                self._emitted = True

    def _find_cut(self, final: bool) -> int | None:
        """Return where to cut the buffer, or None to wait for more text (or, if final, keep the rest)."""
        buf = self._buf
        n = len(buf)
        i = self._scan
        while i < n:
            ch = buf[i]
            if ch in _TERMINATORS:
                j = i
                while j < n and buf[j] in _TERMINATORS:
                    j += 1
                k = j
                while k < n and buf[k] in _CLOSERS:
                    k += 1
                if k >= n and not final:
                    # The run or its closing quotes may go on: undecidable until more text.
                    if n > self.max_chars:
                        break
                    self._scan = i
                    return None
                end, verdict, next_i = k, self._judge_terminal(buf, i, j, k, final), k
            elif ch == "\n":
                end, verdict, next_i = i, self._judge_break(buf, i, final), i + 1
            elif self._clause_armed() and self._is_clause_mark(buf, i):
                end, verdict, next_i = i + 1, self._judge_clause(buf, i, final), i + 1
            else:
                i += 1
                continue
            if end > self.max_chars:
                # Too late: the forced cut inside the first max_chars wins.
                break
            if verdict == _YES:
                return end
            if verdict == _WAIT:
                self._scan = i
                return None
            i = next_i
        else:
            self._scan = n
        if n > self.max_chars:
            self._scan = min(i, n)
            return self._forced_cut()
        return None

    @staticmethod
    def _successor(buf: str, start: int, final: bool) -> int | None:
        """Index of the first letter/digit at or after start; -1 if none and final, None if not yet known."""
        m = _ALNUM.search(buf, start)
        if m is not None:
            return m.start()
        return -1 if final else None

    def _piece_ok(self, piece: str) -> bool:
        """Tell whether a candidate piece is long and speakable enough to stand alone."""
        stripped = piece.strip()
        return len(stripped) >= self.min_chars and bool(self._render(stripped))

    def _judge_terminal(self, buf: str, i: int, j: int, k: int, final: bool) -> int:
        """Judge a terminator run buf[i:j] with closers buf[j:k] as a sentence end."""
        if k < len(buf) and not buf[k].isspace():
            return _NO  # "3.5", "e.g.,", "example.com", "?!x"
        nxt = self._successor(buf, k, final)
        if nxt is None:
            return _WAIT
        if nxt < 0:
            return _NO  # nothing speakable follows: the flush speaks it all together
        follower = buf[nxt]
        if follower.islower():
            return _NO  # "Well... maybe", 'he asked "why?" and left', "approx. five"
        if buf[i:j] == ".":
            token = self._word_before(buf, i)
            lowered = token.lower()
            if lowered in _ABBREVIATIONS or _DOTTED_INITIALS.fullmatch(token):
                return _NO
            if lowered in _NUMBER_ABBREVIATIONS and follower.isdigit():
                return _NO
            if len(token) == 1 and token.isupper() and token != "I":
                return _NO  # an initial, as in "J. R. R. Tolkien"; "I" is the pronoun
            if _LIST_NUMBER.fullmatch(buf[:k].rsplit("\n", 1)[-1].strip()):
                return _NO  # "1. Buy milk": the number is a list marker, not a sentence
        return _YES if self._piece_ok(buf[:k]) else _NO

    def _judge_break(self, buf: str, i: int, final: bool) -> int:
        """Judge a line break at buf[i] as a sentence end (paragraphs, list items, headings)."""
        nxt = self._successor(buf, i + 1, final)
        if nxt is None:
            return _WAIT
        if nxt < 0:
            return _NO
        return _YES if self._piece_ok(buf[:i]) else _NO

    def _clause_armed(self) -> bool:
        """Tell whether the first piece may still be cut at a clause boundary."""
        return self.first_clause_chars is not None and not self._emitted

    @staticmethod
    def _is_clause_mark(buf: str, i: int) -> bool:
        """Tell whether buf[i] is a comma/semicolon/colon or a dash used as punctuation."""
        ch = buf[i]
        if ch in _CLAUSE_MARKS or ch in _DASHES:
            return True
        # A hyphen counts only as a spaced dash (" - "), never inside "well-known".
        return ch == "-" and i > 0 and buf[i - 1].isspace()

    def _judge_clause(self, buf: str, i: int, final: bool) -> int:
        """Judge a clause mark at buf[i] as the end of a low-latency first piece."""
        assert self.first_clause_chars is not None
        head = buf[: i + 1]
        if len(head.strip()) < self.first_clause_chars or _word_count(head) < self.first_clause_words:
            return _NO
        if i + 1 >= len(buf):
            return _NO if final else _WAIT
        if buf[i] not in _DASHES and not buf[i + 1].isspace():
            return _NO  # "1,000", "10:30", "x-ray"
        nxt = self._successor(buf, i + 1, final)
        if nxt is None:
            return _WAIT
        if nxt < 0:
            return _NO
        return self._judge_tail(buf, i + 1, final) if self._piece_ok(head) else _NO

    def _judge_tail(self, buf: str, start: int, final: bool) -> int:
        """Whether the sentence goes on for more than clause_tail_words words after a clause mark.

        A clause spoken alone ends with a pause and a fall of the voice: before a short tail ("Paris,
        France.") that sounds choppy, and the tail alone is too short to be worth it. So the clause is cut
        only once that many words have followed it without the sentence (or the paragraph) ending.
        """
        words = 0
        for m in _TOKEN.finditer(buf, start):
            if words >= self.clause_tail_words:
                return _YES
            if m.end(1) - start > self.max_chars:
                return _NO  # a runaway "word" (a long URL): no waiting for its end
            if m.end() >= len(buf) and not final:
                return _WAIT  # the word, or the space after it (a line break?), may go on
            token, gap = m.group(1).rstrip(_CLOSERS), m.group(2)
            if token.endswith(tuple(_TERMINATORS)) or "\n" in gap:
                return _NO  # the sentence ends within the tail: spoken whole
            words += 1 if _ALNUM.search(token) else 0
        return _YES if words >= self.clause_tail_words else _NO

    @staticmethod
    def _word_before(buf: str, i: int) -> str:
        """Return the word ending just before buf[i], without opening quotes/brackets."""
        start = i
        while start > 0 and not buf[start - 1].isspace():
            start -= 1
        return buf[start:i].lstrip(_OPENERS)

    def _forced_cut(self) -> int | None:
        """Cut a runaway sentence inside its first max_chars chars (clause mark, else space, else hard)."""
        buf = self._buf
        limit = self.max_chars
        cut: int | None = None
        # Prefer a clause boundary, but not one so early that it leaves a fragment.
        for p in range(limit - 1, limit // 2 - 1, -1):
            if (buf[p] in _CLAUSE_MARKS or buf[p] in _DASHES) and buf[p + 1].isspace():
                cut = p + 1
                break
        if cut is None:
            space = max((p for p in range(1, limit + 1) if buf[p].isspace()), default=None)
            cut = space if space is not None else limit
        # An unspeakable head (a run of emoji, say) is simply dropped by _drain; only the
        # successor must be speakable so the caller's last piece is never empty.
        return cut if has_speakable(buf[cut:]) else None


def _word_count(text: str) -> int:
    """Words in text: runs of non-space characters holding a letter or digit."""
    return sum(1 for token in text.split() if _ALNUM.search(token))
