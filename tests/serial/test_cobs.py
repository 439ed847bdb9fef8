"""COBS framing with CRC-16/CCITT-FALSE: published vectors, layout codec, emulator."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import msgspec
import pytest

from drivers.emulated.cobs_device import CobsDeviceEmulator
from drivers.errors import DeviceError, FrameError
from drivers.serial.cobs import (
    CobsConfig,
    CobsField,
    CobsLayout,
    CobsSensor,
    cobs_decode,
    cobs_encode,
    crc16_ccitt_bitwise,
    crc16_ccitt_false,
    encode_packet,
)

# Cheshire & Baker examples as listed on Wikipedia's COBS article (delimiter omitted)
COBS_VECTORS = [
    ("00", "0101"),
    ("0000", "010101"),
    ("001100", "01021101"),
    ("11220033", "0311220233"),
    ("11223344", "0511223344"),
    ("11000000", "0211010101"),
    (bytes(range(1, 255)).hex(), "ff" + bytes(range(1, 255)).hex()),
    (bytes(range(0, 255)).hex(), "01ff" + bytes(range(1, 255)).hex()),
    (bytes(range(1, 256)).hex(), "ff" + bytes(range(1, 255)).hex() + "02ff"),
]


@pytest.mark.parametrize("raw,enc", COBS_VECTORS)
def test_cobs_published_vectors(raw: str, enc: str) -> None:
    assert cobs_encode(bytes.fromhex(raw)) == bytes.fromhex(enc)
    assert cobs_decode(bytes.fromhex(enc)) == bytes.fromhex(raw)


def test_crc_ccitt_false_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1  # CRC catalogue check value
    assert crc16_ccitt_bitwise(b"123456789") == 0x29B1
    assert crc16_ccitt_false(b"") == 0xFFFF


def test_cobs_malformed() -> None:
    with pytest.raises(FrameError, match="overruns"):
        cobs_decode(b"\x05\x11\x22")
    with pytest.raises(FrameError, match="empty"):
        cobs_decode(b"")


FIELDS = [
    CobsField(name="seq", type="u16"),
    CobsField(name="temp_c", type="i16", scale=0.01, unit="degC"),
    CobsField(name="accel_g", type="f32", unit="g"),
    CobsField(name="flags", type="u8"),
]


def test_layout_decode_golden_packet() -> None:
    payload = struct.pack("<Hhfb", 513, -1234, 0.5, 3)
    crc = crc16_ccitt_false(payload)
    wire = cobs_encode(payload + crc.to_bytes(2, "big")) + b"\x00"
    assert encode_packet(payload) == wire
    layout = CobsLayout(FIELDS, "little")
    r = {x.channel: x.value for x in layout.decode(wire[:-1])}
    assert r == pytest.approx({"seq": 513, "temp_c": -12.34, "accel_g": 0.5, "flags": 3})
    big = CobsLayout(FIELDS, "big", packet_type=0x42, crc_byte_order="little")
    pkt = big.encode([7, 100, -1.25, 255])
    assert {x.channel: x.value for x in big.decode(pkt[:-1])} == pytest.approx(
        {"seq": 7, "temp_c": 1.0, "accel_g": -1.25, "flags": 255}
    )
    with pytest.raises(FrameError) as e:
        layout.decode(pkt[:-1])
    assert e.value.kind == "crc"  # CRC byte order differs
    other = CobsLayout(FIELDS, "big", packet_type=0x43, crc_byte_order="little")
    with pytest.raises(FrameError) as e:
        other.decode(pkt[:-1])
    assert e.value.kind == "packet_type"
    short = encode_packet(b"\x01\x02\x03")
    with pytest.raises(FrameError) as e:
        layout.decode(short[:-1])
    assert e.value.kind == "length"


def _cfg(path: str, **kw: object) -> CobsConfig:
    base = {
        "driver": "cobs",
        "id": "mcu",
        "port": path,
        "rate_hz": 50,
        "fields": [msgspec.to_builtins(f) for f in FIELDS],
    }
    return msgspec.convert({**base, **kw}, CobsConfig)


def test_config_errors() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'u64'"):
        _cfg("/dev/ttyACM0", fields=[{"name": "x", "type": "u64"}])
    with pytest.raises(msgspec.ValidationError, match="packet_type"):
        _cfg("/dev/ttyACM0", packet_type=300)
    with pytest.raises(msgspec.ValidationError, match="max_packet_bytes"):
        _cfg("/dev/ttyACM0", max_packet_bytes=8)


def _values(t: float) -> list[float]:
    return [int(t * 50) % 65536, 2150, 0.98, 1]


async def test_sensor_against_emulator(link: Path, resources: object, loop_guard: object) -> None:
    async with CobsDeviceEmulator(link, fields=FIELDS, values=_values, rate_hz=50) as emu:
        sensor = CobsSensor(_cfg(emu.path), resources)  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        async with asyncio.timeout(10):
            r = {x.channel: x.value for x in await it.__anext__()}
        assert r["temp_c"] == pytest.approx(21.5)
        assert r["accel_g"] == pytest.approx(0.98, rel=1e-6)
        assert sensor.port.recent_frames(1)[0][1] != b""
        await sensor.close()


@pytest.mark.parametrize("kind", ["bit_flip", "truncate", "garbage"])
async def test_corruption_counted_and_skipped(kind: str, link: Path, resources: object) -> None:
    async with CobsDeviceEmulator(link, fields=FIELDS, values=_values, rate_hz=100, seed=2) as emu:
        sensor = CobsSensor(_cfg(emu.path, rate_hz=100), resources)  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        async with asyncio.timeout(10):
            await it.__anext__()
            emu.inject(kind, 5)  # type: ignore[arg-type]
            for _ in range(10):
                r = {x.channel: x.value for x in await it.__anext__()}
                assert r["temp_c"] == pytest.approx(21.5)  # never a corrupted value
        assert sensor.counters["frame_errors"] == 5
        await sensor.close()


async def test_stall_and_unplug(link: Path, resources: object, loop_guard: object) -> None:
    async with CobsDeviceEmulator(link, fields=FIELDS, values=_values, rate_hz=50) as emu:
        sensor = CobsSensor(_cfg(emu.path, read_timeout_ms=100), resources)  # type: ignore[arg-type]
        await sensor.open()
        it = sensor.frames().__aiter__()
        await asyncio.wait_for(it.__anext__(), 10)
        emu.stall(0.5)
        with pytest.raises(DeviceError, match="stalled"):
            await asyncio.wait_for(it.__anext__(), 10)
        emu.unplug()
        with pytest.raises(DeviceError):
            await sensor.open()
        emu.unstall()
        emu.replug()
        await sensor.open()
        it = sensor.frames().__aiter__()
        await asyncio.wait_for(it.__anext__(), 10)
        await sensor.close()
