"""`modbus_write` actuator: a value written to a holding register of a Modbus RTU slave.

The value is converted to the register's raw number (``raw = (value - offset) / scale``,
rounded for integer types, range-checked: a value the register cannot hold raises
ValueError instead of wrapping around) and encoded with the register-map codec of
drivers/serial/modbus.py (int16/uint16: one register, FC 6 by default; int32/uint32/
float32: two registers in `word_order`, FC 16 only, which config checks refuse to mix).
The write shares the port's transaction lock with the Modbus sensors on the same line.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from drivers.base import ActuatorConfig, Resources
from drivers.registry import ActuatorSpec
from drivers.serial.common import PortUser, check_serial_keys, open_port
from drivers.serial.modbus import WIDTH, ModbusMaster, RegType, WordOrder, encode_value

__all__ = ["ACTUATOR", "ModbusWriteActuator", "ModbusWriteConfig", "raw_registers"]


class ModbusWriteConfig(ActuatorConfig, tag="modbus_write", kw_only=True):
    port: str
    unit: int  # 1..247 (0 = broadcast: written to every slave, no reply)
    address: int  # holding register, 0-based
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    type: RegType = "uint16"
    word_order: WordOrder = "big"
    function: Literal[6, 16] | None = None  # default: 6 for 16-bit types, 16 for 32-bit
    scale: float = 1.0  # engineering value = raw * scale + offset
    offset: float = 0.0

    def __post_init__(self) -> None:
        check_serial_keys(self)
        if not 0 <= self.unit <= 247:
            raise ValueError(f"unit: expected 0..247, got {self.unit}")
        if not 0 <= self.address or self.address + WIDTH[self.type] > 0x10000:
            raise ValueError(f"address: {self.type} at {self.address} does not fit in 0..65535")
        if self.function == 6 and WIDTH[self.type] != 1:
            raise ValueError(f"function: 6 writes one register, {self.type} needs two (use 16)")
        if not math.isfinite(self.scale) or self.scale == 0 or not math.isfinite(self.offset):
            raise ValueError("scale must be finite and non-zero, offset finite")

    @property
    def fc(self) -> int:
        if self.function is not None:
            return self.function
        return 6 if WIDTH[self.type] == 1 else 16


def raw_registers(cfg: ModbusWriteConfig, value: float) -> list[int]:
    """Pure: engineering value -> register words. ValueError if it does not fit."""
    if not math.isfinite(value):
        raise ValueError(
            f"modbus_write {cfg.port} unit {cfg.unit} register {cfg.address}: value {value!r} is not finite"
        )
    raw = (value - cfg.offset) / cfg.scale
    try:
        return encode_value(raw, cfg.type, cfg.word_order)
    except ValueError as exc:
        raise ValueError(
            f"modbus_write {cfg.port} unit {cfg.unit} register {cfg.address}: {exc}"
        ) from None


class ModbusWriteActuator(PortUser):
    def __init__(self, cfg: ModbusWriteConfig, resources: Resources) -> None:
        self.cfg = cfg
        self.port: Any = open_port(cfg, resources)
        self.master = ModbusMaster(self.port, timeout_s=cfg.write_timeout_ms / 1000.0)
        self.counters = self.master.counters

    async def write(self, value: float) -> None:
        regs = raw_registers(self.cfg, value)
        if self.cfg.fc == 6:
            await self.master.write_register(self.cfg.unit, self.cfg.address, regs[0])
        else:
            await self.master.write_registers(self.cfg.unit, self.cfg.address, regs)


def _factory(cfg: ModbusWriteConfig, resources: Resources) -> ModbusWriteActuator:
    return ModbusWriteActuator(cfg, resources)


ACTUATOR = ActuatorSpec(
    name="modbus_write",
    config_type=ModbusWriteConfig,
    factory=_factory,
    summary="write a scaled value to a Modbus RTU holding register (FC 6 or 16)",
)
