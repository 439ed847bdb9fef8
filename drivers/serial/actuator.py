"""`serial_command` actuator: a value written to a serial port as a text command.

The config's `template` is a Python format string with one field, `value`
(e.g. ``"RELAY {value:d}\\n"`` or ``"SET {value:.2f}\\r\\n"``). Before formatting the value
is scaled (``value * scale + offset``); integral results are passed as int so that
``{value:d}`` works, others as float (a ``{value:d}`` template then refuses a fractional
value with a clear error instead of sending something else). The template is checked at
config time. Writes go through the same shared `AsyncSerialPort` as the sensors on that
port and take its `transaction()` lock, so a command never lands in the middle of a
Modbus exchange. An optional `expect` string waits for a reply line that must contain it
(an instrument's ``OK``) within `write_timeout_ms`.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from drivers.base import ActuatorConfig, Resources
from drivers.errors import DeviceError
from drivers.registry import ActuatorSpec
from drivers.serial.common import DelimitedFramer, PortUser, check_serial_keys, open_port

__all__ = ["ACTUATOR", "SerialCommandActuator", "SerialCommandConfig", "render_command"]


class SerialCommandConfig(ActuatorConfig, tag="serial_command", kw_only=True):
    port: str
    template: str  # e.g. "RELAY {value:d}\n"
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    scale: float = 1.0
    offset: float = 0.0
    encoding: str = "ascii"
    expect: str | None = None  # reply line must contain this (else DeviceError)

    def __post_init__(self) -> None:
        check_serial_keys(self)
        try:
            render_command(self.template, 1.0, 1.0, 0.0, self.encoding)
        except (ValueError, KeyError, IndexError, LookupError) as exc:
            raise ValueError(
                f"template: {self.template!r} cannot be formatted with a value "
                f"(use one field named value, e.g. 'RELAY {{value:d}}\\n'): {exc}"
            ) from None
        if not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise ValueError("scale and offset must be finite")


def render_command(
    template: str, value: float, scale: float = 1.0, offset: float = 0.0, encoding: str = "ascii"
) -> bytes:
    """Pure: the bytes written for `value`. ValueError for a value the template refuses."""
    v = value * scale + offset
    if not math.isfinite(v):
        raise ValueError(f"value {value!r} is not finite")
    arg: int | float = int(v) if float(v).is_integer() else v
    try:
        text = template.format(value=arg)
    except ValueError as exc:
        raise ValueError(f"template {template!r} refuses value {v!r}: {exc}") from None
    return text.encode(encoding)


class SerialCommandActuator(PortUser):
    def __init__(self, cfg: SerialCommandConfig, resources: Resources) -> None:
        self.cfg = cfg
        self.port: Any = open_port(cfg, resources)
        self.counters: dict[str, int] = {"writes": 0, "errors": 0}

    async def write(self, value: float) -> None:
        data = render_command(
            self.cfg.template, value, self.cfg.scale, self.cfg.offset, self.cfg.encoding
        )
        timeout_s = self.cfg.write_timeout_ms / 1000.0
        try:
            async with asyncio.timeout(timeout_s), self.port.transaction():
                if self.cfg.expect is not None:
                    self.port.discard_input()
                await self.port.write(data)
                self.port.record_frame(data)
                if self.cfg.expect is not None:
                    await self._await_reply(self.cfg.expect)
        except TimeoutError:
            self.counters["errors"] += 1
            raise DeviceError(
                f"serial_command {self.cfg.port}: no reply containing "
                f"{self.cfg.expect!r} within {self.cfg.write_timeout_ms} ms"
            ) from None
        except DeviceError:
            self.counters["errors"] += 1
            raise
        self.counters["writes"] += 1

    async def _await_reply(self, expect: str) -> None:
        framer = DelimitedFramer(b"\n", 1024)
        while True:
            for line in framer.feed(await self.port.read_some()):
                self.port.record_frame(line)
                if expect.encode(self.cfg.encoding) in line:
                    return


def _factory(cfg: SerialCommandConfig, resources: Resources) -> SerialCommandActuator:
    return SerialCommandActuator(cfg, resources)


ACTUATOR = ActuatorSpec(
    name="serial_command",
    config_type=SerialCommandConfig,
    factory=_factory,
    summary="write a formatted text command (e.g. 'RELAY {value:d}') to a serial port",
)
