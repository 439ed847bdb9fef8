"""INA219: datasheet calibration example, register formats, round trips, overflow, faults."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from drivers.base import DeviceError, Quality
from drivers.emulated.ina219 import EmulatedINA219
from drivers.i2c import ina219 as proto
from drivers.i2c.ina219 import INA219, INA219Config

from .conftest import MakeBus
from .helpers import cfg, values


def test_datasheet_calibration_example() -> None:
    # §8.5.1: R_shunt 0.1 Ω, Current_LSB chosen 100 µA -> Cal 4096, Power_LSB 2 mW
    cal, current_lsb, power_lsb = proto.calibration(0.1, 2.0, current_lsb_a=100e-6)
    assert cal == 4096
    assert current_lsb == 100e-6 and power_lsb == pytest.approx(0.002)
    # without a chosen LSB: max expected current / 2^15
    cal, lsb, _ = proto.calibration(0.1, 3.2)
    assert lsb == pytest.approx(3.2 / 32768) and cal == 4194  # trunc(4194.304), bit 0 void
    with pytest.raises(ValueError, match=r"out of 2\.\.65534"):
        proto.calibration(0.0001, 0.001)


def test_register_formats_from_the_datasheet() -> None:
    # Shunt voltage register examples (PGA /8): +320 mV = 0x7D00, -320 mV = 0x8300,
    # -0.01 mV = 0xFFFF
    assert proto.shunt_volts(0x7D00) == pytest.approx(0.320)
    assert proto.shunt_volts(0x8300) == pytest.approx(-0.320)
    assert proto.shunt_volts(0xFFFF) == pytest.approx(-10e-6)
    assert proto.bus_volts((8000 << 3) | proto.BUS_CNVR) == pytest.approx(32.0)
    assert proto.config_word(32, 320, 1) == proto.CONFIG_DEFAULT == 0x399F
    assert proto.adc_time_s(0b0011) == 532e-6 and proto.adc_time_s(0b1111) == 68.10e-3


@pytest.mark.parametrize(("volts", "amps"), [(12.6, 1.234), (11.1, -0.8), (25.0, 0.0)])
async def test_round_trip(make_bus: MakeBus, volts: float, amps: float) -> None:
    emu = EmulatedINA219(0x45, bus_voltage_v=volts, current_a=amps, shunt_ohms=0.1)
    bus, _ = make_bus(emu)
    d = INA219(cfg(INA219Config, address=0x45, shunt_ohms=0.1, max_current_a=3.2), bus)
    await d.open()
    assert emu.cal == d.cal == 4194
    v = values(await d.read())
    assert v["bus_voltage"] == pytest.approx(volts, abs=0.002)
    assert v["shunt_voltage"] == pytest.approx(amps * 0.1, abs=5e-6)
    # the shunt ADC resolves 10 µV / 0.1 Ω = 100 µA; the current register adds its LSB
    assert v["current"] == pytest.approx(amps, abs=100e-6 + d.current_lsb)
    assert v["power"] == pytest.approx(abs(amps) * volts, abs=0.005 + 2 * d.power_lsb)
    assert d.counters["reads"] == 1 and d.counters["overflow"] == 0


async def test_math_overflow_marks_current_and_power_bad(make_bus: MakeBus) -> None:
    # Cal sized for 0.3 A, but 0.39 A flows: the current register would exceed 32767.
    emu = EmulatedINA219(bus_voltage_v=5.0, current_a=0.39)
    bus, _ = make_bus(emu)
    d = INA219(cfg(INA219Config, max_current_a=0.3, shunt_range_mv=40), bus)
    await d.open()
    r = {x.channel: x for x in await d.read()}
    assert r["current"].quality is Quality.BAD and r["power"].quality is Quality.BAD
    assert r["bus_voltage"].quality is Quality.GOOD
    assert r["shunt_voltage"].value == pytest.approx(0.039, abs=2e-5)
    assert d.counters["overflow"] == 1


async def test_pga_clips_the_shunt_voltage(make_bus: MakeBus) -> None:
    emu = EmulatedINA219(current_a=1.0)  # 100 mV across 0.1 Ω
    bus, _ = make_bus(emu)
    d = INA219(cfg(INA219Config, max_current_a=0.4, shunt_range_mv=40), bus)
    await d.open()
    assert values(await d.read())["shunt_voltage"] == pytest.approx(0.040)


async def test_lost_calibration_is_detected_and_rewritten(make_bus: MakeBus) -> None:
    emu = EmulatedINA219(current_a=0.5)
    bus, _ = make_bus(emu)
    d = INA219(cfg(INA219Config), bus)
    await d.open()
    await d.read()
    emu.unplug()
    with pytest.raises(DeviceError, match="addr 0x40"):
        await d.read()
    emu.replug()  # power-on: Cal = 0, current would read 0 forever
    with pytest.raises(DeviceError, match="calibration reads 0"):
        await d.read()
    assert d.counters["config_lost"] == 1 and d.counters["bus_errors"] == 2
    await asyncio.sleep(0.003)
    assert values(await d.read())["current"] == pytest.approx(0.5, abs=0.0002)


async def test_stuck_registers_hold_value(make_bus: MakeBus) -> None:
    amps = {"v": 0.5}
    emu = EmulatedINA219(current_a=lambda _: amps["v"])
    bus, _ = make_bus(emu)
    d = INA219(cfg(INA219Config), bus)
    await d.open()
    assert values(await d.read())["current"] == pytest.approx(0.5, abs=0.0002)
    emu.stuck = True
    amps["v"] = 1.5
    await asyncio.sleep(0.003)
    assert values(await d.read())["current"] == pytest.approx(0.5, abs=0.0002)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"address": 0x50}, "not a INA219 address; legal: 0x40 (A1=GND A0=GND)"),
        ({"max_current_a": 5.0}, "drops 500 mV, more than shunt_range_mv 320 mV"),
        ({"adc_samples": 3}, "adc_samples 3 is not supported"),
        ({"shunt_range_mv": 100}, "legal: 40 mV, 80 mV, 160 mV, 320 mV"),
        ({"bus_range_v": 24}, "bus_range_v 24 V"),
        ({"shunt_ohms": 0}, "must be > 0"),
    ],
)
def test_config_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as ei:
        cfg(INA219Config, **kw)
    assert message in str(ei.value)


def test_all_sixteen_addresses_are_legal() -> None:
    assert sorted(proto.ADDRESSES) == list(range(0x40, 0x50))
    assert proto.ADDRESSES[0x4F] == "A1=SCL A0=SCL"
