"""1-Wire temperature probes (DS18B20 and kin) through the kernel's w1 sysfs interface
(driver name `ds18b20`).

Theory of operation
-------------------
The kernel's w1 bus master (`dtoverlay=w1-gpio` on a Raspberry Pi) enumerates the probes
on the wire and its w1_therm driver makes each one a directory named by its ROM id,
`/sys/bus/w1/devices/28-0316a2791aff` (family 0x28 = DS18B20; 0x10 DS18S20, 0x22 DS1822,
0x3B DS1825, 0x42 DS28EA00). Reading its `w1_slave` file makes the kernel start a
conversion, wait for it (up to 750 ms at 12-bit resolution) and read the 9-byte
scratchpad, which it prints with its own CRC verdict and the temperature in m°C:

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

Newer kernels also offer `temperature` (just the m°C, an I/O error on a CRC failure);
`interface: temperature` reads that instead (no scratchpad, so no check of our own).

Pure part: `parse_w1_slave()` returns the scratchpad bytes, the kernel's verdict and the
value; `crc8()` is the Dallas/Maxim CRC (x^8 + x^5 + x^4 + 1, reflected), checked here as
well as by the kernel; `PowerOnFilter` handles 85.0 °C. A CRC failure (`crc=.. NO`, a
noisy or long cable) is a `FrameError("crc")`: counted by the hub and skipped, the next
read is likely fine. An all-zero scratchpad passes the CRC (CRC of zeros is zero) yet is
what a missing pull-up or a shorted data line reads: `FrameError("no_data")`.

85.0 °C: the scratchpad's power-on value is 0x0550 = +85.0 °C, and a probe that browned
out (a long cable on parasite power, a loose VDD) reports exactly that before its first
conversion. A real 85.0 °C is rare on a gateway but not impossible (a boiler), so the
value is not dropped forever: `PowerOnFilter` refuses an 85.0 (`FrameError("power_on")`,
counted in `power_on_values`) unless the previous accepted reading was within 5 °C of it
(a process really that hot, moving smoothly) or it repeated on `power_on_repeats`
consecutive reads (default 3: a brown-out happens once; a real 85.0 stays).

Missing probe: its directory disappears when the master no longer finds it (unplugged,
broken cable), so reads raise `DeviceError` naming the id and the sysfs root, and the hub
marks the sensor failed after `fail_after` reads and re-probes it. `device` may be left
out when exactly one probe is on the wire.

Reads are blocking file I/O taking up to ~750 ms (the conversion), so they run in a thread;
a read still in its thread when the hub's timeout fired is awaited by the next read
instead of starting a second conversion behind it. `sysfs_root` is configurable so the
tests run against a directory tree shaped like sysfs.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from collections.abc import Sequence
from typing import Any, Literal

from drivers.base import ChannelInfo, Reading, Resources, SensorConfig
from drivers.errors import DeviceError, FrameError
from drivers.registry import SensorSpec

__all__ = [
    "DS18B20",
    "SENSOR",
    "DS18B20Config",
    "PowerOnFilter",
    "W1Reading",
    "crc8",
    "list_probes",
    "parse_w1_slave",
]

W1_ROOT = "/sys/bus/w1/devices"
THERM_FAMILIES = {
    "10": "DS18S20",
    "22": "DS1822",
    "28": "DS18B20",
    "3b": "DS1825",
    "42": "DS28EA00",
}
POWER_ON_MILLI_C = 85000
NEAR_POWER_ON_MILLI_C = 5000
_ID_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{12}$")


def crc8(data: bytes) -> int:
    """Dallas/Maxim 1-Wire CRC-8 (poly 0x31 reflected = 0x8C, init 0)."""
    crc = 0
    for b in data:
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


class W1Reading:
    """One parsed `w1_slave` text."""

    __slots__ = ("crc_ok", "milli_c", "scratchpad")

    def __init__(self, scratchpad: bytes, crc_ok: bool, milli_c: int) -> None:
        self.scratchpad = scratchpad
        self.crc_ok = crc_ok
        self.milli_c = milli_c


def parse_w1_slave(text: str) -> W1Reading:
    """Parse w1_therm's two lines; FrameError("syntax") if they are not that shape."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) < 2 or ": crc=" not in lines[0] or " t=" not in lines[1]:
        raise FrameError(
            "syntax", f"w1_slave: expected '... crc=XX YES|NO' and '... t=N', got {text!r:.80}"
        )
    head, verdict = lines[0].split(": crc=", 1)
    try:
        pad = bytes(int(x, 16) for x in head.split())
        milli_c = int(lines[1].rsplit("t=", 1)[1])
    except ValueError as exc:
        raise FrameError("syntax", f"w1_slave: {exc}: {text!r:.80}") from None
    if len(pad) != 9:
        raise FrameError("syntax", f"w1_slave: expected 9 scratchpad bytes, got {len(pad)}")
    return W1Reading(pad, verdict.split()[-1] == "YES", milli_c)


def check(r: W1Reading) -> int:
    """The reading's m°C after the CRC and no-data checks (FrameError otherwise)."""
    if not r.crc_ok or crc8(r.scratchpad) != 0:
        raise FrameError(
            "crc", f"scratchpad {r.scratchpad.hex(' ')}: CRC 0x{r.scratchpad[8]:02x} does not match"
        )
    if not any(r.scratchpad):
        raise FrameError("no_data", "scratchpad all zeros: data line shorted or no pull-up?")
    return r.milli_c


