"""Read-only I2C address probe, as `i2cdetect -y N` does it.

Theory of operation
-------------------
i2cdetect's default ("auto") mode probes each address 0x08..0x77 with one transaction
that changes no device state: an SMBus *receive byte* (a read of one byte) for 0x30..0x37
and 0x50..0x5F, where EEPROMs and write-protect latches live and a quick write could
corrupt them (i2c-tools' warning about the AT24RF08), and an SMBus *quick write*
(address + W, no data) everywhere else, because some write-only parts (e.g. clock chips)
do not answer reads. An ACK means present; ENXIO/EREMOTEIO/EIO (a NACK) or ETIMEDOUT mean
absent; EBUSY means a kernel driver owns the address (i2cdetect's "UU"), which is never
probed.

Addresses the daemon itself drives are reported as `in_use` without probing: the probe
is harmless to them (each probe is one transaction queued on the bus worker between the
drivers' transactions), but re-announcing a known device adds nothing and a quick write
in the middle of a Sensirion conversion would be NACKed and look like a fault. That is
the only thing refused on a bus in use.

`probe(smbus, addr)` and `scan(smbus, ...)` are pure over an smbus-like object (real or
emulated); `scan_bus(bus, ...)` runs one probe per worker job so sensor reads on the same
bus interleave with the scan instead of waiting for all of it.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Collection
from typing import Literal

from drivers.i2c.bus import AsyncI2CBus, SMBusLike

__all__ = ["FIRST", "LAST", "ProbeResult", "format_table", "probe", "scan", "scan_bus"]

FIRST = 0x08
LAST = 0x77
ProbeResult = Literal["present", "absent", "busy", "in_use"]


def uses_read(addr: int) -> bool:
    """i2cdetect's auto mode: receive-byte for EEPROM ranges, quick write elsewhere."""
    return 0x30 <= addr <= 0x37 or 0x50 <= addr <= 0x5F


def probe(smbus: SMBusLike, addr: int) -> ProbeResult:
    """One read-only probe of one address."""
    try:
        if uses_read(addr):
            smbus.read_byte(addr)
        else:
            smbus.write_quick(addr)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "busy"
        return "absent"
    return "present"


def scan(
    smbus: SMBusLike, in_use: Collection[int] = (), first: int = FIRST, last: int = LAST
) -> dict[int, ProbeResult]:
    _check_range(first, last)
    return {a: ("in_use" if a in in_use else probe(smbus, a)) for a in range(first, last + 1)}


async def scan_bus(
    bus: AsyncI2CBus, in_use: Collection[int] = (), first: int = FIRST, last: int = LAST
) -> dict[int, ProbeResult]:
    """Scan through the bus worker, one address per job (sensor reads interleave)."""
    _check_range(first, last)
    out: dict[int, ProbeResult] = {}
    for a in range(first, last + 1):
        if a in in_use:
            out[a] = "in_use"
            continue
        # probe() turns a NACK into "absent"; an I2CError here is the adapter itself
        # failing (e.g. /dev/i2c-N missing) and propagates.
        out[a] = await bus.call_at(functools.partial(probe, addr=a), a, "probe")
    return out


def _check_range(first: int, last: int) -> None:
    if not 0x00 <= first <= last <= 0x7F:
        raise ValueError(f"scan range 0x{first:02x}..0x{last:02x} is not within 0x00..0x7f")


def present(result: dict[int, ProbeResult]) -> list[int]:
    return [a for a, r in result.items() if r in ("present", "in_use", "busy")]


def format_table(result: dict[int, ProbeResult]) -> str:
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
