"""Fixtures for the I2C tests: emulated buses behind the real AsyncI2CBus worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from drivers.emulated.i2c import EmulatedDevice, EmulatedSMBus
from drivers.i2c.bus import AsyncI2CBus

MakeBus = Callable[..., tuple[AsyncI2CBus, EmulatedSMBus]]


@pytest.fixture
async def make_bus() -> AsyncIterator[MakeBus]:
    """make_bus(*devices, **EmulatedSMBus kwargs) -> (AsyncI2CBus, EmulatedSMBus)."""
    buses: list[AsyncI2CBus] = []

    def make(*devices: EmulatedDevice, **kw: Any) -> tuple[AsyncI2CBus, EmulatedSMBus]:
        smbus = EmulatedSMBus(devices, **kw)
        bus = AsyncI2CBus.from_smbus(smbus, "emu")
        buses.append(bus)
        return bus, smbus

    yield make
    for b in buses:
        await b.close()
