"""COBS binary device emulator: fixed-layout packets with CRC-16/CCITT-FALSE on a pty.

`values(t)` returns the raw field values (before the driver's scale/offset) in layout
order; packets are encoded with the same pure codec as the driver
(drivers/serial/cobs.py `CobsLayout.encode`), delimiter 0x00, which is why corruption
keeps the delimiter intact.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from drivers.emulated.serial import Faults, PeriodicSerialDevice
from drivers.serial.cobs import CobsField, CobsLayout

__all__ = ["CobsDeviceEmulator"]


class CobsDeviceEmulator(PeriodicSerialDevice):
    delimiter = b"\x00"

    def __init__(
        self,
        link: str | os.PathLike[str],
        *,
        fields: Sequence[CobsField],
        values: Callable[[float], Sequence[float]],
        rate_hz: float = 10.0,
        endian: str = "little",
        crc_byte_order: str = "big",
        packet_type: int | None = None,
        seed: int = 0,
        faults: Faults | None = None,
        dropout: Callable[[float], bool] | None = None,
    ) -> None:
        super().__init__(link, rate_hz=rate_hz, seed=seed, faults=faults, dropout=dropout)
        self.layout = CobsLayout(fields, endian, packet_type, crc_byte_order)
        self.values = values

    def frames_at(self, t: float) -> Sequence[bytes]:
        return [self.layout.encode(self.values(t))]
