"""The drain on SIGTERM: when each connection is closed, with fake connections and a fake clock; and the call
core's "between turns" (the hook every front builds on) on fake engines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from local_ai_server.config import ConfigError, from_env, validate
from local_ai_server.drain import Drain, DrainPolicy, StopRequests
from local_ai_server.tools import Tool
from local_ai_server.voice.events import Answer, ToolCalls

from .test_voice_call import BOUND_S, Rig, tone

TICK = 0.1  # fake seconds per drain tick


class FakeConn:
    """A connection that is busy until a fake time, records when it was closed, and leaves when told to go."""

    def __init__(self, name: str, live: set[FakeConn], clock: Callable[[], float], *, busy_until: float = 0.0,
                 leaves: bool = True, hook_fails: bool = False) -> None:
        self.kind = name
        self.live, self.clock = live, clock
        self.busy_until, self.leaves, self.hook_fails = busy_until, leaves, hook_fails
        self.closed_at: float | None = None
        self.asked_after_close = 0
        live.add(self)

    def between_turns(self) -> bool:
        if self.closed_at is not None:
            self.asked_after_close += 1
        if self.hook_fails:
            raise RuntimeError("a bug in a front's hook")
        return self.clock() >= self.busy_until

    async def go_away(self) -> None:
        self.closed_at = self.clock()
        await asyncio.sleep(0)
        if self.leaves:
            self.live.discard(self)  # as a connection's handler ends once its close handshake is done


class Rigged:
    """A drain on a fake clock that moves one tick per drain tick."""

    def __init__(self, notice_s: float = 0.5, timeout_s: float = 3.0, grace_s: float = 1.0) -> None:
        self.now = 0.0
        self.live: set[FakeConn] = set()
        self.stop_now = asyncio.Event()
        self.drain = Drain(DrainPolicy(notice_s, timeout_s), lambda: list(self.live), self.stop_now,
                           tick_s=0.0, close_grace_s=grace_s, clock=lambda: self.now)
        self.ticks = 0

        async def tick() -> None:
            await asyncio.sleep(0)  # the closes decided at this tick start first
            self.now = round(self.now + TICK, 6)
            self.ticks += 1
            assert self.ticks < 10_000, "the drain never ended"

        self.drain._tick = tick  # type: ignore[method-assign]

    def conn(self, name: str, **kw: object) -> FakeConn:
        return FakeConn(name, self.live, lambda: self.now, **kw)  # type: ignore[arg-type]


def test_the_policy_closes_idle_calls_after_the_notice_and_every_call_at_the_timeout() -> None:
    p = DrainPolicy(notice_s=2.0, timeout_s=30.0)
    assert p.closes(0.0, True) is None  # the notice gives the load balancer time to see /ready say draining
    assert p.closes(1.9, True) is None
    assert p.closes(2.0, True) == "between_turns"
    assert p.closes(29.9, False) is None  # mid-turn: it goes on
    assert p.closes(30.0, False) == "timeout" and p.closes(30.0, True) == "timeout"
    assert p.closes(0.0, False, stop_now=True) == "stopped"


async def test_idle_calls_go_after_the_notice_busy_ones_when_their_turn_ends_the_rest_at_the_timeout() -> None:
    r = Rigged(notice_s=0.5, timeout_s=3.0)
    idle = r.conn("ava")
    mid_answer = r.conn("realtime", busy_until=1.2)
    endless = r.conn("wyoming", busy_until=99.0)
    report = await r.drain.run()
    assert idle.closed_at == 0.5
    assert mid_answer.closed_at == 1.2  # the first tick after its turn ended
    assert endless.closed_at == 3.0
    assert report.open_at_start == {"ava": 1, "realtime": 1, "wyoming": 1}
    assert report.closed == {"between_turns": 2, "timeout": 1} and report.left == 0
    assert 3.0 <= report.seconds < 3.5  # the last close handshake takes its own ticks
    assert not r.live
    # A connection being closed is not asked again (nor closed twice).
    assert idle.asked_after_close == mid_answer.asked_after_close == endless.asked_after_close == 0


async def test_no_connection_means_no_wait() -> None:
    r = Rigged()
    report = await r.drain.run()
    assert report.closed == {} and report.seconds == 0.0 and r.ticks == 0


async def test_a_second_signal_closes_every_call_at_once() -> None:
    r = Rigged(notice_s=5.0, timeout_s=60.0)
    a, b = r.conn("ava", busy_until=50.0), r.conn("ava")
    r.stop_now.set()
    report = await r.drain.run()
    assert a.closed_at == b.closed_at == 0.0
    assert report.closed == {"stopped": 2}


async def test_a_close_that_never_completes_is_given_up_after_the_grace() -> None:
    r = Rigged(notice_s=0.0, timeout_s=10.0, grace_s=1.0)
    stuck = r.conn("ava", leaves=False)
    report = await r.drain.run()
    assert stuck.closed_at == 0.0 and report.left == 1
    assert report.seconds == pytest.approx(1.0)


async def test_a_failing_hook_counts_as_mid_turn_and_the_timeout_still_closes_it() -> None:
    r = Rigged(notice_s=0.0, timeout_s=1.0)
    broken = r.conn("realtime", hook_fails=True)
    report = await r.drain.run()
    assert broken.closed_at == 1.0 and report.closed == {"timeout": 1}


async def test_the_first_signal_drains_and_the_second_stops_now() -> None:
    stop = StopRequests()
    assert not stop.drain.is_set()
    stop.signal("SIGTERM")
    assert stop.drain.is_set() and not stop.now.is_set()
    stop.signal("SIGINT")
    assert stop.now.is_set()


def test_drain_settings_come_from_the_environment_and_are_checked() -> None:
    cfg = from_env({}, models_dir=Path("/x"))
    assert (cfg.drain_timeout_s, cfg.drain_notice_s) == (30.0, 2.0)
    cfg = from_env({"LOCAL_DRAIN_TIMEOUT_S": "5", "LOCAL_DRAIN_NOTICE_S": "0.5"},
                   models_dir=Path("/x"))
    assert (cfg.drain_timeout_s, cfg.drain_notice_s) == (5.0, 0.5)
    validate(cfg)
    with pytest.raises(ConfigError, match="LOCAL_DRAIN_NOTICE_S"):
        validate(from_env({"LOCAL_DRAIN_TIMEOUT_S": "1", "LOCAL_DRAIN_NOTICE_S": "2"},
                          models_dir=Path("/x")))
    with pytest.raises(ConfigError, match="LOCAL_DRAIN_NOTICE_S"):
        validate(from_env({"LOCAL_DRAIN_NOTICE_S": "-1"}, models_dir=Path("/x")))


# ---------------------------------------------------------------------- the call core: between turns


async def test_a_call_is_between_turns_only_when_no_answer_is_in_flight() -> None:
    r = Rig()
    try:
        assert r.call.between_turns()
        r.engines.pool.delay = 0.02
        turn = r.call.start_turn("Hi", kind="llm_request", request_id="r1", speak=False, stream_tokens=True)
        assert not r.call.between_turns()
        await r.finish(turn)
        await asyncio.sleep(0)  # the turn leaves the call's set when its task's callbacks run
        assert r.sink.of(Answer) and r.call.between_turns()
        speaking = r.call.speak_text("Hello there.", request_id="t1")
        assert not r.call.between_turns()
        await r.finish(speaking)
        await asyncio.sleep(0)
        assert r.call.between_turns()
    finally:
        await r.call.close()


async def test_an_utterance_in_progress_is_not_between_turns_and_its_answer_neither() -> None:
    r = Rig(LOCAL_STT_SPECULATE_MS="0")
    try:
        r.engines.pool.delay = 0.02
        seen: list[bool] = []
        for chunk in (tone(0.3, 0), tone(1.0)):
            for i in range(0, len(chunk), 640):  # 20 ms frames
                r.call.accept_audio(chunk[i:i + 640], "pcm16le", 16000, None)
                await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        seen.append(r.call.between_turns())  # the caller is speaking
        silence = tone(1.0, 0)
        for i in range(0, len(silence), 640):
            r.call.accept_audio(silence[i:i + 640], "pcm16le", 16000, None)
            await asyncio.sleep(0)
        await r.until(lambda: r.call.turns)
        seen.append(r.call.between_turns())  # the answer is being generated
        await r.until(lambda: r.sink.of(Answer) and not r.call.turns)
        seen.append(r.call.between_turns())
        assert seen == [False, False, True]
    finally:
        await r.call.close()


async def test_tool_calls_sent_leave_the_turn_open_until_the_tool_result() -> None:
    r = Rig()
    transfer = Tool("transfer_call", "Transfer the call.",
                    {"type": "object", "properties": {"destination": {"type": "string"}}})
    try:
        found = r.call.find_tools(text='<tool_call>{"name": "transfer_call", "arguments": {"destination": "x"}}'
                                       '</tool_call>', latest_user_text="sales please", tools=(transfer,),
                                  allowed_tools=None, policy="auto", choice="auto", request_id="f1")
        await r.finish(found)
        await asyncio.sleep(0)
        assert r.sink.of(ToolCalls) and not r.call.turns
        assert not r.call.between_turns()  # the client runs the tool; its result gets the spoken follow-up
        answer = r.call.tool_result(tool_name="transfer_call", result={"status": "ok"}, is_error=False,
                                    request_id="t1")
        await r.finish(answer)
        await asyncio.sleep(0)
        assert r.call.between_turns()
    finally:
        await r.call.close()


async def test_a_search_that_finds_no_tool_leaves_nothing_awaited() -> None:
    r = Rig()
    try:
        r.engines.pool.answer = '{"answer": "Sure."}'
        found = r.call.find_tools(text="", latest_user_text="what time is it", tools=(), allowed_tools=None,
                                  policy="auto", choice="auto", request_id="f1")
        await asyncio.wait_for(asyncio.shield(found.task), BOUND_S)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert r.call.between_turns()
    finally:
        await r.call.close()
