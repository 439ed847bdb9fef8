"""Fixtures for the serial tests: shared-port resources, emulator paths, a loop-lag guard."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.serial.port import AsyncSerialPort, SerialPorts


class PortResources:
    """The serial half of `drivers.base.Resources`, as the hub provides it."""

    def __init__(self) -> None:
        self.ports = SerialPorts()

    def serial_port(self, url: str, **settings: Any) -> AsyncSerialPort:
        return self.ports.get(url, **settings)

    def i2c_bus(self, bus: int) -> Any:
        raise AssertionError("no I2C in serial tests")


@pytest.fixture
async def resources() -> AsyncIterator[PortResources]:
    res = PortResources()
    yield res
    await res.ports.close_all()


@pytest.fixture
def link(tmp_path: Path) -> Path:
    """Where an emulator puts its stable symlink (like /dev/serial/by-id/...)."""
    return tmp_path / "ttyEMU0"


class LagGuard:
    def __init__(self) -> None:
        self.max_lag_s = 0.0


@pytest.fixture
async def loop_guard() -> AsyncIterator[LagGuard]:
    """Fails the test if the event loop was blocked: a 5 ms ticker must never stall long.

    The bound is loose (this machine is shared by many test runs); a blocking read of a
    silent port would stall for the whole read, far beyond it.
    """
    guard = LagGuard()
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            guard.max_lag_s = max(guard.max_lag_s, now - last - 0.005)
            last = now

    task = asyncio.create_task(tick())
    yield guard
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert guard.max_lag_s < 0.3, f"event loop blocked for {guard.max_lag_s * 1000:.0f} ms"
