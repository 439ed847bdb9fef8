"""Sensirion SHT3x and SHT4x humidity / temperature sensors (driver name `sht`).

Theory of operation
-------------------
Protocol part (pure): these parts have no registers; the host writes a command (16-bit
on SHT3x, 8-bit on SHT4x), waits the conversion time, and reads the response, which is
a sequence of 16-bit big-endian words each followed by a CRC-8 (polynomial 0x31,
init 0xFF, no reflection, no final XOR; the datasheet's example: 0xBEEF -> 0x92).
`parse_words` checks the CRC of EVERY word and raises `FrameError("crc", ...)` naming the
word, so a flipped bit on the wire is never turned into a temperature.
Conversions (datasheets §4.13 / §4.6):
  SHT3x/SHT4x: T = -45 + 175 * S_T / 65535 degC
  SHT3x:       RH = 100 * S_RH / 65535
  SHT4x:       RH = -6 + 125 * S_RH / 65535 (clipped to 0..100 as Sensirion recommends)

Driver part: single-shot measurements without clock stretching (a stretched clock would
hold the whole bus; a read during the conversion is simply NACKed by the part). The
command is written, the maximum conversion time for the repeatability/precision is
awaited on the event loop (the bus is free for other devices meanwhile), then six bytes
are read. `open()` soft-resets the part and reads the status register (SHT3x) or the
serial number (SHT4x), both CRC-protected: there is no chip id, so a CRC-valid reply is
the identity check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from drivers.base import AsyncI2CBusLike, ChannelInfo, FrameError, Reading, SensorConfig
from drivers.i2c.common import I2CSensor, check_address, check_bus, i2c_factory
from drivers.registry import SensorSpec

# -- protocol ------------------------------------------------------------------------------

CRC_POLY = 0x31
CRC_INIT = 0xFF


def crc8(data: bytes) -> int:
    """Sensirion CRC-8: poly 0x31, init 0xFF, MSB first, no final XOR."""
    crc = CRC_INIT
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ CRC_POLY) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_words(words: Sequence[int]) -> bytes:
    """Words -> the wire format (MSB, LSB, CRC per word): what a sensor sends."""
    out = bytearray()
    for w in words:
        pair = bytes([(w >> 8) & 0xFF, w & 0xFF])
        out += pair + bytes([crc8(pair)])
    return bytes(out)


def parse_words(data: bytes) -> list[int]:
    """The wire format -> words, checking every word's CRC."""
    if len(data) % 3:
        raise FrameError("length", f"Sensirion reply is 3 bytes per word, got {len(data)} bytes")
    words = []
    for i in range(0, len(data), 3):
        pair, crc = data[i : i + 2], data[i + 2]
        calc = crc8(pair)
        if calc != crc:
            raise FrameError(
                "crc", f"word {i // 3} 0x{pair.hex()}: CRC 0x{crc:02x}, expected 0x{calc:02x}"
            )
        words.append((pair[0] << 8) | pair[1])
    return words


def ticks_to_celsius(s_t: int) -> float:
    return -45.0 + 175.0 * s_t / 65535.0


def sht3x_ticks_to_rh(s_rh: int) -> float:
    return 100.0 * s_rh / 65535.0


def sht4x_ticks_to_rh(s_rh: int) -> float:
    return min(100.0, max(0.0, -6.0 + 125.0 * s_rh / 65535.0))


def celsius_to_ticks(t_c: float) -> int:
    return max(0, min(65535, round((t_c + 45.0) * 65535.0 / 175.0)))


def sht3x_rh_to_ticks(rh: float) -> int:
    return max(0, min(65535, round(rh * 65535.0 / 100.0)))


def sht4x_rh_to_ticks(rh: float) -> int:
    return max(0, min(65535, round((rh + 6.0) * 65535.0 / 125.0)))


Precision = Literal["high", "medium", "low"]

# SHT3x: single shot, clock stretching disabled (datasheet Table 9), max durations Table 4.
SHT3X_MEASURE = {"high": 0x2400, "medium": 0x240B, "low": 0x2416}
SHT3X_MEASURE_MAX_S = {"high": 0.0155, "medium": 0.0065, "low": 0.0045}
SHT3X_SOFT_RESET = 0x30A2
SHT3X_READ_STATUS = 0xF32D
SHT3X_CLEAR_STATUS = 0x3041
SHT3X_READ_SERIAL = 0x3780  # electronic id, no clock stretching (SHT3x-DIS datasheet §4.4)
SHT3X_ADDRESSES = {0x44: "ADDR to VSS", 0x45: "ADDR to VDD"}

