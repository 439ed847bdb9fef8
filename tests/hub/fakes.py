"""A tiny driver of our own that speaks the PolledSensor / StreamSensor interface.

Used to test the hub's scheduling and fault handling in isolation from the real drivers
(those are exercised against their emulators in test_sim.py / test_serial_hub.py). Faults
are switched at run time through attributes: `mode_fault` = None | "device" | "frame" |
"hang" | "bug"; `open_fault` likewise for open().
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from drivers.base import ChannelInfo, Reading, SensorConfig, note_acquired
from drivers.errors import DeviceError, FrameError
from drivers.registry import SensorSpec


class FakeConfig(SensorConfig, tag="fake"):
    work_ms: float = 0.0  # simulated time the read takes (awaited, like a bus hop)
    transport_notes: bool = False  # note the acquisition time at the read's start, as a bus does


class FakeStreamConfig(SensorConfig, tag="fake_stream"):
    command_at_open: bool = False  # open() writes to the device (and so notes a time)


class FakePolled:
    mode = "poll"

    def __init__(self, cfg: FakeConfig, resources: Any) -> None:
        self.cfg = cfg
        self.channels = (ChannelInfo("x", "u"), ChannelInfo("y", "v"))
        self.counters: dict[str, int] = {"reads": 0}
        self.fault: str | None = None
        self.open_fault: str | None = None
        self.n = 0
        self.opens = 0
        self.attempts = 0
        self.read_starts: list[float] = []
        self.noted: list[float] = []
        self.is_open = False

    async def open(self) -> None:
        self.opens += 1
        if self.open_fault == "device":
            raise DeviceError("fake: no ACK at open")
        self.is_open = True

    async def read(self) -> Sequence[Reading]:
        self.attempts += 1
        self.read_starts.append(asyncio.get_running_loop().time())
        if self.cfg.transport_notes:
            t = time.monotonic()
            self.noted.append(t)
            note_acquired(t)
            note_acquired(t + 0.001)  # a second transaction of the same read does not count
        if self.cfg.work_ms:
            await asyncio.sleep(self.cfg.work_ms / 1000.0)
        f = self.fault
        if f == "device":
            raise DeviceError("fake: NACK")
        if f == "frame":
            raise FrameError("crc", "fake: bad CRC")
        if f == "hang":
            await asyncio.sleep(3600)
        if f == "bug":
            raise ZeroDivisionError("fake driver bug")
        self.n += 1
        self.counters["reads"] += 1
        return (Reading("x", float(self.n)), Reading("y", float(-self.n)))

    async def close(self) -> None:
        self.is_open = False


class FakeStream:
    mode = "stream"

    def __init__(self, cfg: FakeStreamConfig, resources: Any) -> None:
        self.cfg = cfg
        self.channels = (ChannelInfo("x", "u"),)
        self.counters: dict[str, int] = {}
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.opens = 0
        self.open_fault: str | None = None

    async def open(self) -> None:
        self.opens += 1
        if self.open_fault:
            raise DeviceError("fake: port gone")
        if self.cfg.command_at_open:
            note_acquired(time.monotonic())

    async def frames(self) -> AsyncIterator[Sequence[Reading]]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield (Reading("x", float(item)),)

    async def close(self) -> None:
        pass


FAKE_DRIVERS = {
    "fake": SensorSpec("fake", FakeConfig, FakePolled, "other", "test double"),
    "fake_stream": SensorSpec("fake_stream", FakeStreamConfig, FakeStream, "other", "test double"),
}
