"""BME280: datasheet compensation golden values, emulator round trips, modes, faults."""

from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest

from drivers.base import DeviceError, Quality
from drivers.emulated.bme280 import DATASHEET_CALIBRATION, EmulatedBME280, float_compensate
from drivers.i2c import bme280 as proto
from drivers.i2c.bme280 import BME280, BME280Config, Calibration

from .conftest import MakeBus
from .helpers import FakeClock, cfg, values

CAL = DATASHEET_CALIBRATION


def test_datasheet_compensation_example() -> None:
    # Bosch's worked example (BMP280 datasheet §3.12; the BME280 T/P formulas are the
    # same): adc_T = 519888, adc_P = 415148 with the example trimming words.
    t, t_fine = proto.compensate_t(519888, CAL)
    assert t == 2508  # 25.08 degC
    assert t_fine == 128422
    p = proto.compensate_p(415148, t_fine, CAL) / 256.0
    assert int(p) == 100653  # the datasheet's 100653 Pa
    t_f, p_f, _, t_fine_f = float_compensate(519888, 415148, 0, CAL)
    assert t_f == pytest.approx(25.08, abs=0.005) and t_fine_f == 128422
    assert p == pytest.approx(p_f, abs=0.05)  # integer and double formulas agree


def test_integer_humidity_agrees_with_the_double_formula() -> None:
    _, t_fine = proto.compensate_t(519888, CAL)
    for adc_h in range(20000, 45000, 997):
        h_int = proto.compensate_h(adc_h, t_fine, CAL) / 1024.0
        h_f = float_compensate(519888, 0, adc_h, CAL)[2]
        assert h_int == pytest.approx(h_f, abs=0.01), adc_h


def test_calibration_parsed_from_nvm_bytes() -> None:
    tp = struct.pack(
        "<HhhHhhhhhhhh",
        27504,
        26435,
        -1000,
        36477,
        -10685,
        3024,
        2855,
        140,
        -7,
        15500,
        -14600,
        6000,
    ) + bytes([0x00, 75])
    # 0xE1..0xE7: H2 = 362 (LE), H3 = 0, H4 = 0x139 = 313 (E4<<4 | E5[3:0]),
    # H5 = 0x032 = 50 (E6<<4 | E5[7:4]), H6 = 30
    h = bytes([0x6A, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1E])
    assert Calibration.from_bytes(tp, h) == CAL
    # signed 12-bit H4/H5 and signed H6
    neg = Calibration.from_bytes(tp, bytes([0, 0, 0, 0xFF, 0xFF, 0xFF, 0xF6]))
    assert (neg.H4, neg.H5, neg.H6) == (-1, -1, -10)
    assert Calibration.from_bytes(*neg.to_bytes()) == neg


def test_parse_data_layout() -> None:
    data = bytes([0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00, 0x6B, 0x4C])
    assert proto.parse_data(data) == (0x655AC, 0x7EED0, 0x6B4C)
    assert proto.parse_data(bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])) == (0x80000,) * 2 + (0x8000,)


def test_measurement_time_table() -> None:
    assert proto.measurement_time_ms(1, 1, 1) == pytest.approx((8.0, 9.3))  # datasheet §9.1
    assert proto.measurement_time_ms(1, 0, 0) == pytest.approx((3.0, 3.55))
    assert proto.measurement_time_ms(16, 16, 16)[1] == pytest.approx(112.8)


