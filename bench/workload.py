"""The benchmark's workload: how much of it (quick or full), what the callers say, the long generation."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



T = TypeVar("T")


FRAME_MS = 20


RATE = 16000


FRAME_SAMPLES = RATE * FRAME_MS // 1000


QUESTIONS = [
    "What time do you open tomorrow?",
    "Can I book a table for two?",
    "Do you have any vegetarian dishes?",
    "Where is the nearest parking?",
    "How much does a large pizza cost?",
    "Are you open on Sunday evening?",
    "Can I pay with a credit card?",
    "Is there a table by the window?",
]


STT_SENTENCES = [
    "Please check the status of my order.",
    "I would like to change my delivery address.",
    "My account number is four five six seven.",
    "Can you send me the invoice by email?",
    "I need to cancel my appointment on Friday.",
    "The package arrived damaged yesterday.",
    "Please call me back after five o'clock.",
    "I want to speak with a manager please.",
]


TTS_SENTENCES = [
    "Your table for two is booked for seven tonight.",
    "One moment please, I am checking that for you.",
    "We open at nine in the morning.",
    "Thank you for calling, have a nice day.",
    "Your order will arrive in about twenty minutes.",
]


# A long generation on demand (as in tests/e2e/test_concurrency.py): SmolLM2 counts for as long as allowed.
LONG_PROMPT = "Repeat the word hello 500 times."


LONG_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


LONG_CONTEXT = [{"role": "system", "content": LONG_SYSTEM}]


LONG_ENV = {"LOCAL_LLM_MAX_TOKENS": "1500", "LOCAL_LLM_CONTEXT": "4096", "LOCAL_LLM_TEMPERATURE": "0",
            "LOCAL_LLM_REPEAT_PENALTY": "1.0",
            # A 1500-token answer on a busy 2-core machine can exceed the default 60 s limit; the benchmark
            # wants whole generations, so the limit is raised (it changes nothing while under 60 s).
            "LOCAL_LLM_INFER_TIMEOUT_SEC": "600"}


BARE_N_CTX = 4096


# A pause before each decode-rate run, so both sides of a pair start from an equally rested machine.
PAIR_REST_S = 1.0


DROPPED = "las_audio_frames_dropped_total"


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure (quick vs full)."""

    quick: bool
    v2fa_turns: int
    turns_per_connection: int
    status_idle_samples: int
    status_llm_samples: int
    idle_connections: int
    stt_samples: int
    tts_samples: int
    reloads: int
    rate_runs: int
    rate_token_cap: int
    stt_sessions: bool
    stt_session_utterances: int


def make_plan(quick: bool, turns: int | None) -> Plan:
    """Sample sizes for a quick (~3 min on 2 cores) or full (< ~15 min) run."""
    if quick:
        return Plan(quick=True, v2fa_turns=max(10, turns or 10), turns_per_connection=4,
                    status_idle_samples=60, status_llm_samples=200, idle_connections=100, stt_samples=3,
                    tts_samples=5, reloads=10,
                    rate_runs=4, rate_token_cap=400, stt_sessions=False, stt_session_utterances=2)
    return Plan(quick=False, v2fa_turns=max(20, turns or 24), turns_per_connection=4, status_idle_samples=100,
                status_llm_samples=400, idle_connections=100, stt_samples=8, tts_samples=12, reloads=20,
                rate_runs=10, rate_token_cap=800, stt_sessions=True, stt_session_utterances=2)
