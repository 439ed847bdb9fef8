"""The shared transports of real hardware: one I2C bus worker per bus, one port per URL.

`HardwareResources` implements `drivers.base.Resources` for a gateway with real wiring:
`i2c_bus(n)` is an `AsyncI2CBus` over `smbus2.SMBus(n)`, opened lazily in the bus's own
worker thread (opening `/dev/i2c-N` can block); `serial_port(url, **settings)` is the one
`AsyncSerialPort` for that URL, shared by every sensor and actuator on the wire (Modbus
units on one RS-485 line), with conflicting line settings refused.

Nothing is opened at construction: drivers open what they use, and the hub closes every
transport it handed out in `aclose()` (after the sensors are closed).

`TrackingResources` wraps any `Resources` (these, or the simulated ones in
drivers/emulated/simulated.py) and remembers what it handed out, so the technician
commands (`i2c-scan`, `serial-sniff`) and status can find a bus or a port by its number
or URL without knowing which implementation built it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from drivers.base import AsyncI2CBusLike, AsyncSerialPortLike, Resources
from drivers.i2c.bus import AsyncI2CBus, open_real_bus
from drivers.serial.port import SerialPorts


class HardwareResources:
    """`Resources` for real buses and ports."""

    def __init__(self) -> None:
        self._buses: dict[int, AsyncI2CBus] = {}
        self._ports = SerialPorts()

    def i2c_bus(self, bus: int) -> AsyncI2CBusLike:
        b = self._buses.get(bus)
        if b is None:
            b = open_real_bus(bus)  # the SMBus itself is opened in the worker, lazily
            self._buses[bus] = b
        return b

    def serial_port(self, url: str, **settings: Any) -> AsyncSerialPortLike:
        return self._ports.get(url, **settings)

    async def aclose(self) -> None:
        for b in self._buses.values():
            with contextlib.suppress(Exception):
                await b.close()
        self._buses.clear()
        await self._ports.close_all()


class TrackingResources:
    """Delegates to `inner` and records every bus and port handed out."""

    def __init__(self, inner: Resources) -> None:
        self.inner = inner
        self.buses: dict[int, AsyncI2CBusLike] = {}
        self.ports: dict[str, AsyncSerialPortLike] = {}

    def i2c_bus(self, bus: int) -> AsyncI2CBusLike:
        b = self.buses.get(bus)
        if b is None:
            b = self.inner.i2c_bus(bus)
            self.buses[bus] = b
        return b

    def serial_port(self, url: str, **settings: Any) -> AsyncSerialPortLike:
        p = self.inner.serial_port(url, **settings)
        self.ports[url] = p
        return p

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()
        else:  # a Resources without aclose: close what we handed out
            for b in self.buses.values():
                bc = getattr(b, "close", None)
                if bc is not None:
                    with contextlib.suppress(Exception):
                        await bc()
        self.buses.clear()
        self.ports.clear()
