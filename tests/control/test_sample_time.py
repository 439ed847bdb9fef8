"""Samples are stamped when the device was read, not when the event loop got the result.

The anomaly model resamples its vibration window on the samples' timestamps
(docs/inference.md). On an I2C bus the transaction runs on the bus's worker thread and
the result reaches the event loop later, by a delay that grows with CPU load; the worker
therefore notes the transaction's start through the driver contract
(`drivers.base.note_acquired`) and the hub stamps the read's samples with it. Here the
"wire" is slow on purpose (30 ms), so a completion-time stamp would be off by at least
that much.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from drivers.base import acquired_at, begin_acquisition
from drivers.i2c.bus import AsyncI2CBus


class _SlowWire:
    """Stands in for /dev/i2c-N: every block read spends 30 ms on the wire."""

    def __init__(self) -> None:
        self.started: list[float] = []

    def read_i2c_block_data(self, addr: int, reg: int, length: int, force: Any = None) -> list[int]:
        self.started.append(time.monotonic())
        time.sleep(0.03)
        return list(range(length))

    def close(self) -> None:
        pass


async def test_transaction_start_is_published_to_the_awaiting_task() -> None:
    wire = _SlowWire()
    bus = AsyncI2CBus.from_smbus(wire, "t")  # type: ignore[arg-type]
    try:

        async def one_read() -> tuple[float | None, float]:
            begin_acquisition()  # what the hub does before each read
            await bus.read_block(0x68, 0x3B, 14)
            await bus.read_block(0x68, 0x3B, 14)  # a second transaction: the first counts
            return acquired_at(), time.monotonic()

        t_tx, t_done = await asyncio.create_task(one_read())
        assert t_tx is not None
        assert abs(t_tx - wire.started[0]) < 0.005  # the first transaction's start
        assert t_done - t_tx >= 0.055  # a completion stamp would be >= 60 ms later
        # another task's reads do not leak into this context
        assert acquired_at() is None
    finally:
        await bus.close()
