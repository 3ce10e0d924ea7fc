"""The turn detector (Smart Turn v3.2) on Piper speech: how often it is right, and what a score costs.

Usage::

    .venv/bin/python bench/turn_detector.py [--json] [--threads 1,2] [--repeats 10]

Each question is spoken whole (should score finished) and unfinished two ways (should score
unfinished): the finished recording stopped where a prefix of it ends ("cut"), and the prefix spoken on
its own ("alone", Piper's prosody for a fragment); each is followed by the 200 ms pause at which the
server asks. Prints the probabilities, accuracy at the 0.5 threshold, and the time per score
(p50/p95) for each thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from local_ai_server.audio import resample  # noqa: E402
from local_ai_server.engines.tts import PiperTts  # noqa: E402
from local_ai_server.engines.turn import SmartTurn  # noqa: E402
from local_ai_server.setup.selection import default_models_dir, read_selection  # noqa: E402

PAIRS = (
    ("What time do you open tomorrow morning?", "What time do you"),
    ("What is the weather like in Paris today?", "What is the weather like in"),
    ("Can you book a table for two at seven tonight?", "Can you book a table for"),
    ("I would like to cancel my order from last week.", "I would like to cancel my"),
    ("Please turn off the lights in the kitchen.", "Please turn off the"),
    ("How far is the nearest train station from here?", "How far is the nearest"),
    ("Tell me a joke about computers.", "Tell me a joke about"),
    ("My account number is four five six seven.", "My account number is four"),
)
PAUSE = np.zeros(3200, dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    models = default_models_dir()
    sel = read_selection(models)
    if sel is None:
        print("no models installed: run ./install.sh", file=sys.stderr)
        return 1
    tts = PiperTts(sel.path("tts"), threads=1, variation=False)

    def speak(text: str) -> np.ndarray:
        audio = resample(tts.synthesize_all(text), tts.sample_rate, 16000)
        return audio[: np.nonzero(np.abs(audio) > 0.01)[0][-1] + 1]

    clips: list[tuple[str, bool, np.ndarray]] = []
    for full, prefix in PAIRS:
        whole = speak(full)
        clips.append((full, True, np.concatenate([whole, PAUSE])))
        part = speak(prefix)
        clips.append((prefix + " ... (cut)", False, np.concatenate([whole[: part.size], PAUSE])))
        clips.append((prefix + " ... (alone)", False, np.concatenate([part, PAUSE])))
    out: dict[str, Any] = {"clips": [], "timing": {}}
    path = models / "turn" / "smart-turn-v3.2-cpu.onnx"
    for n, threads in enumerate(int(t) for t in args.threads.split(",")):
        det = SmartTurn(path, threads=threads)
        times = []
        for text, finished, audio in clips:
            p = det.probability(audio)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                det.probability(audio)
                times.append((time.perf_counter() - t0) * 1000)
            if n == 0:
                out["clips"].append({"text": text, "finished": finished, "p": round(p, 3),
                                     "right": (p >= 0.5) == finished})
        times.sort()
        out["timing"][f"threads={threads}"] = {"p50_ms": round(statistics.median(times), 1),
                                               "p95_ms": round(times[int(len(times) * 0.95) - 1], 1)}
    out["accuracy"] = sum(c["right"] for c in out["clips"]) / len(out["clips"])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for c in out["clips"]:
        mark = "ok " if c["right"] else "BAD"
        print(f"{'finished  ' if c['finished'] else 'unfinished'} p={c['p']:.3f} {mark} {c['text']}")
    print(f"accuracy at 0.5: {out['accuracy']:.0%} of {len(out['clips'])}")
    for k, v in out["timing"].items():
        print(f"score time {k}: p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