class PowerOnFilter:
    """Refuses the 85.0 °C power-on value unless it is plausibly real (module docstring)."""

    def __init__(self, repeats: int = 3) -> None:
        self.repeats = repeats
        self.last_accepted: int | None = None
        self._run = 0

    def accept(self, milli_c: int) -> bool:
        if milli_c != POWER_ON_MILLI_C:
            self._run = 0
            self.last_accepted = milli_c
            return True
        self._run += 1
        near = (
            self.last_accepted is not None
            and abs(self.last_accepted - POWER_ON_MILLI_C) <= NEAR_POWER_ON_MILLI_C
        )
        if near or self._run >= self.repeats:
            self.last_accepted = milli_c
            return True
        return False


def list_probes(root: str = W1_ROOT) -> list[str]:
    """The temperature probes the w1 master enumerated (ids with a known family)."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(n for n in names if _ID_RE.match(n) and n[:2] in THERM_FAMILIES)


class DS18B20Config(SensorConfig, tag="ds18b20"):
    """```yaml
    - id: tank_temp
      driver: ds18b20
      device: 28-0316a2791aff   # the probe's ROM id; omit when exactly one is on the wire
      interface: w1_slave       # w1_slave (CRC checked here too) | temperature
      power_on_repeats: 3       # an 85.0 °C reading counts only after this many in a row
      sysfs_root: /sys/bus/w1/devices
      rate_hz: 0.5              # a 12-bit conversion takes 750 ms
      read_timeout_ms: 2000
    ```"""

    device: str | None = None
    interface: Literal["w1_slave", "temperature"] = "w1_slave"
    power_on_repeats: int = 3
    sysfs_root: str = W1_ROOT
    rate_hz: float = 0.5
    read_timeout_ms: int = 2000

    def __post_init__(self) -> None:
        if self.device is not None and not _ID_RE.match(self.device):
            raise ValueError(
                f"device {self.device!r}: expected a w1 ROM id like 28-0316a2791aff "
                "(lowercase hex, as in /sys/bus/w1/devices)"
            )
        if self.power_on_repeats < 1:
            raise ValueError(f"power_on_repeats: expected >= 1, got {self.power_on_repeats}")


class DS18B20:
    mode: Literal["poll"] = "poll"
    channels: Sequence[ChannelInfo] = (ChannelInfo("temperature", "°C"),)

    def __init__(self, cfg: DS18B20Config) -> None:
        self.cfg = cfg
        self.counters = {"reads": 0, "crc_errors": 0, "power_on_values": 0, "missing": 0}
        self.filter = PowerOnFilter(cfg.power_on_repeats)
        self.device: str | None = cfg.device
        self._inflight: asyncio.Future[str] | None = None

    @property
    def where(self) -> str:
        return f"w1 {self.device or '?'} under {self.cfg.sysfs_root}"

    def _resolve(self) -> str:
        if self.cfg.device is not None:
            if not os.path.isdir(os.path.join(self.cfg.sysfs_root, self.cfg.device)):
                self.counters["missing"] += 1
                raise DeviceError(
                    f"{self.where}: no such probe (wiring? dtoverlay=w1-gpio? found: "
                    f"{', '.join(list_probes(self.cfg.sysfs_root)) or 'none'})"
                )
            return self.cfg.device
        found = list_probes(self.cfg.sysfs_root)
        if len(found) != 1:
            self.counters["missing"] += 1
            raise DeviceError(
                f"w1 under {self.cfg.sysfs_root}: `device` omitted, so expected exactly one "
                f"probe, found {len(found)}: {', '.join(found) or 'none'}"
            )
        return found[0]

    def _read_file(self) -> str:
        if self.device is None:
            self.device = self._resolve()
        path = os.path.join(self.cfg.sysfs_root, self.device, self.cfg.interface)
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            self.counters["missing"] += 1
            raise DeviceError(f"{self.where}: probe gone ({path} missing)") from None
        except OSError as exc:
            if exc.errno == errno.EIO and self.cfg.interface == "temperature":
                # w1_therm's `temperature` reports a failed CRC as EIO
                raise FrameError("crc", f"{self.where}: kernel reports a CRC failure") from None
            raise DeviceError(f"{self.where}: {path}: {exc.strerror or exc}") from None

    async def open(self) -> None:
        self.device = self.cfg.device
        self.device = await asyncio.to_thread(self._resolve)

    async def read(self) -> Sequence[Reading]:
        fut = self._inflight
        if fut is None or fut.done():
            # the previous read's thread finished (or there was none): start a new one
            fut = asyncio.ensure_future(asyncio.to_thread(self._read_file))
            self._inflight = fut
        text = await asyncio.shield(fut)
        try:
            milli_c = self._value(text)
        except FrameError as exc:
            if exc.kind == "crc":
                self.counters["crc_errors"] += 1
            raise
        if not self.filter.accept(milli_c):
            self.counters["power_on_values"] += 1
            raise FrameError(
                "power_on", f"{self.where}: 85.0 °C is the power-on value (probe reset?)"
            )
        self.counters["reads"] += 1
        return (Reading("temperature", milli_c / 1000.0),)

    def _value(self, text: str) -> int:
        if self.cfg.interface == "temperature":
            try:
                return int(text.strip())
            except ValueError:
                raise FrameError("syntax", f"{self.where}: temperature {text!r:.40}") from None
        return check(parse_w1_slave(text))

    async def close(self) -> None:
        fut, self._inflight = self._inflight, None
        if fut is not None and not fut.done():
            # the thread cannot be interrupted; let it finish without a waiter
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _factory(cfg: Any, resources: Resources) -> DS18B20:
    return DS18B20(cfg)


SENSOR = SensorSpec(
    name="ds18b20",
    config_type=DS18B20Config,
    factory=_factory,
    transport="other",
    summary="DS18B20 (and DS18S20/DS1822/DS1825) 1-Wire temperature (°C) via the kernel's w1 sysfs",
)
