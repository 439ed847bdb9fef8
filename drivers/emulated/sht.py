"""Sensirion SHT3x / SHT4x emulator (command protocol, CRC bytes, conversion time).

Theory of operation
-------------------
A command write starts a single-shot conversion that takes the datasheet's TYPICAL time
for the repeatability/precision (the driver waits the maximum). Until it completes the
part does not acknowledge its address (datasheet: reading before the data is ready is
NACKed, and no command is accepted during a conversion). The result is latched at the
end of the conversion from the physical signals, encoded as two words each followed by
its CRC-8, and can be read once; a second read without a new command is NACKed. Unknown
commands are NACKed in the data phase. SHT3x also answers the status register
(power-up value 0x8010: alert pending + reset detected) and clear-status; both parts
answer the serial-number command (SHT3x 0x3780, SHT4x 0x89), which the SHT4x driver and
`discover` read. Bit-flip faults corrupt the bytes after the CRC was computed, as
noise on SDA would, so the driver's CRC check catches them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers.emulated.i2c import Clock, EmulatedDevice, Nack, SignalLike, as_signal
from drivers.i2c.sht import (
    SHT3X_CLEAR_STATUS,
    SHT3X_MEASURE,
    SHT3X_READ_SERIAL,
    SHT3X_READ_STATUS,
    SHT3X_SOFT_RESET,
    SHT4X_MEASURE,
    SHT4X_READ_SERIAL,
    SHT4X_SOFT_RESET,
    celsius_to_ticks,
    encode_words,
    sht3x_rh_to_ticks,
    sht4x_rh_to_ticks,
)

__all__ = ["EmulatedSHT"]

SHT3X_TYP_S = {0x2400: 0.0125, 0x240B: 0.0045, 0x2416: 0.0025}
SHT4X_TYP_S = {0xFD: 0.0069, 0xF6: 0.0037, 0xE0: 0.0013}
SHT3X_STATUS_POWER_UP = 0x8010


class EmulatedSHT(EmulatedDevice):
    def __init__(
        self,
        part: str = "sht3x",
        address: int = 0x44,
        *,
        temperature_c: SignalLike = 22.0,
        humidity_pct: SignalLike = 45.0,
        serial_number: int = 0x0BADC0DE,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        if part not in ("sht3x", "sht4x"):
            raise ValueError(f"part must be sht3x or sht4x, got {part!r}")
        self.part = part
        self.temperature_c = as_signal(temperature_c)
        self.humidity_pct = as_signal(humidity_pct)
        self.serial_number = serial_number
        self.conversions = 0
        super().__init__(address, clock=clock, online=online)

    def power_on_reset(self) -> None:
        self._busy_until = 0.0
        self._pending_end: float | None = None  # a conversion in progress ends here
        self._reply: bytes | None = None
        self._last_words: tuple[int, int] | None = None
        self.status = SHT3X_STATUS_POWER_UP

    def on_transaction_start(self) -> None:
        now = self.clock()
        if self._pending_end is not None:
            if now < self._pending_end:
                raise Nack("address")  # still converting: the part does not ACK
            self._latch(self._pending_end)
            self._pending_end = None

    def _latch(self, t: float) -> None:
        self.conversions += 1
        if self.stuck and self._last_words is not None:
            words = self._last_words
        else:
            to_rh = sht3x_rh_to_ticks if self.part == "sht3x" else sht4x_rh_to_ticks
            words = (celsius_to_ticks(self.temperature_c(t)), to_rh(self.humidity_pct(t)))
            self._last_words = words
        self._reply = encode_words(words)

    def on_write(self, data: bytes) -> None:
        if not data:
            return  # quick command (a scanner): ACKed, nothing happens
        now = self.clock()
        if self.part == "sht3x":
            if len(data) < 2:
                raise Nack("data")
            cmd = (data[0] << 8) | data[1]
            if cmd in SHT3X_TYP_S:
                self._reply = None
                self._pending_end = now + SHT3X_TYP_S[cmd]
            elif cmd == SHT3X_READ_STATUS:
                self._reply = encode_words([self.status])
            elif cmd == SHT3X_READ_SERIAL:
                s = self.serial_number
                self._reply = encode_words([(s >> 16) & 0xFFFF, s & 0xFFFF])
            elif cmd == SHT3X_CLEAR_STATUS:
                self.status &= ~0x8C10
                self._reply = None
            elif cmd == SHT3X_SOFT_RESET:
                self.power_on_reset()
            else:
                raise Nack("data")
        else:
            cmd = data[0]
            if cmd in SHT4X_TYP_S:
                self._reply = None
                self._pending_end = now + SHT4X_TYP_S[cmd]
            elif cmd == SHT4X_READ_SERIAL:
                s = self.serial_number
                self._reply = encode_words([(s >> 16) & 0xFFFF, s & 0xFFFF])
            elif cmd == SHT4X_SOFT_RESET:
                self.power_on_reset()
            else:
                raise Nack("data")

    def on_read(self, length: int) -> bytes:
        if self._reply is None:
            raise Nack("address")  # no data available
        reply, self._reply = self._reply, None
        return (reply + b"\xff" * length)[:length]


assert set(SHT3X_TYP_S) == set(SHT3X_MEASURE.values())
assert set(SHT4X_TYP_S) == set(SHT4X_MEASURE.values())
