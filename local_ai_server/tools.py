"""Pure logic for LLM tool calling as AVA uses it: tool declarations, call parsing, decisions, farewells.

Declarations are tool_decl's, the model's calls and decisions tool_calls', what the model is shown
tool_prompts'; all are importable from here. The end-of-call logic (farewells) is this module's own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .tool_calls import parse_decision, parse_tool_calls
from .tool_decl import (
    MAX_DESCRIPTION_CHARS,
    MAX_SCAN_CHARS,
    MAX_TOOL_SCHEMA_BYTES,
    MAX_TOOLS,
    MAX_TOOLS_BYTES,
    POLICIES,
    Tool,
    ToolCall,
    ToolError,
    allowed,
    normalize_policy,
    parse_names,
    parse_tools,
)
from .tool_prompts import (
    MAX_ANSWER_CHARS,
    MAX_RESULT_CHARS,
    MAX_SIMPLE_PROPERTIES,
    decision_prompt,
    decision_schema,
    tool_result_prompt,
)

__all__ = [
    "DEFAULT_FAREWELL", "MAX_ANSWER_CHARS", "MAX_DESCRIPTION_CHARS", "MAX_FAREWELL_CHARS", "MAX_RESULT_CHARS",
    "MAX_SCAN_CHARS", "MAX_SIMPLE_PROPERTIES", "MAX_TOOLS", "MAX_TOOLS_BYTES", "MAX_TOOL_SCHEMA_BYTES", "POLICIES",
    "Tool", "ToolCall", "ToolError", "allowed", "decision_prompt", "decision_schema", "end_of_call_intent",
    "farewell_from_result", "first_sentence", "normalize_policy", "parse_decision", "parse_names",
    "parse_tool_calls", "parse_tools", "tool_result_prompt",
]

# ---------------------------------------------------------------------------------------------- end of call

DEFAULT_FAREWELL = "Thank you for calling. Goodbye."
MAX_FAREWELL_CHARS = 500
_END_PHRASES = re.compile(
    r"\b(?:(?P<strong>hang\s*up|end\s+(?:the\s+)?call)"
    r"|no\s+thanks|thank\s+you|thanks|that'?s\s+all|that\s+is\s+all|nothing\s+else|good\s*bye|bye"
    r"|have\s+a\s+(?:good|great|nice)\s+day|take\s+care|talk\s+to\s+you\s+later|no\s+transcript)\b"
)
_CLAUSE_END = re.compile(r"[.,;:!?\n]")
_WORD = re.compile(r"[a-z']+")
_NEGATIONS = frozenset({"not", "never", "cannot", "dont", "cant", "wont", "didnt", "doesnt", "shouldnt", "without"})
# A word that makes the phrase after it a mention, not a farewell: "how do I say bye", "the word goodbye".
_MENTIONS = frozenset({"say", "says", "said", "saying", "word", "words", "phrase", "spell", "spelled", "translate",
                       "called"})
_NEGATION_WINDOW = 3  # words before the phrase, within its clause: "I do not want to hang up"
_WINDOW_CHARS = 64


def _negated(words: Sequence[str]) -> bool:
    """Whether any of these words negates what follows it."""
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def end_of_call_intent(user_text: str) -> bool:
    """Whether the caller's words end the call ("thanks, bye"); negated or quoted uses do not."""
    if not isinstance(user_text, str):
        return False
    # Curly quotes as STT and keyboards write them; the apostrophe of "don’t" is the same character as ’.
    text = user_text[:MAX_SCAN_CHARS].lower().replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    for m in _END_PHRASES.finditer(text):
        # The few words before the phrase, within its clause ("I can't hear you, goodbye" is a farewell).
        # A bounded window: "say bye say bye ..." must not cost a scan of the whole text per phrase.
        window = _CLAUSE_END.split(text[max(0, m.start() - _WINDOW_CHARS):m.start()])[-1]
        before = _WORD.findall(window)[-_NEGATION_WINDOW:]
        if _negated(before):
            continue
        if m.group("strong"):
            return True  # asking to hang up is terminal even as a question ("can you hang up?")
        if before and before[-1] in _MENTIONS:
            continue
        quote_before = m.start() > 0 and text[m.start() - 1] in "\"'"
        quote_after = m.end() < len(text) and text[m.end()] in "\"'"
        if quote_before and quote_after:
            continue
        after = _WORD.findall(text, m.end(), min(len(text), m.end() + 16))
        if after and after[0] in ("mean", "means", "meaning"):
            continue
        return True
    return False


def first_sentence(text: str, default: str = DEFAULT_FAREWELL) -> str:
    """The first speakable sentence of a text (capped), or `default` when it has none."""
    if not isinstance(text, str):
        return default
    clean = " ".join(text[:MAX_SCAN_CHARS].split())
    for part in re.split(r"(?<=[.!?]) ", clean):
        if re.search(r"[^\W_]", part):
            return part[:MAX_FAREWELL_CHARS].rstrip()
    return default


def farewell_from_result(result: Any) -> str:
    """The farewell a hangup tool's result asks for (`farewell_message` or `message`), else the default."""
    if isinstance(result, dict):
        for key in ("farewell_message", "message"):
            value = result.get(key)
            if isinstance(value, str):
                clean = " ".join(value.split())
                if clean:
                    return clean[:MAX_FAREWELL_CHARS].rstrip()
    return DEFAULT_FAREWELL

