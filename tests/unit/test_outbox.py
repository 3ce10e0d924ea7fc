"""The per-connection writer: control overtakes data, cancelled turns are dropped, the queue is bounded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from local_ai_server.outbox import ConnectionOutbox
from local_ai_server.tasks import TaskOwner
from local_ai_server.voice.turn import Turn


class FakeWs:
    """Records frames; `gate` blocks sending like a client that stopped reading."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed: tuple[int, str] | None = None
        self.transport: Any = None

    async def send(self, frame: Any) -> None:
        await self.gate.wait()
        self.frames.append(json.loads(frame) if isinstance(frame, str) else frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


async def _drain(ws: FakeWs, n: int) -> None:
    for _ in range(200):
        if len(ws.frames) >= n:
            return
        await asyncio.sleep(0.005)


async def test_control_overtakes_queued_data_and_pairs_stay_together() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=100, owner=TaskOwner("test"))
    turn = Turn(id=1, kind="voice", request_id=None)
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    out.send_data({"type": "stt_result"})
    await asyncio.sleep(0.01)  # the writer is now blocked sending stt_result
    out.send_audio({"type": "tts_audio"}, b"\x01\x02", turn)
    out.send_control({"type": "status_response"})
    ws.gate.set()
    await _drain(ws, 4)
    kinds = [f["type"] if isinstance(f, dict) else "binary" for f in ws.frames]
    assert kinds == ["stt_result", "status_response", "tts_audio", "binary"]
    writer.cancel()


async def test_cancelled_turn_data_is_dropped_unsent() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=100, owner=TaskOwner("test"))
    turn = Turn(id=1, kind="voice", request_id=None)
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    out.send_data({"type": "first"})
    await asyncio.sleep(0.01)
    out.send_audio({"type": "tts_audio"}, b"\x00\x00", turn)
    out.send_data({"type": "llm_response"}, turn)
    turn.cancelled = True  # barge-in happens while the frames wait in the queue
    out.send_control({"type": "barge_in_ack"})
    ws.gate.set()
    await _drain(ws, 2)
    await asyncio.sleep(0.02)
    assert [f["type"] for f in ws.frames] == ["first", "barge_in_ack"]
    writer.cancel()


async def test_a_client_that_stops_reading_is_closed_1008_and_memory_stays_bounded() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=16, owner=TaskOwner("test"))
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    for i in range(1000):
        out.send_data({"type": "llm_token", "i": i})
    await asyncio.sleep(0.01)
    assert len(out._data) <= 16
    assert ws.closed is not None and ws.closed[0] == 1008
    writer.cancel()


async def test_control_replies_count_too_a_client_that_only_asks_status_is_closed() -> None:
    """Control replies overtake data but are bounded like it (before: unbounded, 120x what was sent)."""
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=16, owner=TaskOwner("test"))
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    for i in range(1000):
        out.send_control({"type": "status_response", "i": i, "pad": "x" * 1000})
    await asyncio.sleep(0.01)
    assert len(out) <= 16 and len(out._control) <= 16
    assert ws.closed is not None and ws.closed[0] == 1008
    writer.cancel()


async def test_bytes_are_bounded_whatever_the_item_count() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=10_000, owner=TaskOwner("test"), max_bytes=1_000_000)
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    turn = Turn(id=1, kind="voice", request_id=None)
    for _ in range(100):
        out.send_audio({"type": "tts_audio"}, b"\x00" * 100_000, turn)
        assert out.queued_bytes <= 1_000_000
    await asyncio.sleep(0.01)
    assert ws.closed is not None and ws.closed[0] == 1008
    writer.cancel()


async def test_one_message_bigger_than_the_budget_still_goes_out() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=16, owner=TaskOwner("test"), max_bytes=100_000)
    writer = asyncio.ensure_future(out.run())
    out.send_data({"type": "tts_response", "audio_data": "A" * 500_000})
    await _drain(ws, 1)
    assert ws.closed is None and ws.frames[0]["type"] == "tts_response"
    assert out.queued_bytes == 0
    writer.cancel()


async def test_a_barge_in_drops_queued_speech_of_finished_answers_but_keeps_owed_replies() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=100, owner=TaskOwner("test"))
    voice = Turn(id=1, kind="voice", request_id=None)
    tool = Turn(id=2, kind="tool_result", request_id="t")
    tts = Turn(id=3, kind="tts_request", request_id="s")
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    out.send_data({"type": "first"})
    await asyncio.sleep(0.01)  # blocked: the client is slow to read
    out.send_audio({"type": "tts_audio"}, b"\x01" * 10, voice)
    out.send_data({"type": "llm_response", "of": "voice"}, voice)
    out.send_audio({"type": "tts_audio"}, b"\x02" * 10, tool)
    out.send_data({"type": "llm_response", "of": "tool"}, tool)
    out.send_data({"type": "tts_response"}, tts)
    assert out.discard_speech() == 3
    ws.gate.set()
    await _drain(ws, 3)
    await asyncio.sleep(0.02)
    assert [(f["type"], f.get("of")) for f in ws.frames] == [("first", None), ("llm_response", "tool"),
                                                            ("tts_response", None)]
    assert out.queued_bytes == 0
    writer.cancel()


async def test_idle_only_once_the_last_message_has_been_handed_to_the_connection() -> None:
    ws = FakeWs()
    out = ConnectionOutbox(ws, max_items=100, owner=TaskOwner("test"))
    assert out.idle
    ws.gate.clear()
    writer = asyncio.ensure_future(out.run())
    out.send_data({"type": "llm_response"})
    assert not out.idle  # queued
    await asyncio.sleep(0.01)
    assert not out.idle and len(out) == 0  # taken off the queue, but its send has not completed
    ws.gate.set()
    await _drain(ws, 1)
    await asyncio.sleep(0)
    assert out.idle  # a close frame now follows everything that was sent
    writer.cancel()
