"""Registry entries, config through the root schema, factories, and the i2c_write actuator."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from drivers.base import PolledSensor
from drivers.emulated.ads1115 import EmulatedADS1115
from drivers.emulated.bme280 import EmulatedBME280
from drivers.emulated.i2c import EmulatedSMBus, RegisterFile
from drivers.emulated.ina219 import EmulatedINA219
from drivers.emulated.mpu6050 import EmulatedMPU6050
from drivers.emulated.sht import EmulatedSHT
from drivers.i2c.actuator import I2CWrite, I2CWriteConfig, to_raw
from drivers.i2c.bus import AsyncI2CBus, I2CError
from drivers.registry import actuator_drivers, sensor_drivers

from .conftest import MakeBus
from .helpers import cfg

I2C_DRIVERS = {"bme280", "sht", "ads1115", "mpu6050", "ina219"}


class EmuResources:
    """`drivers.base.Resources` over one emulated bus (as the hub's would be)."""

    def __init__(self, bus: AsyncI2CBus) -> None:
        self.bus = bus
        self.asked: list[int] = []

    def i2c_bus(self, bus: int) -> AsyncI2CBus:
        self.asked.append(bus)
        return self.bus

    def serial_port(self, url: str, **settings: Any) -> Any:
        raise AssertionError("no serial here")


def test_registry_lists_every_i2c_driver() -> None:
    specs = sensor_drivers()
    assert I2C_DRIVERS <= set(specs)
    for name in I2C_DRIVERS:
        spec = specs[name]
        assert spec.transport == "i2c" and spec.summary
        assert spec.config_type.__struct_config__.tag == name
    assert "i2c_write" in actuator_drivers()


def test_root_config_accepts_i2c_sensors_and_rejects_bad_ones() -> None:
    from edgerund.config.schema import Config

    raw = {
        "gateway": {"id": "gw1"},
        "sensors": [
            {"id": "cab", "driver": "bme280", "address": 0x77},
            {"id": "rh", "driver": "sht", "part": "sht4x"},
            {"id": "vib", "driver": "mpu6050", "rate_hz": 200},
            {"id": "bat", "driver": "ina219", "address": 0x41},
            {"id": "adc", "driver": "ads1115", "inputs": [{"name": "v", "input": "ain1"}]},
        ],
    }
    conf = msgspec.convert(raw, Config)
    assert [type(s).__name__ for s in conf.sensors] == [
        "BME280Config",
        "SHTConfig",
        "MPU6050Config",
        "INA219Config",
        "ADS1115Config",
    ]
    raw["sensors"][0]["address"] = 0x40  # type: ignore[index]
    with pytest.raises(msgspec.ValidationError) as ei:
        msgspec.convert(raw, Config)
    assert "not a BME280 address" in str(ei.value) and "$.sensors[0]" in str(ei.value)


async def test_factories_build_polled_sensors_that_read(make_bus: MakeBus) -> None:
    bus, _ = make_bus(
        EmulatedBME280(),
        EmulatedSHT("sht3x"),
        EmulatedADS1115(ain0_v=1.0),
        EmulatedMPU6050(),
        EmulatedINA219(),
    )
    res = EmuResources(bus)
    specs = sensor_drivers()
    for name in sorted(I2C_DRIVERS):
        spec = specs[name]
        sensor = spec.factory(cfg(spec.config_type, bus=3), res)
        assert isinstance(sensor, PolledSensor) and sensor.mode == "poll"
        await sensor.open()
        readings = await sensor.read()
        assert [r.channel for r in readings] == [c.name for c in sensor.channels]
        assert sensor.counters["reads"] == 1
        await sensor.close()
    assert set(res.asked) == {3}


def test_to_raw_scaling_and_clamping() -> None:
    assert to_raw(0.5, 4095.0, 0.0, "word", False) == (2048, False)
    assert to_raw(20.0, 4095.0, 0.0, "word", False) == (65535, True)
    assert to_raw(-1.0, 100.0, 0.0, "byte", True) == (0x9C, False)  # -100 two's complement
    assert to_raw(-2.0, 100.0, 0.0, "byte", True) == (0x80, True)  # clamped at -128
    assert to_raw(-1.0, 1.0, 0.0, "byte", False) == (0, True)


async def test_actuator_writes_register_and_safe_value(make_bus: MakeBus) -> None:
    dac = RegisterFile(0x60)
    bus, _ = make_bus(dac)
    c = cfg(I2CWriteConfig, address=0x60, register=0x40, width="word", scale=4095.0, safe_value=0.1)
    act = actuator_drivers()["i2c_write"].factory(c, EmuResources(bus))
    assert isinstance(act, I2CWrite)
    await act.open()
    assert dac.regs[0x40:0x42] == (410).to_bytes(2, "big")  # safe value on open
    await act.write(0.75)
    assert dac.regs[0x40:0x42] == (3071).to_bytes(2, "big")
    await act.write(30.0)
    assert dac.regs[0x40:0x42] == b"\xff\xff" and act.counters["clamped"] == 1
    await act.close()
    assert dac.regs[0x40:0x42] == (410).to_bytes(2, "big")
    assert act.counters["writes"] == 4


async def test_actuator_little_endian_byte_and_faults(make_bus: MakeBus) -> None:
    dev = RegisterFile(0x20)
    bus, _ = make_bus(dev)
    act = I2CWrite(
        cfg(I2CWriteConfig, address=0x20, register=3, width="word", byte_order="little"), bus
    )
    await act.write(0x1234)
    assert dev.regs[3:5] == b"\x34\x12"
    dev.inject_nack(1)
    with pytest.raises(I2CError):
        await act.write(1)
    assert act.counters["bus_errors"] == 1
    assert act.cfg.target() == "i2c-1@0x20/0x03"
    with pytest.raises(msgspec.ValidationError, match="reserved"):
        cfg(I2CWriteConfig, address=0x7C)
    with pytest.raises(msgspec.ValidationError, match="register 0x100"):
        cfg(I2CWriteConfig, register=0x100)


def test_emulated_smbus_exposes_attached_devices() -> None:
    smbus = EmulatedSMBus([RegisterFile(0x21), RegisterFile(0x20)])
    assert smbus.addresses == [0x20, 0x21]
    smbus.detach(0x20)
    assert smbus.addresses == [0x21] and smbus.device(0x20) is None
