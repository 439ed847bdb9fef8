"""serial_command actuator against a pty device; registry wiring of the serial drivers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from drivers.emulated.serial import PtySerialDevice
from drivers.errors import DeviceError
from drivers.registry import actuator_drivers, sensor_drivers
from drivers.serial.actuator import SerialCommandActuator, SerialCommandConfig, render_command


class Relay(PtySerialDevice):
    """Records command lines; answers OK unless told to stay silent."""

    def __init__(self, link: Path) -> None:
        super().__init__(link)
        self.lines: list[bytes] = []
        self.got_line = asyncio.Event()
        self._buf = b""

    def on_receive(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.append(line)
            self.got_line.set()
            self.send(b"OK " + line + b"\r\n")


def _cfg(path: str, **kw: object) -> SerialCommandConfig:
    return msgspec.convert(
        {"driver": "serial_command", "port": path, "template": "RELAY {value:d}\n", **kw},
        SerialCommandConfig,
    )


def test_render_command() -> None:
    assert render_command("RELAY {value:d}\n", 1.0) == b"RELAY 1\n"
    assert render_command("SET {value:.2f}\r\n", 0.5, scale=100.0, offset=1.0) == b"SET 51.00\r\n"
    with pytest.raises(ValueError, match=r"refuses value 0\.5"):
        render_command("RELAY {value:d}\n", 0.5)
    with pytest.raises(ValueError, match="not finite"):
        render_command("SET {value}\n", float("nan"))


def test_template_checked_at_config_time() -> None:
    with pytest.raises(msgspec.ValidationError, match="template"):
        _cfg("/dev/ttyUSB0", template="RELAY {state}\n")
    with pytest.raises(msgspec.ValidationError, match="template"):
        _cfg("/dev/ttyUSB0", template="RELAY {value:q}\n")


async def test_writes_lines_and_checks_reply(
    tmp_path: Path, resources: object, loop_guard: object
) -> None:
    async with Relay(tmp_path / "ttyRELAY") as dev:
        act = SerialCommandActuator(_cfg(dev.path, expect="OK"), resources)  # type: ignore[arg-type]
        await act.open()
        await act.write(1)
        await act.write(0)
        assert dev.lines == [b"RELAY 1", b"RELAY 0"]
        assert act.counters["writes"] == 2
        dev.stall()
        with pytest.raises(DeviceError, match="no reply containing 'OK'"):
            await act.write(1)
        assert act.counters["errors"] == 1
        await act.close()


async def test_write_without_reply(tmp_path: Path, resources: object) -> None:
    async with Relay(tmp_path / "ttyRELAY") as dev:
        act = SerialCommandActuator(
            _cfg(dev.path, template="PWM {value:.1f}\n", scale=100.0), resources
        )  # type: ignore[arg-type]
        await act.open()
        await act.write(0.425)
        async with asyncio.timeout(5):
            await dev.got_line.wait()
        assert dev.lines == [b"PWM 42.5"]
        await act.close()


def test_registry_names() -> None:
    sensors = sensor_drivers()
    for name in ("line", "nmea", "modbus", "cobs"):
        assert sensors[name].transport == "serial"
        assert sensors[name].config_type.__struct_config__.tag == name
    acts = actuator_drivers()
    assert "serial_command" in acts and "modbus_write" in acts
