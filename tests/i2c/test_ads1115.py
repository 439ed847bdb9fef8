"""ADS1115: code -> volts per PGA range, config word, round trips, timing, faults."""

from __future__ import annotations

import msgspec
import pytest

from drivers.base import DeviceError, Quality
from drivers.emulated.ads1115 import EmulatedADS1115
from drivers.emulated.i2c import EmulatedSMBus
from drivers.i2c import ads1115 as proto
from drivers.i2c.ads1115 import ADS1115, ADS1115Config

from .conftest import MakeBus
from .helpers import FakeClock, cfg, values

# Datasheet Table 3: full-scale range -> LSB size
LSB_TABLE = {
    6.144: 187.5e-6,
    4.096: 125e-6,
    2.048: 62.5e-6,
    1.024: 31.25e-6,
    0.512: 15.625e-6,
    0.256: 7.8125e-6,
}


@pytest.mark.parametrize(("fsr", "lsb"), sorted(LSB_TABLE.items()))
def test_code_to_volts_per_pga(fsr: float, lsb: float) -> None:
    assert proto.lsb_volts(fsr) == pytest.approx(lsb, rel=1e-12)
    assert proto.code_to_volts(0x0001, fsr) == pytest.approx(lsb)
    assert proto.code_to_volts(0xFFFF, fsr) == pytest.approx(-lsb)
    assert proto.code_to_volts(0x7FFF, fsr) == pytest.approx(fsr - lsb)
    assert proto.code_to_volts(0x8000, fsr) == pytest.approx(-fsr)
    assert proto.volts_to_code(fsr * 2, fsr) == 32767  # saturates
    assert proto.volts_to_code(-fsr * 2, fsr) == -32768


def test_config_word_matches_datasheet_layout() -> None:
    # The power-on default 0x8583 is AIN0-AIN1, ±2.048 V, single-shot, 128 SPS, comp off.
    assert proto.config_word(proto.MUX["ain0-ain1"], 2.048, 128) == 0x8583
    assert proto.config_word(proto.MUX["ain0"], 4.096, 128) == 0xC383
    assert proto.config_word(proto.MUX["ain3"], 0.256, 860, start=False) == 0x7BE3


async def test_round_trip_mixed_inputs(make_bus: MakeBus) -> None:
    ain = {"0": 3.3, "1": 1.2345, "2": 0.1, "3": 0.0}
    emu = EmulatedADS1115(
        0x49,
        ain0_v=lambda _: ain["0"],
        ain1_v=lambda _: ain["1"],
        ain2_v=lambda _: ain["2"],
        ain3_v=lambda _: ain["3"],
    )
    bus, _ = make_bus(emu)
    c = cfg(
        ADS1115Config,
        address=0x49,
        data_rate_sps=860,
        inputs=[
            {"name": "supply", "input": "ain0", "range_v": 4.096, "scale": 2.0},
            {"name": "sense", "input": "ain1", "range_v": 2.048},
            {"name": "shunt", "input": "ain2-ain3", "range_v": 0.256, "scale": 10.0, "unit": "A"},
            {"name": "diff", "input": "ain0-ain1", "range_v": 6.144},
        ],
    )
    d = ADS1115(c, bus)
    await d.open()
    assert [(ch.name, ch.unit) for ch in d.channels] == [
        ("supply", "V"),
        ("sense", "V"),
        ("shunt", "A"),
        ("diff", "V"),
    ]
    for a0, a1, a2, a3 in [(3.3, 1.2345, 0.1, 0.0), (0.5, 2.0, 0.2, 0.25)]:
        ain.update({"0": a0, "1": a1, "2": a2, "3": a3})
        v = values(await d.read())
        assert v["supply"] == pytest.approx(a0 * 2.0, abs=125e-6)
        assert v["sense"] == pytest.approx(a1, abs=62.5e-6 / 2)
        assert v["shunt"] == pytest.approx((a2 - a3) * 10.0, abs=10 * 7.8125e-6 / 2)
        assert v["diff"] == pytest.approx(a0 - a1, abs=187.5e-6 / 2)
    assert emu.conversions == 8


async def test_saturation_is_flagged(make_bus: MakeBus) -> None:
    bus, _ = make_bus(EmulatedADS1115(ain0_v=5.0))
    d = ADS1115(
        cfg(ADS1115Config, data_rate_sps=860, inputs=[{"name": "x", "range_v": 4.096}]), bus
    )
    await d.open()
    (r,) = await d.read()
    assert r.value == pytest.approx(4.096 - 125e-6) and r.quality is Quality.UNCERTAIN
    assert d.counters["saturated"] == 1


