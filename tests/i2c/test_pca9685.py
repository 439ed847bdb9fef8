"""PCA9685: prescale arithmetic, duty registers, the sleep/restart sequence, faults."""

from __future__ import annotations

import msgspec
import pytest

from drivers.base import DeviceError
from drivers.emulated.pca9685 import EmulatedPCA9685
from drivers.i2c import pca9685 as proto
from drivers.i2c.pca9685 import PCA9685, PCA9685Config
from drivers.registry import actuator_drivers

from .conftest import MakeBus
from .helpers import cfg


def test_prescale_from_the_datasheet() -> None:
    # datasheet §7.3.5: 200 Hz -> 0x1E (the power-on value); the limits are 3 and 255
    assert proto.prescale_for(200) == 0x1E == proto.PRE_SCALE_DEFAULT
    assert proto.prescale_for(1526) == 3 and proto.prescale_for(24) == 253
    assert proto.frequency_for(0x1E) == pytest.approx(196.9, abs=0.1)
    with pytest.raises(ValueError, match=r"expected 24\.\.1526 Hz"):
        proto.prescale_for(2000)
    with pytest.raises(ValueError, match=r"outside 3\.\.255"):
        proto.prescale_for(20)


def test_duty_registers() -> None:
    assert proto.duty_registers(0.0) == (bytes([0, 0, 0, 0x10]), False)  # full off
    assert proto.duty_registers(1.0) == (bytes([0, 0x10, 0, 0]), False)  # full on
    assert proto.duty_registers(0.5) == (bytes([0, 0, 0x00, 0x08]), False)  # off at 2048
    assert proto.duty_registers(1e-6)[0] == bytes([0, 0, 1, 0])  # never a 0-count sliver
    assert proto.duty_registers(1.7) == (bytes([0, 0x10, 0, 0]), True)
    assert proto.duty_registers(-0.2) == (bytes([0, 0, 0, 0x10]), True)


def test_config_checks() -> None:
    for bad in ({"address": 0x70}, {"address": 0x20}, {"channel": 16}, {"frequency_hz": 5000}):
        with pytest.raises(msgspec.ValidationError):
            cfg(PCA9685Config, **bad)
    assert actuator_drivers()["pca9685"].config_type is PCA9685Config
    assert cfg(PCA9685Config, channel=3).target() == "i2c-1@0x40/led3"


async def test_open_programs_frequency_by_the_sleep_restart_sequence(make_bus: MakeBus) -> None:
    emu = EmulatedPCA9685(0x41)
    bus, _ = make_bus(emu)
    d = PCA9685(cfg(PCA9685Config, address=0x41, channel=5, frequency_hz=50, safe_value=0.1), bus)
    await d.open()
    assert emu.ignored_prescale_writes == 0  # PRE_SCALE was written while asleep
    assert emu.regs[proto.REG_PRE_SCALE] == proto.prescale_for(50)
    assert emu.frequency_hz == pytest.approx(50, rel=0.01)
    mode1 = emu.regs[proto.REG_MODE1]
    assert not mode1 & proto.MODE1_SLEEP and mode1 & proto.MODE1_AI
    assert emu.duty(5) == pytest.approx(0.1, abs=1 / 4096)  # the safe value
    assert all(emu.duty(ch) == 0.0 for ch in range(16) if ch != 5)
    await d.write(0.75)
    assert emu.duty(5) == pytest.approx(0.75, abs=1 / 4096)
    await d.write(1.0)
    assert emu.duty(5) == 1.0
    await d.write(3.0)
    assert emu.duty(5) == 1.0 and d.counters["clamped"] == 1
    await d.close()
    assert emu.duty(5) == pytest.approx(0.1, abs=1 / 4096)


async def test_second_channel_at_same_frequency_does_not_restart(make_bus: MakeBus) -> None:
    emu = EmulatedPCA9685()
    bus, _ = make_bus(emu)
    a = PCA9685(cfg(PCA9685Config, channel=0, frequency_hz=200), bus)
    b = PCA9685(cfg(PCA9685Config, channel=1, frequency_hz=200, invert=True), bus)
    await a.open()
    await a.write(0.25)
    await b.open()  # same prescale: no sleep, so channel 0 keeps running
    assert a.counters["restarts"] == 1 and b.counters["restarts"] == 0
    assert not any(r == proto.REG_MODE1 and v & proto.MODE1_SLEEP for r, v in emu.writes[-6:])
    await b.write(0.25)  # inverted
    assert emu.duty(0) == pytest.approx(0.25, abs=1 / 4096)
    assert emu.duty(1) == pytest.approx(0.75, abs=1 / 4096)


async def test_a_frequency_change_restarts_and_keeps_other_duties(make_bus: MakeBus) -> None:
    emu = EmulatedPCA9685()
    bus, _ = make_bus(emu)
    a = PCA9685(cfg(PCA9685Config, channel=0, frequency_hz=200), bus)
    await a.open()
    await a.write(0.5)
    b = PCA9685(cfg(PCA9685Config, channel=1, frequency_hz=1000), bus)
    await b.open()
    assert emu.restarts == 1  # RESTART resumed the running outputs
    assert emu.duty(0) == pytest.approx(0.5, abs=1 / 4096)
    assert emu.frequency_hz == pytest.approx(1000, rel=0.02)


async def test_emulator_ignores_prescale_while_awake(make_bus: MakeBus) -> None:
    emu = EmulatedPCA9685()
    bus, _ = make_bus(emu)
    await bus.write_byte(0x40, proto.REG_MODE1, 0x01)  # wake without touching PRE_SCALE
    await bus.write_byte(0x40, proto.REG_PRE_SCALE, 0x05)
    assert emu.ignored_prescale_writes == 1 and emu.regs[proto.REG_PRE_SCALE] == 0x1E


async def test_wrong_address_and_nack_are_device_errors(make_bus: MakeBus) -> None:
    emu = EmulatedPCA9685(0x40)
    bus, _ = make_bus(emu)
    d = PCA9685(cfg(PCA9685Config, address=0x42), bus)
    with pytest.raises(DeviceError, match="0x42"):
        await d.open()
    d = PCA9685(cfg(PCA9685Config), bus)
    await d.open()
    emu.inject_nack(1)
    with pytest.raises(DeviceError):
        await d.write(0.5)
    assert d.counters["bus_errors"] == 1
    emu.unplug()
    emu.replug()  # power-on state: asleep again; re-open programs it again
    await d.open()
    await d.write(0.5)
    assert emu.duty(0) == pytest.approx(0.5, abs=1 / 4096)