# SHT4x: datasheet Table 7.
SHT4X_MEASURE = {"high": 0xFD, "medium": 0xF6, "low": 0xE0}
SHT4X_MEASURE_MAX_S = {"high": 0.0083, "medium": 0.0045, "low": 0.0016}
SHT4X_SOFT_RESET = 0x94
SHT4X_READ_SERIAL = 0x89
SHT4X_ADDRESSES = {0x44: "SHT4x-A", 0x45: "SHT4x-B", 0x46: "SHT4x-C"}


def command_bytes(part: str, cmd: int) -> bytes:
    return bytes([cmd >> 8, cmd & 0xFF]) if part == "sht3x" else bytes([cmd])


# -- config ----------------------------------------------------------------------------------


class SHTConfig(SensorConfig, tag="sht"):
    """```yaml
    - id: enclosure
      driver: sht
      part: sht3x          # sht3x (SHT30/31/35) | sht4x (SHT40/41/45)
      bus: 1
      address: 0x44        # sht3x: 0x44 / 0x45 (ADDR pin); sht4x: 0x44 / 0x45 / 0x46 (order code)
      precision: high      # high | medium | low (repeatability): longer conversion, less noise
    ```"""

    part: Literal["sht3x", "sht4x"] = "sht3x"
    bus: int = 1
    address: int = 0x44
    precision: Precision = "high"
    stuck_after_reads: int = 0

    def __post_init__(self) -> None:
        check_bus(self.bus)
        legal = SHT3X_ADDRESSES if self.part == "sht3x" else SHT4X_ADDRESSES
        check_address(self.part.upper(), self.address, legal)


# -- driver ------------------------------------------------------------------------------------


class SHT(I2CSensor):
    def __init__(self, cfg: SHTConfig, bus: AsyncI2CBusLike) -> None:
        super().__init__(bus, cfg.address, "crc_errors", stuck_after=cfg.stuck_after_reads)
        self.cfg = cfg
        self.part = cfg.part
        self.channels: Sequence[ChannelInfo] = (
            ChannelInfo("temperature", "°C"),
            ChannelInfo("humidity", "%RH"),
        )
        if cfg.part == "sht3x":
            self._measure = command_bytes("sht3x", SHT3X_MEASURE[cfg.precision])
            self._wait_s = SHT3X_MEASURE_MAX_S[cfg.precision]
        else:
            self._measure = command_bytes("sht4x", SHT4X_MEASURE[cfg.precision])
            self._wait_s = SHT4X_MEASURE_MAX_S[cfg.precision]
        self.serial_number: int | None = None
        self.status: int | None = None

    async def _command_read(self, cmd: bytes, words: int, wait_s: float) -> list[int]:
        raw = await self.bus.transfer(self.addr, cmd, 3 * words, delay_s=wait_s)
        try:
            return parse_words(raw)
        except FrameError:
            self.counters["crc_errors"] += 1
            raise

    async def open(self) -> None:
        if self.part == "sht3x":
            await self.bus.transfer(self.addr, command_bytes("sht3x", SHT3X_SOFT_RESET), 0)
            await asyncio.sleep(0.0015)  # soft reset time, datasheet Table 4
            (self.status,) = await self._command_read(
                command_bytes("sht3x", SHT3X_READ_STATUS), 1, 0.0005
            )
            await self.bus.transfer(self.addr, command_bytes("sht3x", SHT3X_CLEAR_STATUS), 0)
        else:
            await self.bus.transfer(self.addr, command_bytes("sht4x", SHT4X_SOFT_RESET), 0)
            await asyncio.sleep(0.001)
            hi, lo = await self._command_read(command_bytes("sht4x", SHT4X_READ_SERIAL), 2, 0.001)
            self.serial_number = (hi << 16) | lo
        self._stuck.reset()

    async def read(self) -> Sequence[Reading]:
        # a CRC error is a FrameError: counted as crc_errors, neither a read nor a bus error
        with self.counting_read():
            raw = await self.bus.transfer(self.addr, self._measure, 6, delay_s=self._wait_s)
            try:
                s_t, s_rh = parse_words(raw)
            except FrameError:
                self.counters["crc_errors"] += 1
                raise
        q = self.stuck_quality(raw)
        rh = sht3x_ticks_to_rh(s_rh) if self.part == "sht3x" else sht4x_ticks_to_rh(s_rh)
        return [Reading("temperature", ticks_to_celsius(s_t), q), Reading("humidity", rh, q)]

    async def close(self) -> None:
        """Nothing to do: single-shot parts idle between commands."""


_factory = i2c_factory(SHT)


SENSOR = SensorSpec(
    name="sht",
    config_type=SHTConfig,
    factory=_factory,
    transport="i2c",
    summary="Sensirion SHT3x/SHT4x temperature (°C) and humidity (%RH), CRC-checked, I2C 0x44-0x46",
)
