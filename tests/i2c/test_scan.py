"""i2cdetect-style scan: finds exactly what is attached, read-only, method by range."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from drivers.emulated.bme280 import EmulatedBME280
from drivers.emulated.i2c import EmulatedSMBus, RegisterFile
from drivers.emulated.mpu6050 import EmulatedMPU6050
from drivers.emulated.sht import EmulatedSHT
from drivers.i2c.bus import AsyncI2CBus, I2CError
from drivers.i2c.scan import format_table, present, probe, rows, scan, scan_bus, uses_read

from .conftest import MakeBus


class MessageLog(RegisterFile):
    def __init__(self, address: int) -> None:
        super().__init__(address)
        self.msgs: list[Any] = []

    def transaction(self, msgs: Any) -> list[bytes]:
        self.msgs.append(list(msgs))
        return super().transaction(msgs)


def test_scan_finds_exactly_the_attached_addresses() -> None:
    attached = [0x0C, 0x44, 0x50, 0x68, 0x76, 0x77]
    smbus = EmulatedSMBus([RegisterFile(a) for a in attached])
    result = scan(smbus)
    assert sorted(result) == list(range(0x08, 0x78))
    assert present(result) == [a for a in attached]
    assert all(result[a] == "absent" for a in result if a not in attached)


def test_probe_method_follows_i2cdetect_and_writes_nothing() -> None:
    eeprom, sensor = MessageLog(0x50), MessageLog(0x40)
    smbus = EmulatedSMBus([eeprom, sensor])
    assert probe(smbus, 0x50) == "present" and probe(smbus, 0x40) == "present"
    assert eeprom.msgs == [[("r", 1)]]  # receive byte in the EEPROM range
    assert sensor.msgs == [[("w", b"")]]  # quick write (no data) elsewhere
    assert eeprom.writes == [] and sensor.writes == []
    assert uses_read(0x30) and uses_read(0x5F) and not uses_read(0x2F) and not uses_read(0x60)


def test_in_use_addresses_are_not_probed() -> None:
    dev = MessageLog(0x44)
    smbus = EmulatedSMBus([dev])
    result = scan(smbus, in_use={0x44})
    assert result[0x44] == "in_use" and dev.msgs == []


class BusyBus(EmulatedSMBus):
    def write_quick(self, i2c_addr: int, force: bool | None = None) -> None:
        if i2c_addr == 0x3C:
            raise OSError(errno.EBUSY, "Device or resource busy")
        super().write_quick(i2c_addr, force)


def test_kernel_owned_address_is_busy() -> None:
    result = scan(BusyBus([]), first=0x3C, last=0x3D)
    assert result == {0x3C: "busy", 0x3D: "absent"}
    assert "UU" in format_table(result)


async def test_scan_bus_through_worker_with_real_emulators(make_bus: MakeBus) -> None:
    devs = [EmulatedBME280(0x77), EmulatedSHT("sht4x", 0x44), EmulatedMPU6050(0x69)]
    bus, smbus = make_bus(*devs)
    result = await scan_bus(bus, in_use={0x69})
    assert present(result) == [0x44, 0x69, 0x77]
    assert result[0x69] == "in_use" and result == scan(smbus, in_use={0x69})
    table = format_table(result)
    assert "40: -- -- -- -- 44" in table and "70: -- -- -- -- -- -- -- 77" in table
    assert "60: -- -- -- -- -- -- -- -- -- UU" in table


class BrokenAdapter(EmulatedSMBus):
    def write_quick(self, i2c_addr: int, force: bool | None = None) -> None:
        raise OSError(errno.EACCES, "Permission denied")


def test_adapter_failure_ends_the_scan_but_nacks_and_busy_do_not() -> None:
    with pytest.raises(OSError) as ei:
        scan(BrokenAdapter([]))
    assert ei.value.errno == errno.EACCES
    result = scan(BusyBus([RegisterFile(0x3D)]), in_use={0x3E}, first=0x3B, last=0x3E)
    assert result == {0x3B: "absent", 0x3C: "busy", 0x3D: "present", 0x3E: "in_use"}
    assert rows(result, {0x3E: "oled"}) == [
        {"address": "0x3c", "status": "busy", "sensor": None, "part": "ssd1306 display"},
        {"address": "0x3d", "status": "responds", "sensor": None, "part": None},
        {"address": "0x3e", "status": "in use", "sensor": "oled", "part": None},
    ]


async def test_scan_bus_names_the_bus_when_the_adapter_fails() -> None:
    bus = AsyncI2CBus.from_smbus(BrokenAdapter([]), "emu-9")
    try:
        with pytest.raises(I2CError) as ei:
            await scan_bus(bus)
        assert ei.value.errno == errno.EACCES and "emu-9" in str(ei.value)
    finally:
        await bus.close()
