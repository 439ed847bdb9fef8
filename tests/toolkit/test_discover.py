"""`discover` against the register-level I2C emulators, ptys (NMEA GPS, Modbus slave) and
sysfs-shaped trees: what it identifies, that its fragment passes check-config, and that
it never wrote to a device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from drivers.emulated.ads1115 import EmulatedADS1115
from drivers.emulated.bme280 import EmulatedBME280
from drivers.emulated.i2c import EmulatedDevice, EmulatedSMBus, RegisterFile
from drivers.emulated.ina219 import EmulatedINA219
from drivers.emulated.modbus_slave import ModbusSlaveEmulator, ModbusUnit
from drivers.emulated.mpu6050 import EmulatedMPU6050
from drivers.emulated.nmea_gps import NmeaGpsEmulator
from drivers.emulated.pca9685 import EmulatedPCA9685
from drivers.emulated.sht import EmulatedSHT
from drivers.i2c import sht
from edgerund.cli import main as edgerund_main
from edgerund.toolkit.discover import (
    Options,
    discover,
    identify_i2c,
    in_use_from_sensors,
    render_yaml,
)
from tests.io.test_w1 import PAD_23_125, w1_text
from tests.serial.test_nmea import Fix

MINIMAL = """\
gateway: {id: discover-gw, site: lab}
paths: {state_dir: STATE, run_dir: RUN}
"""


def spy_writes(dev: EmulatedDevice, allowed_commands: set[bytes] = frozenset()) -> list[Any]:  # type: ignore[assignment]
    """Record every write the device accepted that could change it: register data (not
    a bare pointer byte) and, on a Sensirion part, any command it accepted other than the
    allowed read-only ones (a command it NACKs does nothing)."""
    seen: list[Any] = []
    on_write = dev.on_write

    def spy(data: bytes) -> None:
        on_write(data)  # raises Nack when refused: then nothing happened
        pointer_only = len(data) <= 1 and not isinstance(dev, EmulatedSHT)
        if data and not pointer_only and bytes(data) not in allowed_commands:
            seen.append(bytes(data))

    dev.on_write = spy  # type: ignore[method-assign]
    return seen


def make_bus() -> tuple[EmulatedSMBus, dict[str, list[Any]]]:
    serial_cmds = {bytes([sht.SHT4X_READ_SERIAL]), sht.SHT3X_READ_SERIAL.to_bytes(2, "big")}
    devices: dict[str, EmulatedDevice] = {
        "bme280": EmulatedBME280(0x76),
        "mpu6050": EmulatedMPU6050(0x68),
        "sht3x": EmulatedSHT("sht3x", 0x44, serial_number=0x12345678),
        "sht4x": EmulatedSHT("sht4x", 0x46, serial_number=0x0BADC0DE),
        "ads1115": EmulatedADS1115(0x49),
        "ina219": EmulatedINA219(0x40),
        "pca9685": EmulatedPCA9685(0x41),
        "display": RegisterFile(0x3C),
    }
    writes = {
        name: spy_writes(d, serial_cmds if name.startswith("sht") else set())
        for name, d in devices.items()
    }
    return EmulatedSMBus(devices.values()), writes


def test_identify_each_part_by_reads() -> None:
    bus, writes = make_bus()
    assert identify_i2c(bus, 0x76) == ("bme280", "BME280, chip id 0x60 at 0xD0")
    assert identify_i2c(bus, 0x68)[0] == "mpu6050"  # type: ignore[index]
    assert identify_i2c(bus, 0x44) == ("sht:sht3x", "SHT3x, serial number 0x12345678 (CRC valid)")
    assert identify_i2c(bus, 0x46)[0] == "sht:sht4x"  # type: ignore[index]
    assert identify_i2c(bus, 0x49)[0] == "ads1115"  # type: ignore[index]
    assert identify_i2c(bus, 0x40)[0] == "ina219"  # type: ignore[index]
    assert identify_i2c(bus, 0x41)[0] == "pca9685"  # type: ignore[index]
    assert identify_i2c(bus, 0x3C) is None
    assert all(not w for w in writes.values()), writes
    bus.write_byte_data(0x76, 0xF4, 0x27)  # the spy sees a real write (it can fail)
    bus.i2c_rdwr(__import__("smbus2").i2c_msg.write(0x46, [sht.SHT4X_SOFT_RESET]))
    assert writes["bme280"] == [b"\xf4\x27"] and writes["sht4x"] == [b"\x94"]
    # a part that answers with another chip id is not taken for ours
    other = EmulatedBME280(0x77)
    other.regs[0xD0] = 0x58
    assert identify_i2c(EmulatedSMBus([other]), 0x77) == (
        "?BMP280",
        "BMP280, chip id 0x58 at 0xD0 (not driven)",
    )


def test_in_use_from_the_daemon_sensors() -> None:
    i2c, ports = in_use_from_sensors(
        [
            {"id": "env", "where": "i2c-1@0x76"},
            {"id": "gps", "where": "/dev/ttyUSB0"},
            {"id": "meter", "where": "/dev/ttyUSB1 unit 3"},
            {"id": "sim", "where": "sim://gps"},
        ]
    )
    assert i2c == {(1, 0x76): "env"}
    assert ports == {"/dev/ttyUSB0": "gps", "/dev/ttyUSB1": "meter"}


async def test_discover_everything_and_the_fragment_passes_check_config(tmp_path: Path) -> None:
    bus, writes = make_bus()
    # 1-Wire, GPIO and PWM trees
    w1 = tmp_path / "w1"
    (w1 / "28-0316a2791aff").mkdir(parents=True)
    (w1 / "28-0316a2791aff" / "w1_slave").write_text(w1_text(PAD_23_125, 23125))
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "gpiochip0").write_text("")
    pwm = tmp_path / "pwm"
    (pwm / "pwmchip0").mkdir(parents=True)
    (pwm / "pwmchip0" / "npwm").write_text("2\n")
    silent_link = tmp_path / "ttySILENT"
    units = {1: ModbusUnit(holding={0: 2305}), 7: ModbusUnit(inputs={0: 7})}
    async with (
        NmeaGpsEmulator(tmp_path / "ttyGPS", fix=lambda t: Fix(52.5, 13.4), rate_hz=10) as gps,
        ModbusSlaveEmulator(tmp_path / "ttyRS485", units=units) as mb,
        ModbusSlaveEmulator(silent_link, units={}) as silent,
    ):
        opts = Options(
            i2c_buses=[1],
            serial_ports=[gps.path, silent.path],
            modbus_port=mb.path,
            modbus_baud=19200,
            modbus_units=range(1, 9),
            listen_s=0.6,
            nmea_bauds=(9600, 4800),
            dev_root=str(dev),
            w1_root=str(w1),
            pwm_root=str(pwm),
            in_use_i2c={(1, 0x68): "vibration"},
        )
        found = await discover(opts, open_i2c=lambda n: bus)
        assert mb.writes == [] and silent.writes == []  # FC 6/16 never sent
        assert silent.counters["bytes_rx"] == 0  # listened to, never written
    assert all(not w for w in writes.values()), writes
    text = render_yaml(found)
    by_where = {f.where: f for f in found}
    assert by_where["i2c-1 0x68"].section == "configured"  # the daemon's: not probed
    assert by_where["i2c-1 0x3c"].section == "unidentified"
    assert by_where["i2c-1 0x41"].section == "outputs"  # PCA9685: an actuator
    assert by_where[f"{mb.path} unit 1"].entry["registers"][0]["function"] == 3  # type: ignore[index]
    assert by_where[f"{mb.path} unit 7"].entry["registers"][0]["function"] == 4  # type: ignore[index]
    assert by_where[gps.path].entry == {  # the first baud rate tried hears it on a pty
        "id": f"gps_{os.path.basename(gps.path)}",
        "driver": "nmea",
        "port": gps.path,
        "baudrate": 9600,
    }
    assert "no NMEA heard" in by_where[silent.path].what
    drivers = sorted(f.entry["driver"] for f in found if f.section == "sensors" and f.entry)
    assert drivers == [
        "ads1115",
        "bme280",
        "ds18b20",
        "ina219",
        "modbus",
        "modbus",
        "nmea",
        "sht",
        "sht",
    ]
    assert "#   i2c-1 0x3c: responds, not identified (ssd1306 display?)" in text
    assert "#   gpiochip0: GPIO chip" in text and "#   pwmchip0: PWM chip, 2 channels" in text

    cfg = tmp_path / "edgerund.yaml"
    cfg.write_text(
        MINIMAL.replace("STATE", str(tmp_path / "s")).replace("RUN", str(tmp_path / "r")) + text
    )
    assert edgerund_main(["check-config", "-c", str(cfg)]) == 0, text


def test_edgerund_discover_command(tmp_path: Path) -> None:
    w1 = tmp_path / "w1"
    (w1 / "28-00000000abcd").mkdir(parents=True)
    empty = tmp_path / "dev"
    empty.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgerund.cli",
            "discover",
            "--dev-root",
            str(empty),
            "--w1-root",
            str(w1),
            "--pwm-root",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "driver: ds18b20" in r.stdout and 'device: "28-00000000abcd"' in r.stdout


@pytest.mark.parametrize("units", ["0-3", "5-300"])
def test_modbus_unit_range_is_checked(units: str) -> None:
    from edgerund.toolkit.discover import _units

    with pytest.raises(ValueError):
        _units(units)


def test_edgerunctl_discover_leaves_the_running_daemons_ports_alone(tmp_path: Path) -> None:
    """With the daemon running, `edgerunctl discover` asks it what it uses (sensors over
    the socket) and does not touch those ports; another port is still listened to."""
    from tests.helpers.daemon import DaemonProcess

    m1, s1 = os.openpty()
    m2, s2 = os.openpty()
    used, free = os.ttyname(s1), os.ttyname(s2)
    empty = tmp_path / "empty"
    empty.mkdir()
    sensors = [{"id": "gps", "driver": "nmea", "port": used, "baudrate": 9600}]
    try:
        (tmp_path / "d").mkdir()
        with DaemonProcess(tmp_path / "d", {"sensors": sensors}) as d:
            d.wait_ready(60)
            assert {s["id"]: s["where"] for s in d.call("sensors")}["gps"].startswith(used)
            r = subprocess.run(
                [
                    *[sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path],
                    *["discover", "--serial", used, "--serial", free, "--listen-s", "0.2"],
                    *["--dev-root", str(empty), "--w1-root", str(empty), "--pwm-root", str(empty)],
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
    finally:
        for fd in (m1, s1, m2, s2):
            os.close(fd)
    assert r.returncode == 1, r.stderr  # nothing identified
    assert f"#   {used}: configured as sensor 'gps'" in r.stdout
    assert f"#   {free}: no NMEA heard" in r.stdout


def test_a_configured_ina219_is_not_taken_for_a_pca9685() -> None:
    ina = EmulatedINA219(0x40)
    ina.config = 0x39A7  # configured since power-on: MSB 0x39 has ALLCALL and AI "set"
    ina.cal = 4194
    ina.read_word = lambda reg: {0xFE: 0x1E1E, 0x01: 0x0000}.get(reg, ina.config)  # type: ignore[method-assign]
    got = identify_i2c(EmulatedSMBus([ina]), 0x40)
    assert got is not None and got[0] == "?ina219", got
