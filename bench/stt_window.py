"""What a shorter Whisper window costs in accuracy and buys in time, on the installed STT model.

Usage::

    .venv/bin/python bench/stt_window.py [--json] [--pads full,2,1,0.5] [--threads N]

Whisper encodes a 30 s window whatever the utterance's length; the server encodes an utterance in a
window of its own length plus `LOCAL_STT_PAD_S` of silence instead (engines/stt.py). This transcribes
the same utterances with each window and reports the word error rate and the time per transcript:
24 sentences (questions, requests, numbers, a few long ones), spoken by two voices (Piper's installed
voice at two speeds, and espeak-ng when it is installed), each clean, through a telephone line
(8 kHz mu-law and back) and with noise (white noise at 15 dB SNR).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local_ai_server.threads import thread_env  # noqa: E402

thread_env()  # before any model library loads

import numpy as np  # noqa: E402

from local_ai_server.audio import float32_to_pcm16, mulaw_decode, mulaw_encode, pcm16_to_float32, read_wav, resample  # noqa: E402
from local_ai_server.config import cpu_count, thread_budget  # noqa: E402
from local_ai_server.engines.stt import WhisperStt  # noqa: E402
from local_ai_server.engines.tts import PiperTts  # noqa: E402
from local_ai_server.setup.bench import word_error_rate  # noqa: E402
from local_ai_server.setup.selection import default_models_dir, read_selection  # noqa: E402

SENTENCES = [
    "What time do you open tomorrow?",
    "Can I book a table for two?",
    "Do you have any vegetarian dishes?",
    "Where is the nearest parking?",
    "How much does a large pizza cost?",
    "Are you open on Sunday evening?",
    "Can I pay with a credit card?",
    "Is there a table by the window?",
    "Please check the status of my order.",
    "I would like to change my delivery address.",
    "Can you send me the invoice by email?",
    "I need to cancel my appointment on Friday.",
    "The package arrived damaged yesterday.",
    "I want to speak with a manager please.",
    "Yes.",
    "No, thank you.",
    "Tell me three interesting facts about the city of Paris.",
    "The weather is lovely today, so let us take a long walk in the park.",
    "My flight was delayed and I missed the connection, so I need a new ticket for tomorrow morning.",
    "I ordered a blue jacket in size medium last week, but what arrived was a red one in size large.",
    "Could you please tell me whether the museum is open on public holidays and how much the tickets cost?",
    "We would like to reserve a quiet room for a small family dinner next Saturday, around seven in the "
    "evening, for eight people.",
    "The heating in our apartment stopped working last night and the landlord is not answering the phone.",
    "Hello, I am calling about the letter I received from your office about my insurance renewal.",
]
SNR_DB = 15.0


def espeak(text: str) -> tuple[np.ndarray, int] | None:
    """`text` spoken by espeak-ng (float32 mono, rate), or None when it is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".wav") as fh:
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", fh.name, text], check=True,
                       capture_output=True, timeout=60)
        return read_wav(fh.name)


def slow(tts: PiperTts, text: str) -> np.ndarray:
    """`text` spoken 30% slower by the same voice (Piper's length scale stretches every phoneme)."""
    from piper.config import SynthesisConfig

    chunks = [c.audio_float_array for c in tts._voice.synthesize(text, SynthesisConfig(length_scale=1.3))]
    return np.concatenate(chunks).astype(np.float32)


