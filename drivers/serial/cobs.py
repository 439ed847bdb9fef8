"""Binary framed devices: COBS packets with CRC-16 and a declared field layout.

Theory of operation
-------------------
Custom microcontroller boards often send fixed-layout binary records. We frame them with
COBS (Consistent Overhead Byte Stuffing, Cheshire & Baker 1999): the encoded packet
contains no 0x00, so 0x00 is an unambiguous delimiter and a receiver that starts
mid-stream, or loses bytes, resynchronises at the next 0x00. Overhead is one byte per 254.

Packet on the wire: ``COBS(payload || crc16(payload)) || 0x00``.
The CRC is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR;
check value 0x29B1 for "123456789"): the most common 16-bit CRC in MCU libraries
(STM32 HAL, Zephyr `crc16_ccitt` variants, many Arduino sketches), so firmware authors can
reuse what they have. It is appended in `crc_byte_order` (default big-endian, the order
the CRC is usually written MSB first; set "little" for firmware that memcpy's a uint16
from a little-endian MCU).

The payload is decoded by the declared layout (`fields`: name, type u8/i8/u16/i16/u32/i32
/f32, scale, offset, unit; `endian` little or big; an optional leading `packet_type` byte
to ignore other record kinds). A payload of the wrong length, a bad CRC or a COBS
violation is a `FrameError`, counted and skipped. Everything here except `CobsSensor` is
pure.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import msgspec

from drivers.base import ChannelInfo, Quality, Reading, Resources
from drivers.errors import FrameError
from drivers.registry import SensorSpec
from drivers.serial.common import (
    FramedStreamSensor,
    SerialSensorConfig,
    check_serial_keys,
    stream_frames,
)

__all__ = [
    "SENSOR",
    "CobsConfig",
    "CobsField",
    "CobsLayout",
    "CobsSensor",
    "cobs_decode",
    "cobs_encode",
    "crc16_ccitt_false",
    "encode_packet",
]

FieldType = Literal["u8", "i8", "u16", "i16", "u32", "i32", "f32"]
_CODES = {"u8": "B", "i8": "b", "u16": "H", "i16": "h", "u32": "I", "i32": "i", "f32": "f"}


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode (without the trailing 0x00 delimiter), canonical form."""
    out = bytearray()
    block = bytearray()
    full = False  # the last thing emitted was a full 254-byte block (code 0xFF)
    for b in data:
        if b == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
            full = False
        else:
            block.append(b)
            full = False
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
                full = True
    if not full:  # a full block at the very end needs no empty trailer block
        out.append(len(block) + 1)
        out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Decode one COBS frame (delimiter removed). FrameError("cobs") if malformed."""
    out = bytearray()
    i = 0
    n = len(data)
    if n == 0:
        raise FrameError("cobs", "empty frame")
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError("cobs", f"zero byte inside frame at offset {i}")
        end = i + code
        if end > n:
            raise FrameError("cobs", f"code {code} at offset {i} overruns the frame ({n} bytes)")
        block = data[i + 1 : end]
        if 0 in block:
            raise FrameError("cobs", "zero byte inside frame")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def crc16_ccitt_bitwise(data: bytes) -> int:
    """Bit-at-a-time reference of CRC-16/CCITT-FALSE (the table version is used)."""
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _crc_table() -> list[int]:
    t = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
        t.append(c)
    return t


_TABLE = _crc_table()


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE, table driven."""
    crc = 0xFFFF
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[(crc >> 8) ^ b]
    return crc


class CobsField(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    type: FieldType
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""


class CobsConfig(SerialSensorConfig, tag="cobs", kw_only=True):
    baudrate: int = 115200
    fields: list[CobsField] = msgspec.field(default_factory=list)
    endian: Literal["little", "big"] = "little"
    crc_byte_order: Literal["big", "little"] = "big"
    packet_type: int | None = None  # first payload byte must equal this (and is skipped)
    max_packet_bytes: int = 256

    def __post_init__(self) -> None:
        check_serial_keys(self)
        if not self.fields:
            raise ValueError("fields: expected at least one field (name, type, scale, unit)")
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"fields: duplicate name(s) {dup}")
        if self.packet_type is not None and not 0 <= self.packet_type <= 255:
            raise ValueError(f"packet_type: expected 0..255, got {self.packet_type}")
        for f in self.fields:
            if not math.isfinite(f.scale) or not math.isfinite(f.offset):
                raise ValueError(f"fields[{f.name}]: scale and offset must be finite")
        layout = CobsLayout(self.fields, self.endian, self.packet_type)
        if layout.payload_size + 2 + 2 > self.max_packet_bytes:
            raise ValueError(
                f"max_packet_bytes: {self.max_packet_bytes} is smaller than the "
                f"encoded packet ({layout.payload_size} payload + CRC + overhead)"
            )


