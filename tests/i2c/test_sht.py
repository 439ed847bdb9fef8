"""SHT3x / SHT4x: Sensirion CRC example, conversions, round trips, CRC and NACK faults."""

from __future__ import annotations

import errno

import msgspec
import pytest

from drivers.base import DeviceError, FrameError, Quality
from drivers.emulated.i2c import EmulatedSMBus
from drivers.emulated.sht import EmulatedSHT
from drivers.i2c import sht as proto
from drivers.i2c.sht import SHT, SHTConfig

from .conftest import MakeBus
from .helpers import FakeClock, cfg, values


def test_sensirion_crc_example() -> None:
    assert proto.crc8(b"\xbe\xef") == 0x92  # datasheet §4.12 example


def test_crc_detects_every_single_bit_error() -> None:
    frame = proto.encode_words([0x6A1C, 0x8F02])
    assert proto.parse_words(frame) == [0x6A1C, 0x8F02]
    for byte in range(len(frame)):
        for bit in range(8):
            bad = bytearray(frame)
            bad[byte] ^= 1 << bit
            with pytest.raises(FrameError) as ei:
                proto.parse_words(bytes(bad))
            assert ei.value.kind == "crc"
            assert f"word {byte // 3}" in str(ei.value)


def test_conversion_formulas() -> None:
    assert proto.ticks_to_celsius(0) == -45.0
    assert proto.ticks_to_celsius(65535) == 130.0
    assert proto.ticks_to_celsius(0x6666) == pytest.approx(25.0, abs=0.002)
    assert proto.sht3x_ticks_to_rh(0x8000) == pytest.approx(50.0, abs=0.001)
    assert proto.sht4x_ticks_to_rh(0x8000) == pytest.approx(56.5, abs=0.001)  # -6 + 62.5
    assert proto.sht4x_ticks_to_rh(0) == 0.0 and proto.sht4x_ticks_to_rh(65535) == 100.0
    with pytest.raises(FrameError, match="3 bytes per word"):
        proto.parse_words(b"\x00\x00")


@pytest.mark.parametrize("part", ["sht3x", "sht4x"])
@pytest.mark.parametrize("precision", ["high", "low"])
async def test_round_trip(make_bus: MakeBus, part: str, precision: str) -> None:
    state = {"t": 0.0, "h": 0.0}
    emu = EmulatedSHT(
        part, 0x45, temperature_c=lambda _: state["t"], humidity_pct=lambda _: state["h"]
    )
    bus, _ = make_bus(emu)
    d = SHT(cfg(SHTConfig, part=part, address=0x45, precision=precision), bus)
    await d.open()
    for t, h in [(-40.0, 5.0), (23.45, 41.2), (85.0, 97.5)]:
        state.update(t=t, h=h)
        v = values(await d.read())
        assert v["temperature"] == pytest.approx(t, abs=175 / 65535)
        assert v["humidity"] == pytest.approx(h, abs=125 / 65535)
    assert d.counters["reads"] == 3 and emu.conversions == 3


async def test_open_reads_identity(make_bus: MakeBus) -> None:
    bus, _ = make_bus(EmulatedSHT("sht4x", serial_number=0x12345678), EmulatedSHT("sht3x", 0x45))
    d4 = SHT(cfg(SHTConfig, part="sht4x"), bus)
    await d4.open()
    assert d4.serial_number == 0x12345678
    d3 = SHT(cfg(SHTConfig, part="sht3x", address=0x45), bus)
    await d3.open()
    assert d3.status == 0x8010  # power-up: alert pending + system reset detected


async def test_bit_flip_is_a_crc_frame_error(make_bus: MakeBus) -> None:
    emu = EmulatedSHT("sht3x", temperature_c=20.0)
    bus, _ = make_bus(emu)
    d = SHT(cfg(SHTConfig), bus)
    await d.open()
    emu.inject_bit_flips(1, byte_index=3, bit=6)  # humidity MSB
    with pytest.raises(FrameError) as ei:
        await d.read()
    assert ei.value.kind == "crc" and "word 1" in str(ei.value)
    assert d.counters["crc_errors"] == 1 and d.counters["reads"] == 0
    assert values(await d.read())["temperature"] == pytest.approx(20.0, abs=0.01)


async def test_nack_is_device_error(make_bus: MakeBus) -> None:
    emu = EmulatedSHT("sht4x")
    bus, _ = make_bus(emu)
    d = SHT(cfg(SHTConfig, part="sht4x"), bus)
    await d.open()
    emu.inject_nack(1)
    with pytest.raises(DeviceError, match="addr 0x44"):
        await d.read()
    assert d.counters["bus_errors"] == 1
    await d.read()


async def test_stuck_value_flagged(make_bus: MakeBus) -> None:
    temp = {"v": 20.0}
    emu = EmulatedSHT("sht3x", temperature_c=lambda _: temp["v"])
    bus, _ = make_bus(emu)
    d = SHT(cfg(SHTConfig, stuck_after_reads=2), bus)
    await d.open()
    await d.read()
    emu.stuck = True
    temp["v"] = 30.0
    r = [await d.read() for _ in range(2)][-1]
    assert values(r)["temperature"] == pytest.approx(20.0, abs=0.01)
    assert r[0].quality is Quality.UNCERTAIN and d.counters["stuck_reads"] == 1


def test_emulator_nacks_until_conversion_done_and_unknown_commands() -> None:
    clk = FakeClock()
    emu = EmulatedSHT("sht3x", clock=clk)
    smbus = EmulatedSMBus([emu])
    from smbus2 import i2c_msg

    smbus.i2c_rdwr(i2c_msg.write(0x44, [0x24, 0x00]))  # high repeatability, 12.5 ms typ
    rd = i2c_msg.read(0x44, 6)
    clk.advance(0.010)
    with pytest.raises(OSError) as ei:
        smbus.i2c_rdwr(rd)
    assert ei.value.errno == errno.ENXIO
    clk.advance(0.003)
    smbus.i2c_rdwr(rd)
    assert len(proto.parse_words(bytes(rd))) == 2
    with pytest.raises(OSError):  # the result can be read once
        smbus.i2c_rdwr(i2c_msg.read(0x44, 6))
    with pytest.raises(OSError) as ei:
        smbus.i2c_rdwr(i2c_msg.write(0x44, [0x12, 0x34]))
    assert ei.value.errno == errno.EREMOTEIO  # NACK in the data phase


def test_config_addresses_depend_on_the_part() -> None:
    assert cfg(SHTConfig, part="sht4x", address=0x46).address == 0x46
    with pytest.raises(msgspec.ValidationError, match=r"not a SHT3X address; legal: 0x44"):
        cfg(SHTConfig, part="sht3x", address=0x46)
    with pytest.raises(msgspec.ValidationError, match="precision"):
        cfg(SHTConfig, precision="ultra")
