"""Helpers shared by the I2C drivers: address validation, stuck-value detection, and the
polled-sensor skeleton every driver builds on.

The checks and `StuckDetector` are pure (no I/O). The config structs call `check_address`
from `__post_init__`, so a bad address is a config error at load time with the part's
legal addresses in the message.

`I2CSensor` is the part of a polled I2C driver that is the same for every chip: the bus
and address, the fault counters (`reads`, `bus_errors`, `stuck_reads` plus the driver's
own), the chip-id check of `open()`, the fault accounting around one acquisition
(`counting_read`: a `DeviceError` counts as a bus error, a completed acquisition as a
read, anything else, e.g. a CRC `FrameError`, as neither) and the stuck-data quality.
What a chip reads and how it decodes stays in its driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from drivers.base import AsyncI2CBusLike, DeviceError, Quality, Resources

__all__ = [
    "I2CSensor",
    "StuckDetector",
    "check_address",
    "check_bus",
    "check_choice",
    "i2c_factory",
    "new_counters",
]


def check_address(part: str, address: int, legal: Mapping[int, str]) -> None:
    """Raise ValueError unless `address` is a 7-bit address the part can be strapped to.

    `legal` maps each address to the strapping that selects it, e.g. {0x76: "SDO to GND"}.
    """
    options = ", ".join(f"0x{a:02x} ({how})" for a, how in legal.items())
    if not 0 <= address <= 0x7F:
        raise ValueError(
            f"address {address:#x} is not a 7-bit I2C address (0x00..0x7f); "
            f"{part} answers at {options}"
        )
    if address not in legal:
        raise ValueError(f"address 0x{address:02x} is not a {part} address; legal: {options}")


def check_choice(key: str, value: float, legal: tuple[float, ...], unit: str = "") -> None:
    if value not in legal:
        opts = ", ".join(f"{v:g}{unit}" for v in legal)
        raise ValueError(f"{key} {value:g}{unit} is not supported; legal: {opts}")


def check_bus(bus: int) -> None:
    if not 0 <= bus <= 255:
        raise ValueError(f"bus {bus} is not an I2C adapter number (/dev/i2c-0..255)")


def new_counters(*extra: str) -> dict[str, int]:
    """The fault counters every I2C driver exposes (the hub shows them in `sensors`)."""
    keys = ("reads", "bus_errors", "stuck_reads", *extra)
    return dict.fromkeys(keys, 0)


class StuckDetector:
    """Flags raw data that has not changed for `after` consecutive reads.

    A sensor whose output registers freeze (a latched-up ADC, a chip in sleep after a
    brown-out) keeps ACKing and returns the same plausible bytes forever; only repetition
    gives it away. Meaningful only where fresh data differs at least in the noise LSBs
    between reads (e.g. an accelerometer polled slower than its output rate), so it is
    off (`after=0`) unless a driver's config enables it.
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self._last: bytes | None = None
        self._repeats = 0

    def update(self, raw: bytes) -> bool:
        """Feed one read's raw bytes; True while the value counts as stuck."""
        if self.after <= 0:
            return False
        if raw == self._last:
            self._repeats += 1
        else:
            self._last = raw
            self._repeats = 0
        return self._repeats >= self.after

    def reset(self) -> None:
        self._last = None
        self._repeats = 0


class I2CSensor:
    """Base of the polled I2C drivers (see the module docstring)."""

    mode: Literal["poll"] = "poll"

    def __init__(
        self, bus: AsyncI2CBusLike, address: int, *extra_counters: str, stuck_after: int = 0
    ) -> None:
        self.bus = bus
        self.addr = address
        self.counters = new_counters(*extra_counters)
        self._stuck = StuckDetector(stuck_after)

    @property
    def where(self) -> str:
        """The prefix of every fault message: which bus and address."""
        return f"i2c bus {self.bus.bus_id} addr 0x{self.addr:02x}"

    async def check_id(
        self,
        reg: int,
        expected: int,
        part: str,
        others: Mapping[int, str],
        label: str = "chip id",
        article: str = "a",
    ) -> None:
        """Read the one-byte id register; DeviceError naming the part found if it differs."""
        got = (await self.bus.read_block(self.addr, reg, 1))[0]
        if got != expected:
            other = others.get(got)
            what = f" (that is {article} {other})" if other else ""
            raise DeviceError(
                f"{self.where}: {label} 0x{got:02x}{what}, expected 0x{expected:02x} ({part})"
            )

    @contextmanager
    def counting_read(self) -> Iterator[None]:
        """Wrap one acquisition's bus traffic: count it as a bus error or as a read."""
        try:
            yield
        except DeviceError:
            self.counters["bus_errors"] += 1
            raise
        self.counters["reads"] += 1

    def stuck_quality(self, raw: bytes) -> Quality:
        """Feed one read's raw bytes to the stuck detector: UNCERTAIN (and counted) if stuck."""
        if self._stuck.update(raw):
            self.counters["stuck_reads"] += 1
            return Quality.UNCERTAIN
        return Quality.GOOD


S = TypeVar("S")


def i2c_factory(cls: Callable[[Any, AsyncI2CBusLike], S]) -> Callable[[Any, Resources], S]:
    """The registry factory of a driver class taking (config, bus): the bus is `cfg.bus`."""

    def factory(cfg: Any, resources: Resources) -> S:
        return cls(cfg, resources.i2c_bus(cfg.bus))

    return factory