@pytest.mark.parametrize(
    ("mode", "osrs", "tol_t", "tol_p", "tol_h"),
    [("normal", 16, 0.011, 0.4, 0.02), ("forced", 1, 0.06, 4.0, 0.02)],
)
async def test_round_trip_physical_raw_physical(
    make_bus: MakeBus, mode: str, osrs: int, tol_t: float, tol_p: float, tol_h: float
) -> None:
    state = {"t": -10.0, "p": 90000.0, "h": 10.0}
    emu = EmulatedBME280(
        0x77,
        temperature_c=lambda _: state["t"],
        pressure_pa=lambda _: state["p"],
        humidity_pct=lambda _: state["h"],
    )
    bus, _ = make_bus(emu)
    c = cfg(
        BME280Config,
        address=0x77,
        mode=mode,
        temperature_oversampling=osrs,
        pressure_oversampling=osrs,
        humidity_oversampling=osrs,
        standby_ms=0.5,
    )
    d = BME280(c, bus)
    await d.open()
    assert [ch.name for ch in d.channels] == ["temperature", "pressure", "humidity"]
    for t, p, h in [(-10.0, 90000.0, 10.0), (25.3, 101325.0, 45.5), (61.7, 110000.0, 93.0)]:
        state.update(t=t, p=p, h=h)
        if mode == "normal":  # next conversion: t_standby 0.5 ms + t_measure
            await asyncio.sleep(d.t_measure_max_s + 0.002)
        v = values(await d.read())
        assert v["temperature"] == pytest.approx(t, abs=tol_t)
        assert v["pressure"] == pytest.approx(p, abs=tol_p)
        assert v["humidity"] == pytest.approx(h, abs=tol_h)
    assert d.counters["reads"] == 3 and d.counters["bus_errors"] == 0
    await d.close()
    assert emu.regs[proto.REG_CTRL_MEAS] & 0b11 == 0  # left asleep


def test_forced_conversion_timing_and_status() -> None:
    clk = FakeClock()
    emu = EmulatedBME280(clock=clk, temperature_c=30.0)
    from drivers.emulated.i2c import EmulatedSMBus

    smbus = EmulatedSMBus([emu])
    smbus.write_byte_data(0x76, proto.REG_CTRL_HUM, 1)
    smbus.write_byte_data(0x76, proto.REG_CTRL_MEAS, proto.ctrl_meas_value(1, 1, 1))
    assert smbus.read_byte_data(0x76, proto.REG_STATUS) & proto.STATUS_MEASURING
    assert smbus.read_i2c_block_data(0x76, proto.REG_DATA, 8)[:3] == [0x80, 0, 0]  # not yet
    clk.advance(0.0079)
    assert smbus.read_byte_data(0x76, proto.REG_STATUS) & proto.STATUS_MEASURING
    clk.advance(0.0002)  # 8.0 ms typical at x1/x1/x1
    assert not smbus.read_byte_data(0x76, proto.REG_STATUS) & proto.STATUS_MEASURING
    assert smbus.read_byte_data(0x76, proto.REG_CTRL_MEAS) & 0b11 == 0  # back to sleep
    m = proto.decode(bytes(smbus.read_i2c_block_data(0x76, proto.REG_DATA, 8)), CAL)
    assert m.temperature_c == pytest.approx(30.0, abs=0.1)


def test_normal_mode_updates_only_at_conversion_boundaries() -> None:
    clk = FakeClock()
    temp = {"v": 20.0}
    emu = EmulatedBME280(clock=clk, temperature_c=lambda _: temp["v"])
    from drivers.emulated.i2c import EmulatedSMBus

    smbus = EmulatedSMBus([emu])
    smbus.write_byte_data(0x76, proto.REG_CONFIG, proto.config_value(1000.0, 0))
    smbus.write_byte_data(0x76, proto.REG_CTRL_MEAS, proto.ctrl_meas_value(1, 0, proto.MODE_NORMAL))

    def temp_now() -> float:
        return proto.decode(
            bytes(smbus.read_i2c_block_data(0x76, proto.REG_DATA, 8)), CAL
        ).temperature_c

    clk.advance(0.004)  # t_measure (3 ms typical) done
    assert temp_now() == pytest.approx(20.0, abs=0.1)
    temp["v"] = 35.0
    clk.advance(0.5)  # inside the 1000 ms standby: registers keep the old conversion
    assert temp_now() == pytest.approx(20.0, abs=0.1)
    clk.advance(0.6)  # next cycle's conversion complete
    assert temp_now() == pytest.approx(35.0, abs=0.1)
    assert emu.conversions == 2


async def test_skipped_channels_are_not_offered(make_bus: MakeBus) -> None:
    bus, _ = make_bus(EmulatedBME280())
    d = BME280(cfg(BME280Config, humidity_oversampling=0, pressure_oversampling=0), bus)
    await d.open()
    assert [c.name for c in d.channels] == ["temperature"]
    assert [r.channel for r in await d.read()] == ["temperature"]