def test_single_shot_takes_one_data_rate_period() -> None:
    clk = FakeClock()
    emu = EmulatedADS1115(ain0_v=lambda t: 1.0 if t < 1000.1 else 2.0, clock=clk)
    smbus = EmulatedSMBus([emu])
    word = proto.config_word(proto.MUX["ain0"], 4.096, 8)  # 8 SPS: 125 ms
    smbus.write_i2c_block_data(0x48, proto.REG_CONFIG, list(word.to_bytes(2, "big")))
    clk.advance(0.124)
    cfg_now = bytes(smbus.read_i2c_block_data(0x48, proto.REG_CONFIG, 2))
    assert not cfg_now[0] & 0x80  # OS = 0: converting
    clk.advance(0.002)
    cfg_now = bytes(smbus.read_i2c_block_data(0x48, proto.REG_CONFIG, 2))
    assert cfg_now[0] & 0x80
    code = int.from_bytes(bytes(smbus.read_i2c_block_data(0x48, proto.REG_CONVERSION, 2)), "big")
    # sampled at the END of the conversion (t0 + 125 ms > 1000.1): 2.0 V
    assert proto.code_to_volts(code, 4.096) == pytest.approx(2.0, abs=125e-6)


def test_continuous_mode_updates_every_period() -> None:
    clk = FakeClock()
    level = {"v": 1.0}
    emu = EmulatedADS1115(ain1_v=lambda _: level["v"], clock=clk)
    smbus = EmulatedSMBus([emu])
    word = proto.config_word(proto.MUX["ain1"], 2.048, 250) & ~proto.MODE_SINGLE & ~0x8000
    smbus.write_i2c_block_data(0x48, proto.REG_CONFIG, list(word.to_bytes(2, "big")))

    def volts() -> float:
        raw = bytes(smbus.read_i2c_block_data(0x48, proto.REG_CONVERSION, 2))
        return proto.code_to_volts(int.from_bytes(raw, "big"), 2.048)

    clk.advance(0.0041)
    assert volts() == pytest.approx(1.0, abs=1e-4)
    level["v"] = 1.5
    assert volts() == pytest.approx(1.0, abs=1e-4)  # same period: no new code
    clk.advance(0.004)
    assert volts() == pytest.approx(1.5, abs=1e-4)


async def test_nack_and_stuck(make_bus: MakeBus) -> None:
    level = {"v": 1.0}
    emu = EmulatedADS1115(ain0_v=lambda _: level["v"])
    bus, _ = make_bus(emu)
    d = ADS1115(cfg(ADS1115Config, data_rate_sps=860, stuck_after_reads=2), bus)
    await d.open()
    emu.inject_nack(1)
    with pytest.raises(DeviceError, match="addr 0x48"):
        await d.read()
    assert d.counters["bus_errors"] == 1
    assert values(await d.read())["ain0"] == pytest.approx(1.0, abs=1e-3)
    emu.stuck = True
    level["v"] = 2.0
    r = [await d.read() for _ in range(2)][-1]
    assert r[0].value == pytest.approx(1.0, abs=1e-3) and r[0].quality is Quality.UNCERTAIN


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"address": 0x47}, "legal: 0x48 (ADDR to GND), 0x49 (ADDR to VDD), 0x4a"),
        ({"data_rate_sps": 100}, "data_rate_sps 100 SPS is not supported; legal: 8 SPS"),
        ({"inputs": [{"name": "a", "range_v": 3.3}]}, "range_v 3.3 V is not supported"),
        ({"inputs": [{"name": "a", "input": "ain4"}]}, "Invalid enum value 'ain4'"),
        ({"inputs": [{"name": "a"}, {"name": "a", "input": "ain1"}]}, "repeated: ['a']"),
        ({"inputs": []}, "at least one input"),
        (
            {"data_rate_sps": 8, "inputs": [{"name": n} for n in ("a", "b", "c", "d")]},
            "4 inputs at data_rate_sps 8 take 550 ms per read, not less than read_timeout_ms",
        ),
    ],
)
def test_config_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as ei:
        cfg(ADS1115Config, **kw)
    assert message in str(ei.value)