def conditions(x16: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The utterance clean, through a telephone line, and with noise (16 kHz float32 each)."""
    phone = pcm16_to_float32(mulaw_decode(mulaw_encode(float32_to_pcm16(resample(x16, 16000, 8000)))))
    power = float(np.mean(x16**2)) or 1e-9
    noise = rng.normal(0.0, np.sqrt(power / 10 ** (SNR_DB / 10)), x16.size).astype(np.float32)
    return {"clean": x16, "phone": resample(phone, 8000, 16000), "noise": np.clip(x16 + noise, -1, 1)}


def main(argv: list[str] | None = None) -> int:
    """Synthesize, transcribe with every window, print WER and time per window."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="the last stdout line is one JSON object")
    parser.add_argument("--pads", default="full,2,1,0.5", help="'full' (30 s) and/or seconds of padding")
    parser.add_argument("--threads", type=int, default=thread_budget(cpu_count())[1])
    parser.add_argument("--min-window", type=float, default=4.0, help="shortest window, seconds")
    args = parser.parse_args(argv)
    selection = read_selection(default_models_dir())
    if selection is None:
        parser.error("no models installed: run ./install.sh first")
    pads: list[float | None] = [None if p.strip() == "full" else float(p) for p in args.pads.split(",")]

    print("synthesizing...", file=sys.stderr, flush=True)
    tts = PiperTts(selection.path("tts"), threads=2)
    rng = np.random.default_rng(7)
    samples: list[tuple[str, str, str, np.ndarray]] = []  # (voice, condition, reference, audio)
    for text in SENTENCES:
        voices: dict[str, np.ndarray] = {"piper": resample(tts.synthesize_all(text), tts.sample_rate, 16000)}
        voices["piper-slow"] = resample(slow(tts, text), tts.sample_rate, 16000)
        spoken = espeak(text)
        if spoken is not None:
            voices["espeak"] = resample(spoken[0], spoken[1], 16000)
        for voice, x in voices.items():
            for cond, y in conditions(x.astype(np.float32), rng).items():
                samples.append((voice, cond, text, y))

    stt = WhisperStt(selection.path("stt"), threads=args.threads, pad_s=None)
    stt.min_window_s = args.min_window
    stt.warm_up()
    results: list[dict[str, Any]] = []
    for pad in pads:
        stt.pad_s = pad
        label = "full 30 s" if pad is None else f"+{pad:g} s"
        stt.transcribe(samples[0][3])  # the first call of a new window shape allocates
        per_group: dict[str, list[float]] = {}
        times: list[float] = []
        errors: list[dict[str, str]] = []
        for voice, cond, ref, audio in samples:
            t0 = time.perf_counter()
            text = stt.transcribe(audio).text
            times.append((time.perf_counter() - t0) * 1000)
            wer = word_error_rate(ref, text)
            per_group.setdefault(f"{voice}/{cond}", []).append(wer)
            per_group.setdefault("all", []).append(wer)
            if wer > 0.25:
                errors.append({"voice": voice, "condition": cond, "reference": ref, "heard": text})
        results.append({
            "window": label, "pad_s": pad,
            "wer": {k: round(statistics.mean(v), 4) for k, v in per_group.items()},
            "ms_p50": round(statistics.median(times), 1),
            "ms_p95": round(sorted(times)[int(0.95 * (len(times) - 1))], 1),
            "bad_transcripts": errors,
        })
        print(f"{label}: WER {results[-1]['wer']['all']:.3f}, p50 {results[-1]['ms_p50']} ms", file=sys.stderr,
              flush=True)

    groups = sorted(k for k in results[0]["wer"] if k != "all")
    print(f"model {selection.model('stt').display}, {args.threads} threads, {len(samples)} utterances "
          f"({len(SENTENCES)} sentences x {len(groups) // 3} voices x 3 conditions)")
    print(f"{'window':<11}{'WER all':>9}{'p50 ms':>9}{'p95 ms':>9}  " + "  ".join(groups))
    for r in results:
        print(f"{r['window']:<11}{r['wer']['all']:>9.3f}{r['ms_p50']:>9}{r['ms_p95']:>9}  "
              + "  ".join(f"{r['wer'][g]:>{len(g)}.3f}" for g in groups))
    if args.json:
        print(json.dumps({"model": selection.model("stt").id, "threads": args.threads,
                          "utterances": len(samples), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
