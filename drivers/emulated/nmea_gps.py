"""NMEA 0183 GPS receiver emulator: real GGA/RMC/VTG sentences on a pty.

`fix(t)` (t = seconds since start) returns a fix object with the attributes of the
scenario's `GpsFix` (lat_deg, lon_deg, alt_m, speed_kn, course_deg, fix_quality,
satellites, utc). Each epoch (1/rate_hz) the emulator writes one sentence of each
configured type, formatted as a u-blox receiver does (``ddmm.mmmmm``, checksum, CRLF),
through the base class so corruption, stalls and unplugging apply per sentence.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from drivers.emulated.serial import Faults, PeriodicSerialDevice

__all__ = [
    "GpsFixLike",
    "NmeaGpsEmulator",
    "format_gga",
    "format_rmc",
    "format_vtg",
    "with_checksum",
]


class GpsFixLike(Protocol):
    @property
    def lat_deg(self) -> float: ...
    @property
    def lon_deg(self) -> float: ...
    @property
    def alt_m(self) -> float: ...
    @property
    def speed_kn(self) -> float: ...
    @property
    def course_deg(self) -> float: ...
    @property
    def fix_quality(self) -> int: ...
    @property
    def satellites(self) -> int: ...
    @property
    def utc(self) -> dt.datetime: ...


def with_checksum(body: str) -> bytes:
    """'GPGGA,...' -> b'$GPGGA,...*hh\\r\\n'."""
    c = 0
    for b in body.encode("ascii"):
        c ^= b
    return f"${body}*{c:02X}\r\n".encode("ascii")


def _lat(v: float) -> tuple[str, str]:
    a = abs(v)
    d = int(a)
    m = (a - d) * 60.0
    if round(m, 5) >= 60.0:  # 59.999996 rounds to 60.00000: carry into the degrees
        d, m = d + 1, 0.0
    return f"{d:02d}{m:08.5f}", ("N" if v >= 0 else "S")


def _lon(v: float) -> tuple[str, str]:
    a = abs(v)
    d = int(a)
    m = (a - d) * 60.0
    if round(m, 5) >= 60.0:
        d, m = d + 1, 0.0
    return f"{d:03d}{m:08.5f}", ("E" if v >= 0 else "W")


def _time(t: dt.datetime) -> str:
    return f"{t.hour:02d}{t.minute:02d}{t.second:02d}.{t.microsecond // 10000:02d}"


def format_gga(fix: GpsFixLike, talker: str = "GP") -> bytes:
    lat, ns = _lat(fix.lat_deg)
    lon, ew = _lon(fix.lon_deg)
    body = (
        f"{talker}GGA,{_time(fix.utc)},{lat},{ns},{lon},{ew},{int(fix.fix_quality)},"
        f"{int(fix.satellites):02d},0.9,{fix.alt_m:.1f},M,46.9,M,,"
    )
    return with_checksum(body)


def format_rmc(fix: GpsFixLike, talker: str = "GP") -> bytes:
    lat, ns = _lat(fix.lat_deg)
    lon, ew = _lon(fix.lon_deg)
    status = "A" if fix.fix_quality > 0 else "V"
    d = fix.utc
    body = (
        f"{talker}RMC,{_time(d)},{status},{lat},{ns},{lon},{ew},{fix.speed_kn:.3f},"
        f"{fix.course_deg:.2f},{d.day:02d}{d.month:02d}{d.year % 100:02d},,,A"
    )
    return with_checksum(body)


def format_vtg(fix: GpsFixLike, talker: str = "GP") -> bytes:
    kmh = fix.speed_kn * 1.852
    body = f"{talker}VTG,{fix.course_deg:.2f},T,,M,{fix.speed_kn:.3f},N,{kmh:.3f},K,A"
    return with_checksum(body)


_FORMATTERS = {"GGA": format_gga, "RMC": format_rmc, "VTG": format_vtg}


class NmeaGpsEmulator(PeriodicSerialDevice):
    def __init__(
        self,
        link: str | os.PathLike[str],
        *,
        fix: Callable[[float], GpsFixLike],
        rate_hz: float = 1.0,
        talker: str = "GP",
        sentences: Sequence[str] = ("GGA", "RMC", "VTG"),
        seed: int = 0,
        faults: Faults | None = None,
        dropout: Callable[[float], bool] | None = None,
    ) -> None:
        super().__init__(link, rate_hz=rate_hz, seed=seed, faults=faults, dropout=dropout)
        self.fix = fix
        self.talker = talker
        self.sentences = list(sentences)

    def frames_at(self, t: float) -> Sequence[bytes]:
        f = self.fix(t)
        return [_FORMATTERS[s](f, self.talker) for s in self.sentences]
