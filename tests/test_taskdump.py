"""The `tasks` dump names the whole await chain down to the future a task waits on."""

from __future__ import annotations

import asyncio

from edgerund import taskdump


async def _inner(fut: asyncio.Future[None]) -> None:
    await fut


async def _outer(fut: asyncio.Future[None]) -> None:
    await _inner(fut)


async def test_the_chain_goes_down_to_the_pending_future() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_outer(fut), name="stuck-one")
    await asyncio.sleep(0)
    rows = {r["name"]: r for r in taskdump.dump()}
    chain = rows["stuck-one"]["awaits"]
    assert rows["stuck-one"]["state"] == "pending"
    assert chain[0].startswith("_outer ") and chain[1].startswith("_inner ")
    assert chain[0].endswith(f"test_taskdump.py:{_outer.__code__.co_firstlineno + 1}")
    assert chain[-1] == "future (pending)"
    # the dumping task itself is listed too, running
    assert any("test_the_chain_goes_down" in r["awaits"][0] for r in rows.values() if r["awaits"])
    fut.set_result(None)
    await task


async def test_a_task_awaiting_another_task_names_it() -> None:
    gate = asyncio.Event()
    child = asyncio.create_task(gate.wait(), name="child")

    async def parent() -> None:
        await child

    p = asyncio.create_task(parent(), name="parent")
    await asyncio.sleep(0)
    rows = {r["name"]: r for r in taskdump.dump()}
    assert rows["parent"]["awaits"][-1] == "task child"
    assert rows["child"]["awaits"][0].startswith("Event.wait ")
    gate.set()
    await p
