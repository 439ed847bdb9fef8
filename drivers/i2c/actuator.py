"""A generic I2C register write as an actuator (driver name `i2c_write`).

Theory of operation
-------------------
Control loops drive outputs that are a register on an I2C part: a DAC code, a PWM duty on
a PCA9685-style controller, a digital potentiometer, a register of a custom
microcontroller. The value a loop decides is mapped to a raw register value
(`raw = round(value * scale + offset)`), clamped to what the register can hold (byte or
word, signed or unsigned; a clamp is counted, never silently wrapped), and written with
one transaction on the bus's worker thread, so it is serialised with the sensors on the
same bus. Words are sent MSB first unless `byte_order: little` (SMBus word order).
The configured safe value is written on open, on close and by the daemon on fault.
"""

from __future__ import annotations

from typing import Any, Literal

from drivers.base import ActuatorConfig, AsyncI2CBusLike, DeviceError, Resources
from drivers.i2c.common import check_bus
from drivers.registry import ActuatorSpec

__all__ = ["ACTUATOR", "I2CWrite", "I2CWriteConfig", "to_raw"]


def raw_limits(width: str, signed: bool) -> tuple[int, int]:
    bits = 8 if width == "byte" else 16
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def to_raw(value: float, scale: float, offset: float, width: str, signed: bool) -> tuple[int, bool]:
    """value -> (raw register value, clamped?). Raw is the two's complement bit pattern."""
    lo, hi = raw_limits(width, signed)
    raw = round(value * scale + offset)
    clamped = not lo <= raw <= hi
    raw = max(lo, min(hi, raw))
    bits = 8 if width == "byte" else 16
    return raw & ((1 << bits) - 1), clamped


def encode(raw: int, width: str, byte_order: str) -> bytes:
    if width == "byte":
        return bytes([raw & 0xFF])
    return raw.to_bytes(2, "big" if byte_order == "big" else "little")


class I2CWriteConfig(ActuatorConfig, tag="i2c_write"):
    """```yaml
    loops:
      - id: fan_control
        # ...
        actuator:
          driver: i2c_write
          bus: 1
          address: 0x60        # 7-bit, 0x08..0x77
          register: 0x40
          width: word          # byte | word
          byte_order: big      # word order on the wire: big (MSB first) | little (SMBus)
          signed: false
          scale: 4095.0        # raw = round(value * scale + offset), clamped to the width
          offset: 0.0
          safe_value: 0.0      # written at start, on shutdown and on fault
    ```"""

    bus: int = 1
    address: int = 0x60
    register: int = 0
    width: Literal["byte", "word"] = "byte"
    byte_order: Literal["big", "little"] = "big"
    signed: bool = False
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        check_bus(self.bus)
        if not 0x08 <= self.address <= 0x77:
            raise ValueError(
                f"address {self.address:#04x} is outside the usable 7-bit range 0x08..0x77 "
                "(0x00-0x07 and 0x78-0x7f are reserved by the I2C specification)"
            )
        if not 0 <= self.register <= 0xFF:
            raise ValueError(f"register {self.register:#x} is not a byte (0x00..0xff)")

    def target(self) -> str:
        """The physical output (two loops must not drive the same register)."""
        return f"i2c-{self.bus}@0x{self.address:02x}/0x{self.register:02x}"


class I2CWrite:
    def __init__(self, cfg: I2CWriteConfig, bus: AsyncI2CBusLike) -> None:
        self.cfg = cfg
        self.bus = bus
        self.counters = {"writes": 0, "clamped": 0, "bus_errors": 0}
        self.last_raw: int | None = None

    async def open(self) -> None:
        await self.write(self.cfg.safe_value)

    async def write(self, value: float) -> None:
        c = self.cfg
        raw, clamped = to_raw(value, c.scale, c.offset, c.width, c.signed)
        if clamped:
            self.counters["clamped"] += 1
        try:
            await self.bus.write_block(c.address, c.register, encode(raw, c.width, c.byte_order))
        except DeviceError:
            self.counters["bus_errors"] += 1
            raise
        self.counters["writes"] += 1
        self.last_raw = raw

    async def close(self) -> None:
        await self.write(self.cfg.safe_value)


def _factory(cfg: Any, resources: Resources) -> I2CWrite:
    return I2CWrite(cfg, resources.i2c_bus(cfg.bus))


ACTUATOR = ActuatorSpec(
    name="i2c_write",
    config_type=I2CWriteConfig,
    factory=_factory,
    summary="write a scaled value to a byte/word register of an I2C device",
)
