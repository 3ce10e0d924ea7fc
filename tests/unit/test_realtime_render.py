"""The Realtime renderer: ids, the session object, a response's events in order, deltas that join up."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from local_ai_server.audio import alaw_decode, alaw_encode, float32_to_pcm16
from local_ai_server.fronts import realtime_render as R
from local_ai_server.fronts.realtime_parse import Invalid, SessionConfig, TurnDetection

pytestmark = pytest.mark.unit
ABOUT = R.About(session_id="sess_1", model="m", voice="v", transcription_model="whisper")
VAD = R.VadDefaults(0.5, 320, 500)


def test_ids_are_unique_and_prefixed() -> None:
    a, b = R.Ids(), R.Ids()
    ids = [a.new("event") for _ in range(1000)] + [b.new("event") for _ in range(1000)]
    assert len(set(ids)) == 2000 and all(i.startswith("event_") for i in ids)
    assert a.new("resp").startswith("resp_") and a.new("item").startswith("item_")


def test_error_shape() -> None:
    ev = R.invalid(R.Ids(), Invalid("bad threshold", param="session.x", event_id="client_1"))
    assert ev["type"] == "error" and ev["event_id"].startswith("event_")
    assert ev["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": "bad threshold",
                           "param": "session.x", "event_id": "client_1"}


def test_session_object_reports_values_in_effect() -> None:
    s = R.session_object(SessionConfig(turn_detection=TurnDetection(silence_duration_ms=900)), ABOUT, VAD)
    td = s["audio"]["input"]["turn_detection"]
    assert (td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"]) == (0.5, 320, 900)
    assert s["type"] == "realtime" and s["output_modalities"] == ["audio"]
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    manual = R.session_object(SessionConfig(turn_detection=None, output_format="audio/pcma", audio_output=False),
                              ABOUT, VAD)
    assert manual["audio"]["input"]["turn_detection"] is None
    assert manual["audio"]["output"]["format"] == {"type": "audio/pcma", "rate": 8000}
    assert manual["output_modalities"] == ["text"]


@pytest.mark.parametrize("pieces", [[" Hello", " world", ".", "\n"], ["\n\n", "  Hi", " ", " ", "there ", "\n"],
                                    [" ", "\n"], ["a", "b"]])
def test_text_deltas_join_to_the_done_text(pieces: list[str]) -> None:
    d = R.TextDeltas()
    sent = [d.push(p) for p in pieces]
    assert "".join(sent) == d.text == "".join(pieces).strip()


def test_audio_chunks() -> None:
    pcm = float32_to_pcm16(np.sin(np.arange(24000) / 10).astype(np.float32) * 0.5)  # 1 s at 24 kHz
    chunks = R.audio_chunks(pcm, "audio/pcm")
    assert len(chunks) == 1000 // R.DELTA_MS and b"".join(base64.b64decode(c) for c in chunks) == pcm
    pcm8k = pcm[:16000]  # 1 s at 8 kHz
    alaw = b"".join(base64.b64decode(c) for c in R.audio_chunks(pcm8k, "audio/pcma"))
    assert alaw == alaw_encode(pcm8k) and len(alaw) == 8000
    assert len(alaw_decode(alaw)) == len(pcm8k)
    assert len(b"".join(base64.b64decode(c) for c in R.audio_chunks(b"\xff" * 8000, "audio/pcmu"))) == 8000


def response(audio: bool = True) -> R.Response:
    ids = R.Ids()
    return R.Response(ids, ids.new("resp"), ids.new("item"), audio, "audio/pcm")


def test_audio_response_events_in_order() -> None:
    r = response()
    kinds = [e["type"] for e in r.opening("item_prev")]
    assert kinds == ["response.created", "response.output_item.added", "conversation.item.added",
                     "response.content_part.added"]
    deltas = [r.text_delta(t, 1) for t in [" The", " capital", " is Paris.", "\n"]]
    sent = [d for d in deltas if d is not None]
    assert all(d["type"] == "response.output_audio_transcript.delta" and d["response_id"] == r.id for d in sent)
    audio = r.audio_deltas(b"\x00\x01" * 9600)  # 400 ms
    assert [a["type"] for a in audio] == ["response.output_audio.delta"] * 2
    closing = r.closing("completed")
    assert [e["type"] for e in closing] == ["response.output_audio.done", "response.output_audio_transcript.done",
                                            "response.content_part.done", "response.output_item.done",
                                            "conversation.item.done", "response.done"]
    assert closing[1]["transcript"] == "".join(d["delta"] for d in sent) == "The capital is Paris."
    done = closing[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == 4
    assert done["output"][0]["content"][0] == {"type": "output_audio", "transcript": "The capital is Paris."}
    assert done["output"][0]["status"] == "completed" and r.closed


def test_text_cancelled_and_out_of_band_responses() -> None:
    r = response(audio=False)
    r.opening(None)
    assert r.text_delta("Hi", 1) is not None
    closing = r.closing("cancelled", R.cancelled_details("turn_detected"))
    assert [e["type"] for e in closing][0] == "response.output_text.done"
    done = closing[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert done["output"][0]["status"] == "incomplete"
    ids = R.Ids()
    oob = R.Response(ids, ids.new("resp"), ids.new("item"), False, "audio/pcm", out_of_band=True)
    assert "conversation.item.added" not in [e["type"] for e in oob.opening(None)]
    assert "conversation.item.done" not in [e["type"] for e in oob.closing("failed", R.failed_details("busy", "x"))]


def test_every_event_id_is_unique() -> None:
    r = response()
    events = [*r.opening(None), *r.audio_deltas(b"\x00" * 20000), r.text_delta("x", 1), *r.closing("completed")]
    ids = [e["event_id"] for e in events if e is not None]
    assert len(ids) == len(set(ids))


def test_usage_counts_the_engine_s_figures() -> None:
    r = response()
    r.opening(None)
    r.text_delta("Paris.", 2)
    done = r.closing("completed")[-1]["response"]["usage"]
    assert (done["input_tokens"], done["output_tokens"], done["total_tokens"]) == (0, 2, 2)  # none reported
    r = response()
    r.opening(None)
    r.text_delta("Paris.", 2)
    r.usage = {"input_tokens": 120, "cached_tokens": 100, "output_tokens": 3}
    usage = r.closing("completed")[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (120, 3, 123)
    assert usage["input_token_details"]["cached_tokens"] == 100 and usage["input_token_details"]["text_tokens"] == 120
    assert usage["input_token_details"]["cached_tokens_details"]["text_tokens"] == 100
    assert usage["output_token_details"] == {"text_tokens": 3, "audio_tokens": 0}


def test_rate_limits_are_the_server_s_own() -> None:
    ev = R.rate_limits(R.Ids(), 256)
    assert ev["type"] == "rate_limits.updated" and ev["event_id"].startswith("event_")
    assert ev["rate_limits"] == [{"name": "requests", "limit": 1, "remaining": 0, "reset_seconds": 0.0},
                                 {"name": "tokens", "limit": 256, "remaining": 256, "reset_seconds": 0.0}]


def test_a_response_remembers_what_its_audio_said() -> None:
    r = response()
    r.opening(None)
    r.audio_deltas(b"\x00" * 48000, "Hello there.", 1000.0)
    r.audio_deltas(b"\x00" * 960, "", 20.0)
    assert r.spoken == [("Hello there.", 1000.0), ("", 20.0)] and r.audio_ms == 1020.0
