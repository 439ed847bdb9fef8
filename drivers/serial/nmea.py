"""NMEA 0183 GPS receivers: GGA, RMC and VTG sentences.

Theory of operation
-------------------
A receiver prints sentences like ``$GPGGA,123519,4807.038,N,...*47\\r\\n`` on its own,
typically once per second per type. `parse_sentence` (pure) takes one line and returns a
`NmeaSentence` (talker, type, readings) or raises `FrameError`:

- the checksum (XOR of the bytes between ``$`` and ``*``, two hex digits) is mandatory and
  verified: a sentence without one, or with a wrong one, is rejected (``checksum``);
- talker IDs: any two capital letters (GP GPS, GN multi-constellation, GL GLONASS, GA
  Galileo, GB/BD BeiDou, ...); proprietary ``$P...`` and sentence types other than GGA,
  RMC and VTG return None (ignored, counted);
- coordinates ``ddmm.mmmm`` / ``dddmm.mmmm`` with hemisphere become signed decimal degrees
  (S and W negative); minutes >= 60 or degrees out of range are syntax errors;
- an empty field means "not known" (no fix): that channel is simply absent. GGA with fix
  quality 0 and RMC with status ``V`` (void) report position with UNCERTAIN quality.

Channels: lat_deg, lon_deg, alt_m (GGA, above mean sea level), speed_kn and course_deg
(RMC, VTG; true course), fix_quality (GGA: 0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK
float, 6 dead reckoning, ...), satellites (GGA, in use).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from drivers.base import ChannelInfo, Quality, Reading, Resources
from drivers.errors import FrameError
from drivers.registry import SensorSpec
from drivers.serial.common import (
    FramedStreamSensor,
    SerialSensorConfig,
    stream_frames,
)

__all__ = [
    "CHANNELS",
    "SENSOR",
    "NmeaConfig",
    "NmeaSensor",
    "NmeaSentence",
    "checksum",
    "parse_sentence",
]

CHANNELS = (
    ChannelInfo("lat_deg", "deg"),
    ChannelInfo("lon_deg", "deg"),
    ChannelInfo("alt_m", "m"),
    ChannelInfo("speed_kn", "kn"),
    ChannelInfo("course_deg", "deg"),
    ChannelInfo("fix_quality", ""),
    ChannelInfo("satellites", ""),
)

MAX_SENTENCE_BYTES = 128  # NMEA 0183 says 82 incl. $ and CRLF; receivers exceed it a little


class NmeaConfig(SerialSensorConfig, tag="nmea", kw_only=True):
    baudrate: int = 9600
    rate_hz: float = 1.0  # expected sentence epochs per second (for stall detection)
    read_timeout_ms: int = 3000  # silence longer than this (and 2 periods) is a stall
    sentences: list[Literal["GGA", "RMC", "VTG"]] = msgspec.field(
        default_factory=lambda: ["GGA", "RMC", "VTG"]
    )


@dataclass(frozen=True, slots=True)
class NmeaSentence:
    talker: str
    type: str
    readings: tuple[Reading, ...]


def checksum(body: bytes) -> int:
    """XOR of every byte between '$' and '*'."""
    c = 0
    for b in body:
        c ^= b
    return c


def _coord(value: str, hemi: str, deg_digits: int, limit: float, name: str) -> float | None:
    if not value and not hemi:
        return None
    if not value or hemi not in ("N", "S", "E", "W"):
        raise FrameError("syntax", f"{name}: expected value and hemisphere, got {value!r},{hemi!r}")
    head = value.partition(".")[0]
    if len(head) != deg_digits + 2 or not head.isdigit():
        raise FrameError("syntax", f"{name}: expected {'d' * deg_digits}mm.mmmm, got {value!r}")
    try:
        deg = int(head[:deg_digits])
        minutes = float(value[deg_digits:])
    except ValueError:
        raise FrameError("syntax", f"{name}: not a number: {value!r}") from None
    if not 0.0 <= minutes < 60.0:
        raise FrameError("syntax", f"{name}: minutes must be < 60, got {minutes}")
    v = deg + minutes / 60.0
    if v > limit:
        raise FrameError("syntax", f"{name}: {v:.5f} exceeds {limit}")
    if (name == "lat" and hemi not in ("N", "S")) or (name == "lon" and hemi not in ("E", "W")):
        raise FrameError("syntax", f"{name}: bad hemisphere {hemi!r}")
    return -v if hemi in ("S", "W") else v


def _num(s: str, name: str) -> float | None:
    if s == "":
        return None
    try:
        v = float(s)
    except ValueError:
        raise FrameError("syntax", f"{name}: not a number: {s[:16]!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise FrameError("syntax", f"{name}: not finite: {s[:16]!r}")
    return v


def _int(s: str, name: str) -> int | None:
    if s == "":
        return None
    if not s.isdigit() or len(s) > 4:
        raise FrameError("syntax", f"{name}: expected an integer, got {s[:16]!r}")
    return int(s)


def _field(f: list[str], i: int) -> str:
    return f[i] if i < len(f) else ""


def parse_sentence(line: bytes) -> NmeaSentence | None:
    """Parse one sentence (with or without CR/LF). None for types we do not decode."""
    line = line.strip(b"\r\n ")
    if len(line) > MAX_SENTENCE_BYTES:
        raise FrameError("syntax", f"sentence longer than {MAX_SENTENCE_BYTES} bytes")
    if not line.startswith(b"$"):
        raise FrameError("syntax", f"expected '$' at start, got {line[:8]!r}")
    star = line.rfind(b"*")
    if star < 0:
        raise FrameError("checksum", "missing '*hh' checksum")
    body, tail = line[1:star], line[star + 1 :]
    if len(tail) != 2:
        raise FrameError("checksum", f"expected two hex digits after '*', got {tail[:8]!r}")
    try:
        want = int(tail.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise FrameError("checksum", f"not hex: {tail!r}") from None
    got = checksum(body)
    if got != want:
        raise FrameError("checksum", f"expected {want:02X} (sent), computed {got:02X}")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("syntax", "non-ASCII bytes in sentence") from None
    fields = text.split(",")
    addr = fields[0]
    if addr.startswith("P"):
        return None  # proprietary
    if len(addr) != 5 or not addr.isalpha() or not addr.isupper():
        raise FrameError("syntax", f"expected talker+type like GPGGA, got {addr[:10]!r}")
    talker, kind = addr[:2], addr[2:]
    if kind == "GGA":
        readings = _gga(fields)
    elif kind == "RMC":
        readings = _rmc(fields)
    elif kind == "VTG":
        readings = _vtg(fields)
    else:
        return None
    return NmeaSentence(talker, kind, tuple(readings))


def _position(f: list[str], i: int, q: Quality) -> list[Reading]:
    """lat,N/S,lon,E/W from field i on -> [lat_deg, lon_deg], or [] when the fix is empty."""
    lat = _coord(f[i], f[i + 1], 2, 90.0, "lat")
    lon = _coord(f[i + 2], f[i + 3], 3, 180.0, "lon")
    if lat is None or lon is None:
        return []
    return [Reading("lat_deg", lat, q), Reading("lon_deg", lon, q)]


def _gga(f: list[str]) -> list[Reading]:
    # GGA,time,lat,N,lon,E,quality,numsats,hdop,alt,M,geoid,M,age,station
    if len(f) < 10:
        raise FrameError("syntax", f"GGA: expected >= 10 fields, got {len(f)}")
    quality = _int(f[6], "fix_quality")
    q = Quality.GOOD if quality not in (None, 0) else Quality.UNCERTAIN
    out = _position(f, 2, q)
    alt = _num(f[9], "alt_m")
    if alt is not None:
        if _field(f, 10) not in ("M", ""):
            raise FrameError("syntax", f"GGA altitude unit: expected M, got {f[10]!r}")
        out.append(Reading("alt_m", alt, q))
    if quality is not None:
        out.append(Reading("fix_quality", float(quality)))
    sats = _int(f[7], "satellites")
    if sats is not None:
        out.append(Reading("satellites", float(sats)))
    return out


def _rmc(f: list[str]) -> list[Reading]:
    # RMC,time,status,lat,N,lon,E,speed_kn,course,date,magvar,E[,mode[,navstatus]]
    if len(f) < 10:
        raise FrameError("syntax", f"RMC: expected >= 10 fields, got {len(f)}")
    status = f[2]
    if status not in ("A", "V", ""):
        raise FrameError("syntax", f"RMC status: expected A or V, got {status[:4]!r}")
    q = Quality.GOOD if status == "A" else Quality.UNCERTAIN
    out = _position(f, 3, q)
    speed = _num(f[7], "speed_kn")
    if speed is not None:
        out.append(Reading("speed_kn", speed, q))
    course = _num(f[8], "course_deg")
    if course is not None:
        out.append(Reading("course_deg", course, q))
    return out


def _vtg(f: list[str]) -> list[Reading]:
    # VTG,course_true,T,course_mag,M,speed_kn,N,speed_kmh,K[,mode]
    # (old receivers omit the T/M/N/K unit letters: VTG,course_true,course_mag,kn,kmh)
    if len(f) >= 9:
        course_s, speed_s = f[1], f[5]
        mode = _field(f, 9)
    elif len(f) == 5:
        course_s, speed_s, mode = f[1], f[3], ""
    else:
        raise FrameError("syntax", f"VTG: expected 5 or >= 9 fields, got {len(f)}")
    q = Quality.UNCERTAIN if mode == "N" else Quality.GOOD
    out: list[Reading] = []
    course = _num(course_s, "course_deg")
    if course is not None:
        out.append(Reading("course_deg", course, q))
    speed = _num(speed_s, "speed_kn")
    if speed is not None:
        out.append(Reading("speed_kn", speed, q))
    return out


class NmeaSensor(FramedStreamSensor):
    def __init__(self, cfg: NmeaConfig, resources: Resources) -> None:
        super().__init__(cfg, resources, b"\n", MAX_SENTENCE_BYTES + 2)
        self.cfg = cfg
        self.channels = list(CHANNELS)
        self._wanted = set(cfg.sentences)
        self.counters: dict[str, int] = {
            "frames": 0,
            "frame_errors": 0,
            "checksum_errors": 0,
            "syntax_errors": 0,
            "ignored": 0,
            "resyncs": 0,
        }

    def feed_line(self, raw: bytes) -> Sequence[Reading] | None:
        self.counters["resyncs"] = self.framer.resyncs
        try:
            s = parse_sentence(raw)
        except FrameError as exc:
            self.counters["frame_errors"] += 1
            self.counters["checksum_errors" if exc.kind == "checksum" else "syntax_errors"] += 1
            return None
        if s is None or s.type not in self._wanted:
            self.counters["ignored"] += 1
            return None
        self.counters["frames"] += 1
        return s.readings

    def frames(self) -> AsyncIterator[Sequence[Reading]]:
        return stream_frames(self.pump, self.feed_line)


def _factory(cfg: NmeaConfig, resources: Resources) -> NmeaSensor:
    return NmeaSensor(cfg, resources)


SENSOR = SensorSpec(
    name="nmea",
    config_type=NmeaConfig,
    factory=_factory,
    transport="serial",
    summary="NMEA 0183 GPS receiver (GGA, RMC, VTG; checksum verified)",
)
