"""The loop guard itself: it must catch a blocked loop, or it guards nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
from blockbuster import BlockingError, blockbuster_ctx

from tests.fixtures.loopguard import LoopGuard


async def test_lag_monitor_sees_a_blocking_call() -> None:
    guard = LoopGuard(threshold_s=0.05)
    task = asyncio.create_task(guard.run())
    await asyncio.sleep(0.02)
    time.sleep(0.12)  # noqa: ASYNC251 - the blocking call the guard must notice
    await asyncio.sleep(0.02)
    task.cancel()
    assert guard.max_lag_s >= 0.1


async def test_blockbuster_flags_blocking_calls_from_scanned_modules() -> None:
    with blockbuster_ctx(scanned_modules=["tests.foundation"]), pytest.raises(BlockingError):
        time.sleep(0.001)  # noqa: ASYNC251


async def test_guard_fixture_passes_clean_async_code(loop_guard: LoopGuard) -> None:
    await asyncio.gather(*(asyncio.sleep(0.01) for _ in range(100)))
    await asyncio.to_thread(time.sleep, 0.1)  # off the loop: allowed
    assert loop_guard.samples >= 1
