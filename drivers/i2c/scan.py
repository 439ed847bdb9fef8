"""Read-only I2C address probe, as `i2cdetect -y N` does it; the hub's `i2c-scan`.

Theory of operation
-------------------
i2cdetect's default ("auto") mode probes each address 0x08..0x77 with one transaction
that changes no device state: an SMBus *receive byte* (a read of one byte) for 0x30..0x37
and 0x50..0x5F, where EEPROMs and write-protect latches live and a quick write could
corrupt them (i2c-tools' warning about the AT24RF08), and an SMBus *quick write*
(address + W, no data) everywhere else, because some write-only parts (e.g. clock chips)
do not answer reads, and Sensirion parts NACK reads when no measurement is pending. An
ACK means present; ENXIO/EREMOTEIO/EIO (a NACK), ETIMEDOUT or EAGAIN (arbitration lost)
mean absent; EBUSY means a kernel driver owns the address (i2cdetect's "UU"): reported
`busy`, and the scan goes on. Any other error (the adapter vanished, permission denied)
would fail the same way at every address, so it ends the scan with that error.

Addresses the daemon itself drives are reported as `in_use` without probing: re-announcing
a known device adds nothing, and a stray transaction there could upset a driver (a quick
write in the middle of a Sensirion conversion is NACKed and would look like a fault; a
read would consume the measurement the driver is waiting for). That is the only thing
refused on a bus in use.

`probe(smbus, addr)` and `scan(smbus, ...)` are pure over an smbus-like object (real or
emulated); `scan_bus(bus, ...)` runs ONE probe per bus-worker job, so the probes queue in
FIFO order between the sensors' transactions and a running acquisition sees at most one
short transaction's delay per probe instead of a whole scan. `rows()` turns a result into
the hub's table ({address, status, sensor, part}); `format_table()` into i2cdetect's grid.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from drivers.i2c.bus import SMBusLike

__all__ = [
    "FIRST",
    "KNOWN_PARTS",
    "LAST",
    "ProbeResult",
    "ProbingBus",
    "format_table",
    "present",
    "probe",
    "rows",
    "scan",
    "scan_bus",
    "uses_read",
]

T = TypeVar("T")

FIRST = 0x08
LAST = 0x77
ProbeResult = Literal["present", "absent", "busy", "in_use"]

# errnos that mean "nobody answered at this address" (not "the adapter is broken")
ABSENT_ERRNOS = frozenset({errno.ENXIO, errno.EREMOTEIO, errno.EIO, errno.ETIMEDOUT, errno.EAGAIN})

# Parts a technician is likely to find, by address (a hint, not an identification).
KNOWN_PARTS: dict[int, str] = {
    0x3C: "ssd1306 display",
    0x40: "ina219 / htu21d",
    0x41: "ina219",
    0x44: "sht3x / sht4x / ina219",
    0x45: "sht3x / sht4x / ina219",
    0x46: "sht4x / ina219",
    0x48: "ads1115",
    0x49: "ads1115",
    0x4A: "ads1115",
    0x4B: "ads1115",
    0x50: "eeprom",
    0x68: "mpu6050 / rtc",
    0x69: "mpu6050",
    0x76: "bme280 / bmp280",
    0x77: "bme280 / bmp280",
}


@runtime_checkable
class ProbingBus(Protocol):
    """What `scan_bus` needs of a bus: run one job on its worker (drivers/i2c/bus.py)."""

    async def call_at(self, fn: Callable[[Any], T], addr: int, op: str) -> T: ...


def uses_read(addr: int) -> bool:
    """i2cdetect's auto mode: receive-byte for EEPROM ranges, quick write elsewhere."""
    return 0x30 <= addr <= 0x37 or 0x50 <= addr <= 0x5F


def probe(smbus: SMBusLike, addr: int) -> ProbeResult:
    """One read-only probe of one address. Raises OSError when the adapter itself fails."""
    try:
        if uses_read(addr):
            smbus.read_byte(addr)
        else:
            smbus.write_quick(addr)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "busy"
        if exc.errno in ABSENT_ERRNOS:
            return "absent"
        raise
    return "present"


def scan(
    smbus: SMBusLike, in_use: Collection[int] = (), first: int = FIRST, last: int = LAST
) -> dict[int, ProbeResult]:
    _check_range(first, last)
    return {a: ("in_use" if a in in_use else probe(smbus, a)) for a in range(first, last + 1)}


async def scan_bus(
    bus: ProbingBus, in_use: Collection[int] = (), first: int = FIRST, last: int = LAST
) -> dict[int, ProbeResult]:
    """Scan through the bus worker, one address per job (sensor reads interleave).

    An adapter-level failure (no such bus, permission) propagates as the bus's error
    (`I2CError` for `AsyncI2CBus`), naming the bus.
    """
    _check_range(first, last)
    out: dict[int, ProbeResult] = {}
    for a in range(first, last + 1):
        if a in in_use:
            out[a] = "in_use"
            continue
        out[a] = await bus.call_at(functools.partial(probe, addr=a), a, "probe")
    return out


def _check_range(first: int, last: int) -> None:
    if not 0x00 <= first <= last <= 0x7F:
        raise ValueError(f"scan range 0x{first:02x}..0x{last:02x} is not within 0x00..0x7f")


def present(result: Mapping[int, ProbeResult]) -> list[int]:
    return [a for a, r in result.items() if r in ("present", "in_use", "busy")]


_STATUS = {"present": "responds", "in_use": "in use", "busy": "busy"}


def rows(result: Mapping[int, ProbeResult], owners: Mapping[int, str]) -> list[dict[str, Any]]:
    """The `i2c-scan` table: one row per responding, in-use or kernel-owned address.

    status: `responds` (ACKed the probe), `in use` (a configured sensor's address, not
    probed; `sensor` names it), `busy` (a kernel driver owns it: i2cdetect's UU).
    """
    return [
        {
            "address": f"0x{a:02x}",
            "status": _STATUS[r],
            "sensor": owners.get(a),
            "part": KNOWN_PARTS.get(a),
        }
        for a, r in sorted(result.items())
        if r != "absent"
    ]


def format_table(result: Mapping[int, ProbeResult]) -> str:
    """The familiar i2cdetect grid: hex address if present, UU busy/in use, -- absent."""
    lines = ["     " + " ".join(f"{c:2x}" for c in range(16))]
    for row in range(0, 0x80, 0x10):
        cells = []
        for a in range(row, row + 16):
            r = result.get(a)
            cells.append(
                "  "
                if r is None
                else f"{a:02x}"
                if r == "present"
                else "UU"
                if r in ("busy", "in_use")
                else "--"
            )
        lines.append(f"{row:02x}: " + " ".join(cells))
    return "\n".join(lines)