async def test_wrong_chip_id_is_refused(make_bus: MakeBus) -> None:
    bus, _ = make_bus(EmulatedBME280(chip_id=0x58))
    d = BME280(cfg(BME280Config), bus)
    with pytest.raises(DeviceError, match=r"chip id 0x58 .*BMP280.*expected 0x60"):
        await d.open()


async def test_nack_raises_device_error_and_counts(make_bus: MakeBus) -> None:
    emu = EmulatedBME280()
    bus, _ = make_bus(emu)
    d = BME280(cfg(BME280Config), bus)
    await d.open()
    emu.inject_nack(1)
    with pytest.raises(DeviceError, match="addr 0x76"):
        await d.read()
    assert d.counters["bus_errors"] == 1
    assert values(await d.read())["temperature"] == pytest.approx(22.0, abs=0.1)


async def test_stuck_value_is_visible(make_bus: MakeBus) -> None:
    temp = {"v": 20.0}
    emu = EmulatedBME280(temperature_c=lambda _: temp["v"])
    bus, _ = make_bus(emu)
    d = BME280(cfg(BME280Config, mode="forced", stuck_after_reads=2), bus)
    await d.open()
    assert values(await d.read())["temperature"] == pytest.approx(20.0, abs=0.1)
    emu.stuck = True
    temp["v"] = 40.0
    readings = [await d.read() for _ in range(3)]
    assert all(values(r)["temperature"] == pytest.approx(20.0, abs=0.1) for r in readings)
    assert readings[-1][0].quality is Quality.UNCERTAIN and d.counters["stuck_reads"] >= 1
    emu.stuck = False
    r = await d.read()
    assert values(r)["temperature"] == pytest.approx(40.0, abs=0.1)
    assert r[0].quality is Quality.GOOD


async def test_bit_flip_corrupts_the_value(make_bus: MakeBus) -> None:
    emu = EmulatedBME280(temperature_c=20.0)
    bus, _ = make_bus(emu)
    d = BME280(cfg(BME280Config), bus)  # normal mode: one 13-byte burst per read
    await d.open()
    good = values(await d.read())["pressure"]
    emu.inject_bit_flips(1, byte_index=5, bit=0)  # press_msb (0xF7) bit 0 = 4096 codes
    bad = values(await d.read())["pressure"]
    assert (
        abs(bad - good) > 500.0
    )  # ~0.17 Pa per code; no CRC on this part: the flip is visible in the data


async def test_replugged_chip_is_reconfigured(make_bus: MakeBus) -> None:
    emu = EmulatedBME280(temperature_c=21.0)
    bus, _ = make_bus(emu)
    d = BME280(cfg(BME280Config, standby_ms=0.5), bus)
    await d.open()
    await d.read()
    emu.unplug()
    with pytest.raises(DeviceError):
        await d.read()
    emu.replug()  # power-on state: sleep mode, data registers at reset values
    with pytest.raises(DeviceError, match="lost its configuration"):
        await d.read()
    assert d.counters["config_lost"] == 1
    v = values(await d.read())  # re-initialised by the driver itself
    assert v["temperature"] == pytest.approx(21.0, abs=0.1)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"address": 0x78}, "not a BME280 address; legal: 0x76 (SDO to GND), 0x77"),
        ({"address": 0x176}, "not a 7-bit I2C address"),
        ({"temperature_oversampling": 0}, "temperature_oversampling 0"),
        ({"humidity_oversampling": 3}, "legal: 0, 1, 2, 4, 8, 16"),
        ({"standby_ms": 7}, "standby_ms 7 ms is not supported"),
        ({"iir_filter_coeff": 5}, "iir_filter_coeff"),
        ({"mode": "sleep"}, "Invalid enum value 'sleep'"),
        ({"bogus": 1}, "unknown field `bogus`"),
        (
            {
                "mode": "forced",
                "temperature_oversampling": 16,
                "pressure_oversampling": 16,
                "humidity_oversampling": 16,
                "read_timeout_ms": 100,
            },
            "takes up to 112.8 ms, not less than read_timeout_ms 100",
        ),
    ],
)
def test_config_errors_say_what_is_legal(kw: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as ei:
        cfg(BME280Config, **kw)
    assert message in str(ei.value)
