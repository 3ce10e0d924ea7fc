"""What speaking a long first sentence's first clause alone gains: Piper's time for the clause and for the whole.

For each sentence (long first sentences of the kind the embedded LLM writes), the clause is what the server's
splitter cuts (voice/turn.py's settings). Piper, on the thread budget the server gives it, synthesizes the
clause, the rest and the whole sentence, alternately, `--reps` times each. Printed per sentence: the p50
synthesis time of each, the clause's audio length, and whether that audio covers the synthesis of the rest
(if it does, the caller hears no gap between the two pieces).

    .venv/bin/python bench/first_clause.py [--reps 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stats import pct, progress  # noqa: E402

from local_ai_server.config import cpu_count, thread_budget  # noqa: E402
from local_ai_server.engines.tts import PiperTts  # noqa: E402
from local_ai_server.setup.selection import default_models_dir, read_selection  # noqa: E402
from local_ai_server.text import SentenceSplitter  # noqa: E402
from local_ai_server.voice.turn import CLAUSE_TAIL_WORDS, FIRST_CLAUSE_CHARS, FIRST_CLAUSE_WORDS  # noqa: E402

SENTENCES = [
    "The capital of France is Paris, which is known for its art, food and the Eiffel Tower.",
    "Well, that is a really good question, and the answer depends on where you live.",
    "I am sorry to hear that your order has not arrived yet, but I can check its status for you.",
    "Photosynthesis is the process by which plants make food, using sunlight, water and carbon dioxide.",
    "To reset your password, open the settings page and choose the option called account security.",
]


def cut(sentence: str) -> tuple[str, str]:
    """The first clause as the server's splitter cuts it, and the rest ("" when it is spoken whole)."""
    s = SentenceSplitter(first_clause_chars=FIRST_CLAUSE_CHARS, first_clause_words=FIRST_CLAUSE_WORDS,
                         clause_tail_words=CLAUSE_TAIL_WORDS)
    pieces = s.push(sentence) + s.flush()
    return pieces[0], " ".join(pieces[1:])


def timed(tts: PiperTts, text: str) -> tuple[float, float]:
    """(synthesis ms, audio seconds)."""
    t0 = time.perf_counter()
    audio = tts.synthesize_all(text)
    return (time.perf_counter() - t0) * 1000, audio.size / tts.sample_rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sel = read_selection(default_models_dir())
    if sel is None:
        print("no models installed: run ./install.sh", file=sys.stderr)
        return 2
    threads = thread_budget(cpu_count())[2]
    tts = PiperTts(sel.path("tts"), threads=threads, variation=False)
    tts.warm_up()
    rows: list[dict[str, Any]] = []
    for sentence in SENTENCES:
        clause, rest = cut(sentence)
        times: dict[str, list[float]] = {"clause": [], "rest": [], "whole": []}
        seconds: dict[str, float] = {}
        for _ in range(args.reps):
            for name, text in (("clause", clause), ("whole", sentence), ("rest", rest)):
                if text:
                    ms, secs = timed(tts, text)
                    times[name].append(ms)
                    seconds[name] = secs
        p50 = {k: pct(v, 50) for k, v in times.items()}
        rows.append({"sentence": sentence, "clause": clause, "clause_words": len(clause.split()),
                     "whole_words": len(sentence.split()), "clause_ms": p50["clause"], "whole_ms": p50["whole"],
                     "rest_ms": p50["rest"], "clause_audio_s": seconds.get("clause"),
                     "whole_audio_s": seconds.get("whole"),
                     "clause_covers_rest": bool(rest) and seconds["clause"] * 1000 >= (p50["rest"] or 0.0)})
        progress(f"{clause!r}: {p50['clause']:.0f} ms vs whole {p50['whole']:.0f} ms")
    print(f"Piper ({threads} thread(s)), p50 of {args.reps}; clause = what the splitter cuts first")
    print(f"{'clause words/whole':>18} {'clause ms':>9} {'whole ms':>8} {'saved ms':>8} {'clause audio s':>14} "
          f"{'rest ms':>7} {'no gap':>6}")
    for r in rows:
        saved = (r["whole_ms"] or 0) - (r["clause_ms"] or 0)
        print(f"{r['clause_words']:>8}/{r['whole_words']:<9} {r['clause_ms']:>9.0f} {r['whole_ms']:>8.0f} "
              f"{saved:>8.0f} {r['clause_audio_s']:>14.2f} {r['rest_ms'] or 0:>7.0f} {str(r['clause_covers_rest']):>6}")
    if args.json:
        print(json.dumps({"threads": threads, "reps": args.reps, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
