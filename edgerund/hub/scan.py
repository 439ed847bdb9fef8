"""`i2c-scan`: a probe of every address on a bus that writes no data, as `i2cdetect` does.

How it stays safe on a bus in use:
- Each address is probed with ONE transaction submitted to the bus's own worker thread,
  so probes queue between the sensors' transactions (FIFO) and never interleave with
  them, and the running acquisition sees at most one short transaction's delay per probe
  instead of a whole scan.
- The probe is i2cdetect's default ("auto") choice: an SMBus "quick write" (the address
  byte with the write bit, then STOP: no register pointer, no data byte) for most
  addresses, and "receive byte" for 0x30-0x37 and 0x50-0x5f, where EEPROMs live that a
  quick write can upset (the AT24RF08 write-protect erratum). Neither changes a
  register. A pure "receive byte" scan (`i2cdetect -r`) would miss Sensirion parts, which
  NACK reads when no measurement is pending.
- Addresses owned by a configured sensor are NOT probed (reported `in use` with the
  sensor's id, like i2cdetect's `UU`): a stray read there could consume a measurement a
  driver is waiting for (Sensirion parts return the result of the last command once).
- Reserved addresses (0x00-0x02 general call/CBUS, 0x78-0x7f 10-bit/reserved) are skipped.

A NACK (ENXIO/EREMOTEIO/EIO) means "nobody there"; any other error (no such adapter,
permission) aborts the scan with that error, since every address would fail the same way.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

FIRST_ADDR = 0x03
LAST_ADDR = 0x77

# Parts a technician is likely to find, by address (a hint, not an identification).
KNOWN_PARTS: dict[int, str] = {
    0x40: "ina219 / sht4x-alt / htu21d",
    0x41: "ina219",
    0x44: "sht3x / sht4x",
    0x45: "sht3x / ina219",
    0x48: "ads1115",
    0x49: "ads1115",
    0x4A: "ads1115",
    0x4B: "ads1115",
    0x68: "mpu6050 / rtc",
    0x69: "mpu6050",
    0x76: "bme280 / bmp280",
    0x77: "bme280 / bmp280",
    0x50: "eeprom",
    0x3C: "ssd1306 display",
}
_NACK = {errno.ENXIO, errno.EREMOTEIO, errno.EIO, errno.ETIMEDOUT}


class ScanError(Exception):
    pass


def uses_read_probe(addr: int) -> bool:
    """i2cdetect's auto mode: receive byte where EEPROMs live, quick write elsewhere."""
    return 0x30 <= addr <= 0x37 or 0x50 <= addr <= 0x5F


def _probe(addr: int) -> Any:
    if uses_read_probe(addr):

        def probe(smbus: Any) -> None:
            smbus.read_byte(addr)

    else:

        def probe(smbus: Any) -> None:
            smbus.write_quick(addr)

    probe.__name__ = f"probe 0x{addr:02x}"
    return probe


async def scan_bus(bus: Any, claimed: Mapping[int, str]) -> list[dict[str, Any]]:
    """Rows {address, status, sensor, part} for each responding or claimed address."""
    rows: list[dict[str, Any]] = []
    call_at = getattr(bus, "call_at", None)
    for addr in range(FIRST_ADDR, LAST_ADDR + 1):
        hint = KNOWN_PARTS.get(addr)
        if addr in claimed:
            rows.append(
                {
                    "address": f"0x{addr:02x}",
                    "status": "in use",
                    "sensor": claimed[addr],
                    "part": hint,
                }
            )
            continue
        try:
            if call_at is not None:
                await call_at(_probe(addr), addr, "probe")
            else:
                await bus.call(_probe(addr))
        except OSError as exc:
            code = getattr(exc, "errno", None)
            if code in _NACK:
                continue
            raise ScanError(f"I2C bus {getattr(bus, 'bus_id', '?')}: {exc}") from exc
        except Exception as exc:  # DeviceError subclasses carry errno too
            code = getattr(exc, "errno", None)
            if code in _NACK:
                continue
            raise ScanError(str(exc)) from exc
        rows.append(
            {"address": f"0x{addr:02x}", "status": "responds", "sensor": None, "part": hint}
        )
    return rows
