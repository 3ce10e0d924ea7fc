"""A long first sentence is spoken from its first clause on, before the LLM has written the sentence's end.

The real model through the OpenAI Realtime front (text in, audio out) and the `openai` SDK as the client: the
transcript deltas are the answer's tokens as they arrive, so the first audio delta coming before the delta
that completes the first sentence means its synthesis started before the sentence's last token was generated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from local_ai_server.text import SentenceSplitter
from local_ai_server.voice.turn import CLAUSE_TAIL_WORDS, FIRST_CLAUSE_CHARS, FIRST_CLAUSE_WORDS

from .conftest import ServerProc, start_server

pytestmark = pytest.mark.e2e
TIMEOUT = 120
# Greedy decoding (temperature 0): the embedded model repeats this long sentence, commas and all.
INSTRUCTIONS = "Repeat the user's sentence exactly, word for word, and say nothing else."
# A short first clause and a long rest: the clause is spoken while the model still writes the rest (about
# 60 tokens, several times longer to decode than the clause takes to synthesize).
SENTENCE = ("The weather is lovely today, and the warm sun shines on every peak and every valley, on the old stone "
            "bridges and the quiet farms, on the rivers and the lakes and the long roads that wind between the "
            "villages, until the evening comes and the first stars appear over the hills.")


@pytest.fixture(scope="module")
def srv(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    s = start_server(tmp_path_factory.mktemp("clause"), models_dir,
                     env={"LOCAL_LLM_TEMPERATURE": "0", "LOCAL_LLM_REPEAT_PENALTY": "1.0"})
    yield s
    assert s.stop() == 0, s.tail()


def first_sentence(text: str) -> str:
    splitter = SentenceSplitter(clean=False)
    return (splitter.push(text) + splitter.flush())[0]


def first_piece(text: str) -> str:
    splitter = SentenceSplitter(first_clause_chars=FIRST_CLAUSE_CHARS, first_clause_words=FIRST_CLAUSE_WORDS,
                                clause_tail_words=CLAUSE_TAIL_WORDS)
    return (splitter.push(text) + splitter.flush())[0]


async def test_first_audio_comes_before_the_long_first_sentence_is_written(srv: ServerProc) -> None:
    sdk = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{srv.port}/v1",
                      websocket_base_url=f"ws://127.0.0.1:{srv.port}/v1")
    events: list[Any] = []
    async with sdk.realtime.connect(model="local") as conn:
        await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS,
                                           "audio": {"input": {"turn_detection": None}}})
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": SENTENCE}]})
        await conn.response.create()

        async def until_done() -> None:
            async for ev in conn:
                events.append(ev)
                if ev.type == "response.done":
                    return

        await asyncio.wait_for(until_done(), TIMEOUT)
    assert events[-1].response.status == "completed", events[-1]
    text = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
    sentence = first_sentence(text)
    # The answer itself must have a long first sentence, or this test proves nothing: say so, never pass.
    assert text.startswith(sentence) and first_piece(text) != " ".join(sentence.split()), (
        f"the model's answer has no long first sentence to cut: {text!r}")
    written = ""
    for ev in events:
        if ev.type == "response.output_audio.delta":
            break
        if ev.type == "response.output_audio_transcript.delta":
            written += ev.delta
    else:
        raise AssertionError("no audio")
    assert len(written) < len(sentence), f"first audio only after the first sentence was written: {written!r}"
