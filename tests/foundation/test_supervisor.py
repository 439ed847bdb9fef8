"""Task scopes: the only way a component starts a task, and no task outlives its scope."""

from __future__ import annotations

import asyncio

import pytest

from edgerund.context import FatalComponentError, Supervisor
from tests.helpers.wiring import supervised


async def test_spawn_without_a_task_group_is_refused() -> None:
    sup = Supervisor(lambda err: None)
    with pytest.raises(RuntimeError, match="no TaskGroup"):
        sup.scope("hub").spawn("x", asyncio.Event().wait)


async def test_leaving_a_scope_cancels_its_tasks_only() -> None:
    async with supervised() as sup:
        other = sup.scope("other")
        forever = asyncio.Event()
        keep = other.spawn("keep", forever.wait)
        async with sup.scope("hub") as scope:
            t1 = scope.spawn("a", forever.wait)
            t2 = scope.spawn("b", forever.wait)
            assert {t.get_name() for t in scope.tasks} == {"hub.a", "hub.b"}
            await asyncio.sleep(0)
        assert t1.cancelled() and t2.cancelled() and not scope.tasks
        assert not keep.done()  # another component's task is not touched
    assert keep.cancelled()  # the supervisor's exit ends the rest


async def test_restart_and_fatal() -> None:
    fatal: list[FatalComponentError] = []
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ValueError("boom")
        await asyncio.Event().wait()

    async def broken() -> None:
        raise RuntimeError("unsafe")

    async with supervised(fatal) as sup, sup.scope("c") as scope:
        scope.spawn("flaky", flaky, restart=True, backoff_initial_s=0.01)
        scope.spawn("loop", broken, restart=False)
        for _ in range(200):
            if runs >= 3 and fatal:
                break
            await asyncio.sleep(0.01)
    assert runs == 3 and sup.restarts == {"c.flaky": 2}
    assert [f.task_name for f in fatal] == ["c.loop"]


async def test_an_error_of_the_body_propagates_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with supervised() as sup:
            sup.scope("x").spawn("t", asyncio.Event().wait)
            raise KeyError("not an ExceptionGroup")
