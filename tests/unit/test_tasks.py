"""TaskOwner: every task's failure reaches its owner's handler; closing cancels and awaits all."""

from __future__ import annotations

import asyncio
import gc

import pytest

from local_ai_server.errors import InvalidField
from local_ai_server.tasks import TaskOwner


async def test_a_failure_goes_to_the_handler_and_is_never_left_unretrieved() -> None:
    seen: list[BaseException] = []
    owner = TaskOwner("t", on_error=seen.append)

    async def boom() -> None:
        raise ValueError("bad")

    task = owner.spawn(boom())
    await asyncio.gather(task, return_exceptions=True)
    assert len(seen) == 1 and isinstance(seen[0], ValueError)
    del task
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
    gc.collect()
    await asyncio.sleep(0)
    assert not loop_errors  # no "Task exception was never retrieved"


async def test_spawn_handler_overrides_the_default_and_siblings_keep_running() -> None:
    default: list[BaseException] = []
    own: list[BaseException] = []
    owner = TaskOwner("t", on_error=default.append)
    done = asyncio.Event()

    async def boom() -> None:
        raise InvalidField("x")

    async def sibling() -> None:
        await asyncio.sleep(0.02)
        done.set()

    owner.spawn(sibling())
    owner.spawn(boom(), on_error=own.append)
    await asyncio.wait_for(done.wait(), 1)
    assert not default and len(own) == 1 and isinstance(own[0], InvalidField)


async def test_aclose_cancels_and_awaits_every_task() -> None:
    owner = TaskOwner("t")
    finished: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            finished.append(name)

    owner.spawn(forever("a"))
    owner.spawn(forever("b"))
    await asyncio.sleep(0)
    await owner.aclose()
    assert sorted(finished) == ["a", "b"] and len(owner) == 0
    with pytest.raises(RuntimeError):
        owner.spawn(forever("c"))

