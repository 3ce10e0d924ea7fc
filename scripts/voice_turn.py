#!/usr/bin/env python3
"""Talk to a running local-ai-server once: speak a question, print what it heard and answered, save the audio.

Usage::

    .venv/bin/python scripts/voice_turn.py [--url ws://127.0.0.1:8765] [--text "..."] [--wav question.wav]
                                           [--out answer.wav] [--token TOKEN]

The question is a WAV file (mono 16-bit, any supported rate) or, by default, `--text` spoken by the
installed Piper voice. It is streamed in real time as 20 ms PCM16 frames in `full` mode, as a phone
line would; the answer's audio (linear16, 16 kHz) is written to `--out`. Exit code 0 when an answer
with audio arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import websockets  # noqa: E402

from local_ai_server.audio import float32_to_pcm16, read_wav, resample  # noqa: E402

FRAME_S = 0.02


def question_audio(args: argparse.Namespace) -> np.ndarray:
    """16 kHz float32 speech: the WAV given, or the text spoken by the installed voice."""
    if args.wav:
        audio, rate = read_wav(args.wav)
        return resample(audio, rate, 16000)
    from local_ai_server.engines.tts import PiperTts
    from local_ai_server.setup.selection import default_models_dir, read_selection

    selection = read_selection(default_models_dir())
    if selection is None:
        raise SystemExit("no models installed (run ./install.sh), or pass --wav FILE")
    # Without variation: the same question sounds the same every run, so a check is repeatable.
    tts = PiperTts(selection.path("tts"), threads=1, variation=False)
    return resample(tts.synthesize_all(args.text), tts.sample_rate, 16000)


async def turn(args: argparse.Namespace) -> int:
    """One full-mode turn over the socket."""
    speech = question_audio(args)
    frame = int(16000 * FRAME_S)
    silence = np.zeros(int(16000 * 1.5), dtype=np.float32)
    stream = np.concatenate([np.zeros(frame * 10, dtype=np.float32), speech, silence])
    audio_out: list[bytes] = []
    async with websockets.connect(args.url, max_size=None) as ws:
        if args.token:
            await ws.send(json.dumps({"type": "auth", "auth_token": args.token}))
            print("auth:", json.loads(await ws.recv()).get("status"))
        await ws.send(json.dumps({"type": "set_mode", "mode": "full", "call_id": "voice-turn",
                                  "output_encoding": "linear16", "output_sample_rate_hz": 16000}))

        async def send() -> float:
            start = time.monotonic()
            end_of_speech = 0.0
            for i in range(0, len(stream), frame):
                await ws.send(float32_to_pcm16(stream[i:i + frame]))
                if i + frame >= len(stream) - len(silence) and not end_of_speech:
                    end_of_speech = time.monotonic()
                # Real time: a phone line delivers one frame every 20 ms.
                await asyncio.sleep(max(0.0, start + (i // frame + 1) * FRAME_S - time.monotonic()))
            return end_of_speech

        sender = asyncio.ensure_future(send())
        first_audio = None
        answer = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if isinstance(msg, bytes):
                first_audio = first_audio or time.monotonic()
                audio_out.append(msg)
                continue
            m = json.loads(msg)
            kind = m.get("type")
            if kind == "stt_result" and m.get("is_final"):
                print(f"heard:    {m['text']!r}")
            elif kind == "llm_response":
                answer = m["text"]
                break
            elif kind == "error":
                print(f"error:    {m.get('code')}: {m.get('message')}")
        end_of_speech = await sender
    if answer is None:
        print("no answer arrived", file=sys.stderr)
        return 1
    print(f"answered: {answer!r}")
    if first_audio is not None and end_of_speech:
        print(f"first audio {1000 * (first_audio - end_of_speech):.0f} ms after the end of speech "
              "(the server waits for 500 ms of silence before it decides the caller is done)")
    pcm = b"".join(audio_out)
    with wave.open(str(args.out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    print(f"audio:    {len(pcm) / 32000:.1f} s written to {args.out}")
    return 0 if pcm else 1


def main() -> int:
    """Parse arguments, run one turn."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--text", default="What is the capital of France?")
    p.add_argument("--wav", type=Path, help="a WAV file to send instead of --text")
    p.add_argument("--out", type=Path, default=Path("answer.wav"))
    p.add_argument("--token", help="LOCAL_WS_AUTH_TOKEN of the server, if it has one")
    p.add_argument("--timeout", type=float, default=60.0)
    return asyncio.run(turn(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
