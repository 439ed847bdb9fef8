"""NXP PCA9685 16-channel 12-bit PWM controller as an actuator (driver name `pca9685`).

Theory of operation
-------------------
Protocol part (pure), from the datasheet (rev. 4, §7.3): MODE1 (0x00; power-on 0x11:
SLEEP | ALLCALL) and MODE2 (0x01; power-on 0x04: OUTDRV totem pole), then four registers
per channel from LED0_ON_L (0x06): ON_L, ON_H, OFF_L, OFF_H, i.e. channel n at
0x06 + 4n. The 12-bit counter runs 0..4095 each period; the output turns on at the ON
count and off at the OFF count. Bit 4 of ON_H is "full on", bit 4 of OFF_H "full off"
(full off wins). The period comes from the internal 25 MHz oscillator through PRE_SCALE
(0xFE): prescale = round(25 MHz / (4096 * f)) - 1, legal 3..255 (about 1526 Hz down to
24 Hz; power-on 0x1E = 200 Hz). `prescale_for()` and `duty_registers()` are pure.

PRE_SCALE can only be written while the oscillator sleeps (MODE1.SLEEP = 1), so the
frequency is programmed by the datasheet's sequence (§7.3.1.1): MODE1 with SLEEP set,
write PRE_SCALE, MODE1 with SLEEP clear, wait 500 µs for the oscillator, then MODE1 with
RESTART (bit 7) set so the PWM channels resume their previous duty. The driver also sets
AI (auto-increment, bit 5) so a channel's four registers go in one block write.

Driver part: one actuator drives one channel. `open()` reads MODE1 (a NACK means no chip
at the address: DeviceError), checks PRE_SCALE and programs the frequency only if it
differs (another loop driving another channel of the same chip at the same frequency
must not glitch every output with a sleep/restart), sets MODE2's output stage and then
writes the safe value. `write(value)` maps 0..1 (clamped and counted) to an OFF count
(ON count 0); exactly 0 is "full off" and 1 "full on", so the extremes are true DC
levels, not a 1/4096 sliver. `invert` maps value v to 1 - v in software (MODE2.INVRT
would do it in hardware but is only meaningful with external drivers, datasheet §7.3.2).
All channels of one chip share one frequency: configure the same `frequency_hz` for
every channel of a chip (the last one opened wins otherwise).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from drivers.base import ActuatorConfig, AsyncI2CBusLike, DeviceError, Resources
from drivers.i2c.common import check_bus
from drivers.registry import ActuatorSpec

__all__ = [
    "ACTUATOR",
    "PCA9685",
    "PCA9685Config",
    "duty_registers",
    "frequency_for",
    "prescale_for",
]

REG_MODE1 = 0x00
REG_MODE2 = 0x01
REG_LED0 = 0x06
REG_ALL_LED = 0xFA
REG_PRE_SCALE = 0xFE

MODE1_RESTART = 0x80
MODE1_EXTCLK = 0x40
MODE1_AI = 0x20
MODE1_SLEEP = 0x10
MODE1_ALLCALL = 0x01
MODE1_DEFAULT = MODE1_SLEEP | MODE1_ALLCALL  # 0x11
MODE2_INVRT = 0x10
MODE2_OUTDRV = 0x04
MODE2_DEFAULT = MODE2_OUTDRV  # 0x04
PRE_SCALE_DEFAULT = 0x1E
FULL_BIT = 0x10  # bit 4 of LEDn_ON_H (full on) / LEDn_OFF_H (full off)

OSC_HZ = 25_000_000.0
STEPS = 4096
PRESCALE_MIN, PRESCALE_MAX = 3, 255
OSC_SETTLE_S = 500e-6  # datasheet: oscillator up within 500 µs after SLEEP clears


def led_register(channel: int) -> int:
    """LEDn_ON_L of a channel (0..15)."""
    if not 0 <= channel <= 15:
        raise ValueError(f"channel {channel}: expected 0..15")
    return REG_LED0 + 4 * channel


def prescale_for(frequency_hz: float, osc_hz: float = OSC_HZ) -> int:
    """PRE_SCALE for an output frequency (datasheet equation 1), range-checked."""
    value = round(osc_hz / (STEPS * frequency_hz)) - 1
    if not PRESCALE_MIN <= value <= PRESCALE_MAX:
        lo = osc_hz / (STEPS * (PRESCALE_MAX + 1))
        hi = osc_hz / (STEPS * (PRESCALE_MIN + 1))
        raise ValueError(
            f"frequency_hz {frequency_hz:g}: expected {lo:.0f}..{hi:.0f} Hz with the "
            f"{osc_hz / 1e6:g} MHz oscillator (prescale {value} outside 3..255)"
        )
    return value


def frequency_for(prescale: int, osc_hz: float = OSC_HZ) -> float:
    """The output frequency a PRE_SCALE value gives."""
    return osc_hz / (STEPS * (prescale + 1))


def duty_registers(value: float) -> tuple[bytes, bool]:
    """0..1 -> (the 4 bytes ON_L, ON_H, OFF_L, OFF_H; was the value clamped?).

    0 is full off and 1 full on (true DC levels); in between the output is on from
    count 0 to count round(value * 4096) (1..4095).
    """
    clamped = not 0.0 <= value <= 1.0
    v = min(1.0, max(0.0, value))
    if v <= 0.0:
        return bytes([0, 0, 0, FULL_BIT]), clamped
    if v >= 1.0:
        return bytes([0, FULL_BIT, 0, 0]), clamped
    off = min(STEPS - 1, max(1, round(v * STEPS)))
    return bytes([0, 0, off & 0xFF, off >> 8]), clamped


class PCA9685Config(ActuatorConfig, tag="pca9685"):
    """```yaml
    actuator:
      driver: pca9685
      bus: 1
      address: 0x40          # 0x40..0x7f by the A5..A0 straps (0x70 is ALLCALL)
      channel: 0             # LED0..LED15
      frequency_hz: 1000     # 24..1526 Hz; the same for every channel of one chip
      output: totem_pole     # totem_pole | open_drain (MODE2.OUTDRV)
      invert: false          # drive 1 - value
      safe_value: 0.0        # duty 0..1 applied at start, on shutdown and on fault
    ```"""

    bus: int = 1
    address: int = 0x40
    channel: int = 0
    frequency_hz: float = 1000.0
    output: Literal["totem_pole", "open_drain"] = "totem_pole"
    invert: bool = False

    def __post_init__(self) -> None:
        check_bus(self.bus)
        if not 0x40 <= self.address <= 0x7F or self.address == 0x70:
            raise ValueError(
                f"address {self.address:#04x}: expected 0x40..0x7f (A5..A0 straps), "
                "not 0x70 (the ALLCALL address every PCA9685 answers)"
            )
        led_register(self.channel)
        prescale_for(self.frequency_hz)

    def target(self) -> str:
        return f"i2c-{self.bus}@0x{self.address:02x}/led{self.channel}"


class PCA9685:
    def __init__(self, cfg: PCA9685Config, bus: AsyncI2CBusLike) -> None:
        self.cfg = cfg
        self.bus = bus
        self.prescale = prescale_for(cfg.frequency_hz)
        self.frequency_hz = frequency_for(self.prescale)
        self.counters = {"writes": 0, "clamped": 0, "bus_errors": 0, "restarts": 0}
        self.last_value: float | None = None

    @property
    def where(self) -> str:
        return f"i2c bus {self.bus.bus_id} addr 0x{self.cfg.address:02x} (PCA9685)"

    async def _get(self, reg: int) -> int:
        return (await self.bus.read_block(self.cfg.address, reg, 1))[0]

    async def _put(self, reg: int, value: int) -> None:
        await self.bus.write_byte(self.cfg.address, reg, value)

    async def open(self) -> None:
        try:
            mode1 = await self._get(REG_MODE1)
            prescale = await self._get(REG_PRE_SCALE)
            if mode1 & MODE1_EXTCLK:
                raise DeviceError(f"{self.where}: MODE1 0x{mode1:02x} selects EXTCLK, not ours")
            awake = mode1 & ~(MODE1_SLEEP | MODE1_RESTART)
            if prescale != self.prescale or mode1 & MODE1_SLEEP:
                # datasheet §7.3.1.1: PRE_SCALE only while asleep; restart keeps duties
                await self._put(REG_MODE1, awake | MODE1_SLEEP)
                await self._put(REG_PRE_SCALE, self.prescale)
                await self._put(REG_MODE1, awake | MODE1_AI)
                await asyncio.sleep(OSC_SETTLE_S)
                await self._put(REG_MODE1, awake | MODE1_AI | MODE1_RESTART)
                self.counters["restarts"] += 1
            elif not mode1 & MODE1_AI:
                await self._put(REG_MODE1, awake | MODE1_AI)
            got = await self._get(REG_PRE_SCALE)
            if got != self.prescale:
                raise DeviceError(
                    f"{self.where}: PRE_SCALE reads {got}, expected {self.prescale} after "
                    "programming (not a PCA9685?)"
                )
            mode2 = MODE2_OUTDRV if self.cfg.output == "totem_pole" else 0
            await self._put(REG_MODE2, mode2)
        except DeviceError:
            self.counters["bus_errors"] += 1
            raise
        await self.write(self.cfg.safe_value)

    async def write(self, value: float) -> None:
        v = 1.0 - value if self.cfg.invert else value
        data, clamped = duty_registers(v)
        if clamped:
            self.counters["clamped"] += 1
        try:
            await self.bus.write_block(self.cfg.address, led_register(self.cfg.channel), data)
        except DeviceError:
            self.counters["bus_errors"] += 1
            raise
        self.counters["writes"] += 1
        self.last_value = float(value)

    async def close(self) -> None:
        await self.write(self.cfg.safe_value)


def _factory(cfg: Any, resources: Resources) -> PCA9685:
    return PCA9685(cfg, resources.i2c_bus(cfg.bus))


ACTUATOR = ActuatorSpec(
    name="pca9685",
    config_type=PCA9685Config,
    factory=_factory,
    summary="one channel of an NXP PCA9685 16-channel 12-bit PWM controller (I2C)",
)
