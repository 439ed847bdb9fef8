"""Helpers shared by the I2C drivers: address validation, stuck-value detection, CRC-8.

All pure (no I/O). The config structs call `check_address` from `__post_init__`, so a bad
address is a config error at load time with the part's legal addresses in the message.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["StuckDetector", "check_address", "check_bus", "check_choice", "new_counters"]


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