class CobsLayout:
    """Pure codec for one packet layout."""

    def __init__(
        self,
        fields: Sequence[CobsField],
        endian: str = "little",
        packet_type: int | None = None,
        crc_byte_order: str = "big",
    ) -> None:
        self.fields = list(fields)
        self.packet_type = packet_type
        self.crc_byte_order: Literal["big", "little"] = (
            "little" if crc_byte_order == "little" else "big"
        )
        prefix = "<" if endian == "little" else ">"
        self.struct = struct.Struct(prefix + "".join(_CODES[f.type] for f in self.fields))
        self.payload_size = self.struct.size + (1 if packet_type is not None else 0)

    def decode(self, frame: bytes) -> list[Reading]:
        """One COBS frame (delimiter removed) -> readings. FrameError on any defect."""
        raw = cobs_decode(frame)
        if len(raw) < 3:
            raise FrameError("length", f"expected {self.payload_size} + 2 bytes, got {len(raw)}")
        payload, crc_b = raw[:-2], raw[-2:]
        got = int.from_bytes(crc_b, self.crc_byte_order)
        want = crc16_ccitt_false(payload)
        if got != want:
            raise FrameError("crc", f"CRC-16/CCITT-FALSE expected {want:04X}, got {got:04X}")
        if self.packet_type is not None:
            if payload[0] != self.packet_type:
                raise FrameError(
                    "packet_type", f"expected type {self.packet_type}, got {payload[0]}"
                )
            payload = payload[1:]
        if len(payload) != self.struct.size:
            raise FrameError(
                "length", f"expected a {self.struct.size}-byte payload, got {len(payload)}"
            )
        out = []
        for f, v in zip(self.fields, self.struct.unpack(payload), strict=True):
            value = float(v) * f.scale + f.offset
            if math.isfinite(value):
                out.append(Reading(f.name, value))
            else:
                out.append(Reading(f.name, math.nan, Quality.BAD))
        return out

    def encode(self, values: Sequence[float]) -> bytes:
        """Raw field values (before scale) -> a wire packet incl. the 0x00 delimiter."""
        conv = [
            float(v) if f.type == "f32" else round(v)
            for f, v in zip(self.fields, values, strict=True)
        ]
        payload = self.struct.pack(*conv)
        if self.packet_type is not None:
            payload = bytes([self.packet_type]) + payload
        return encode_packet(payload, self.crc_byte_order)


def encode_packet(payload: bytes, crc_byte_order: Literal["big", "little"] = "big") -> bytes:
    body = payload + crc16_ccitt_false(payload).to_bytes(2, crc_byte_order)
    return cobs_encode(body) + b"\x00"


class CobsSensor(FramedStreamSensor):
    def __init__(self, cfg: CobsConfig, resources: Resources) -> None:
        super().__init__(cfg, resources, b"\x00", cfg.max_packet_bytes)
        self.cfg = cfg
        self.layout = CobsLayout(cfg.fields, cfg.endian, cfg.packet_type, cfg.crc_byte_order)
        self.channels = [ChannelInfo(f.name, f.unit) for f in cfg.fields]
        self.counters: dict[str, int] = {
            "frames": 0,
            "frame_errors": 0,
            "crc_errors": 0,
            "cobs_errors": 0,
            "length_errors": 0,
            "other_type": 0,
            "resyncs": 0,
        }

    def feed_frame(self, raw: bytes) -> list[Reading] | None:
        self.counters["resyncs"] = self.framer.resyncs
        if not raw:
            return None  # back-to-back delimiters: idle fill, not an error
        try:
            readings = self.layout.decode(raw)
        except FrameError as exc:
            if exc.kind == "packet_type":
                self.counters["other_type"] += 1
                return None
            self.counters["frame_errors"] += 1
            key = {"crc": "crc_errors", "cobs": "cobs_errors"}.get(exc.kind, "length_errors")
            self.counters[key] += 1
            return None
        self.counters["frames"] += 1
        return readings

    def frames(self) -> AsyncIterator[Sequence[Reading]]:
        return stream_frames(self.pump, self.feed_frame)


def _factory(cfg: CobsConfig, resources: Resources) -> CobsSensor:
    return CobsSensor(cfg, resources)


SENSOR = SensorSpec(
    name="cobs",
    config_type=CobsConfig,
    factory=_factory,
    transport="serial",
    summary="COBS-framed binary packets with CRC-16/CCITT-FALSE and a declared field layout",
)
