"""TI INA219 current / power monitor (driver name `ina219`): battery and charger rails.

Theory of operation
-------------------
Protocol part (pure): six 16-bit big-endian registers behind a pointer byte (datasheet
§8.6): configuration (BRNG bus range, PG shunt range 40..320 mV, bus/shunt ADC resolution
or averaging, mode), shunt voltage (signed, LSB 10 µV), bus voltage (bits 15..3, LSB
4 mV; bit 1 CNVR conversion ready, bit 0 OVF math overflow), power, current and
calibration. The part computes current and power itself from the calibration register
(datasheet §8.5.1, equations 1..4):

    Current_LSB = max expected current / 2^15   (or a rounder value above it)
    Cal         = trunc(0.04096 / (Current_LSB * R_shunt))
    Current     = Shunt_voltage_register * Cal / 4096      (in Current_LSB)
    Power       = Current_register * Bus_voltage_register / 5000  (in 20 * Current_LSB)

`calibration()` returns (Cal, Current_LSB, Power_LSB); the datasheet's example (R_shunt
0.1 Ω, Current_LSB 100 µA) gives Cal 4096 and Power_LSB 2 mW.

Driver part: continuous shunt+bus conversions at the configured ADC setting. `read()`
reads the calibration register (a part that reset after a brown-out reads 0 and would
report zero current forever: the driver re-writes it and reports the fault), bus voltage
(OVF flags current and power BAD), shunt voltage, current and power.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence

from drivers.base import AsyncI2CBusLike, ChannelInfo, DeviceError, Quality, Reading, SensorConfig
from drivers.i2c.common import I2CSensor, check_address, check_bus, check_choice, i2c_factory
from drivers.registry import SensorSpec

# -- protocol ------------------------------------------------------------------------------

REG_CONFIG = 0x00
REG_SHUNT = 0x01
REG_BUS = 0x02
REG_POWER = 0x03
REG_CURRENT = 0x04
REG_CALIBRATION = 0x05
# what read() fetches, in order; POWER last: reading it clears the CNVR flag
_READ_REGS = (REG_CALIBRATION, REG_BUS, REG_SHUNT, REG_CURRENT, REG_POWER)
CONFIG_DEFAULT = 0x399F
CONFIG_RESET = 0x8000
BUS_CNVR = 0x0002
BUS_OVF = 0x0001

SHUNT_LSB_V = 10e-6
BUS_LSB_V = 4e-3
SHUNT_RANGES_MV = (40, 80, 160, 320)  # PG /1 /2 /4 /8
BUS_RANGES_V = (16, 32)
ADC_SAMPLES = (1, 2, 4, 8, 16, 32, 64, 128)
# 4-bit ADC field for 12-bit single conversion (1) or averaging n samples
ADC_CODE = {
    1: 0b0011,
    2: 0b1001,
    4: 0b1010,
    8: 0b1011,
    16: 0b1100,
    32: 0b1101,
    64: 0b1110,
    128: 0b1111,
}
MODE_SHUNT_BUS_CONTINUOUS = 0b111

_PINS = ("GND", "VS", "SDA", "SCL")
ADDRESSES = {
    0x40 + 4 * a1 + a0: f"A1={_PINS[a1]} A0={_PINS[a0]}" for a1 in range(4) for a0 in range(4)
}


def adc_time_s(code: int) -> float:
    """Conversion time of one ADC setting (datasheet Table 5)."""
    if not code & 0b1000:
        return (84e-6, 148e-6, 276e-6, 532e-6)[code & 0b11]
    n = 1 << (code & 0b111)
    return (
        532e-6
        if n == 1
        else {
            2: 1.06e-3,
            4: 2.13e-3,
            8: 4.26e-3,
            16: 8.51e-3,
            32: 17.02e-3,
            64: 34.05e-3,
            128: 68.10e-3,
        }[n]
    )


def config_word(
    bus_range_v: int, shunt_range_mv: int, adc_samples: int, mode: int = MODE_SHUNT_BUS_CONTINUOUS
) -> int:
    adc = ADC_CODE[adc_samples]
    return (
        (BUS_RANGES_V.index(bus_range_v) << 13)
        | (SHUNT_RANGES_MV.index(shunt_range_mv) << 11)
        | (adc << 7)
        | (adc << 3)
        | mode
    )


def calibration(
    shunt_ohms: float, max_current_a: float, current_lsb_a: float | None = None
) -> tuple[int, float, float]:
    """-> (calibration register, current LSB in A, power LSB in W), datasheet §8.5.1."""
    lsb = current_lsb_a if current_lsb_a is not None else max_current_a / 32768.0
    cal = math.trunc(0.04096 / (lsb * shunt_ohms)) & 0xFFFE  # bit 0 is void
    if not 1 < cal <= 0xFFFE:
        raise ValueError(
            f"calibration {cal} out of 2..65534 for shunt {shunt_ohms} Ω and current LSB "
            f"{lsb * 1e6:.3g} µA: use a larger shunt or a smaller current resolution"
        )
    return cal, lsb, 20.0 * lsb


def signed16(v: int) -> int:
    return v - 0x10000 if v & 0x8000 else v


def shunt_volts(reg: int) -> float:
    return signed16(reg) * SHUNT_LSB_V


def bus_volts(reg: int) -> float:
    return (reg >> 3) * BUS_LSB_V


# -- config ----------------------------------------------------------------------------------


class INA219Config(SensorConfig, tag="ina219"):
    """```yaml
    - id: battery
      driver: ina219
      bus: 1
      address: 0x40           # 0x40..0x4f by the A1/A0 straps (GND, VS, SDA, SCL)
      shunt_ohms: 0.1
      max_current_a: 3.2      # sets the current LSB (max / 32768) and the calibration
      shunt_range_mv: 320     # 40, 80, 160, 320 (PGA): must cover max_current_a * shunt_ohms
      bus_range_v: 32         # 16 or 32
      adc_samples: 8          # 1 (12-bit, 532 µs) .. 128 (68 ms) averaged samples
    ```"""

    bus: int = 1
    address: int = 0x40
    shunt_ohms: float = 0.1
    max_current_a: float = 3.2
    current_lsb_a: float | None = None  # override the computed LSB (a round value)
    shunt_range_mv: int = 320
    bus_range_v: int = 32
    adc_samples: int = 1

    def __post_init__(self) -> None:
        check_bus(self.bus)
        check_address("INA219", self.address, ADDRESSES)
        check_choice("shunt_range_mv", self.shunt_range_mv, SHUNT_RANGES_MV, " mV")
        check_choice("bus_range_v", self.bus_range_v, BUS_RANGES_V, " V")
        check_choice("adc_samples", self.adc_samples, ADC_SAMPLES)
        if self.shunt_ohms <= 0 or self.max_current_a <= 0:
            raise ValueError("shunt_ohms and max_current_a must be > 0")
        drop_mv = self.max_current_a * self.shunt_ohms * 1000.0
        if drop_mv > self.shunt_range_mv + 1e-9:
            raise ValueError(
                f"max_current_a {self.max_current_a:g} A through shunt_ohms "
                f"{self.shunt_ohms:g} Ω drops {drop_mv:g} mV, more than shunt_range_mv "
                f"{self.shunt_range_mv} mV"
            )
        calibration(self.shunt_ohms, self.max_current_a, self.current_lsb_a)


# -- driver ------------------------------------------------------------------------------------


class INA219(I2CSensor):
    channels: Sequence[ChannelInfo] = (
        ChannelInfo("bus_voltage", "V"),
        ChannelInfo("shunt_voltage", "V"),
        ChannelInfo("current", "A"),
        ChannelInfo("power", "W"),
    )

    def __init__(self, cfg: INA219Config, bus: AsyncI2CBusLike) -> None:
        super().__init__(bus, cfg.address, "overflow", "config_lost")
        self.cfg = cfg
        self.cal, self.current_lsb, self.power_lsb = calibration(
            cfg.shunt_ohms, cfg.max_current_a, cfg.current_lsb_a
        )
        self._config = config_word(cfg.bus_range_v, cfg.shunt_range_mv, cfg.adc_samples)
        adc = adc_time_s(ADC_CODE[cfg.adc_samples])
        self.conversion_s = 2 * adc  # shunt + bus conversions, continuous mode

    async def _get(self, reg: int) -> int:
        return int.from_bytes(await self.bus.read_block(self.addr, reg, 2), "big")

    async def _put(self, reg: int, value: int) -> None:
        await self.bus.write_block(self.addr, reg, value.to_bytes(2, "big"))

    async def open(self) -> None:
        await self._put(REG_CONFIG, CONFIG_RESET)
        cfg = await self._get(REG_CONFIG)
        if cfg != CONFIG_DEFAULT:
            raise DeviceError(
                f"{self.where}: after reset the config register reads "
                f"0x{cfg:04x}, expected 0x{CONFIG_DEFAULT:04x} (INA219)"
            )
        await self._configure()

    async def _configure(self) -> None:
        await self._put(REG_CALIBRATION, self.cal)
        await self._put(REG_CONFIG, self._config)
        await asyncio.sleep(self.conversion_s * 1.1)  # the first conversion

    async def read(self) -> Sequence[Reading]:
        with self.counting_read():
            # one hop to the bus worker for all five registers (no auto-increment on
            # this part: five pointer-write + read transactions, in this order)
            raw = await self.bus.read_registers(self.addr, _READ_REGS, 2)
            cal, bus_reg, shunt_reg, current_reg, power_reg = (
                int.from_bytes(w, "big") for w in raw
            )
            if cal != self.cal:
                self.counters["config_lost"] += 1
                await self._configure()
                raise DeviceError(
                    f"{self.where}: INA219 calibration reads {cal}, expected {self.cal} "
                    "(reset?): re-written"
                )
        q = Quality.GOOD
        if bus_reg & BUS_OVF:
            self.counters["overflow"] += 1
            q = Quality.BAD
        return (
            Reading("bus_voltage", bus_volts(bus_reg)),
            Reading("shunt_voltage", shunt_volts(shunt_reg)),
            Reading("current", signed16(current_reg) * self.current_lsb, q),
            Reading("power", power_reg * self.power_lsb, q),
        )

    async def close(self) -> None:
        with contextlib.suppress(DeviceError):  # power-down mode
            await self._put(REG_CONFIG, self._config & ~0b111)


_factory = i2c_factory(INA219)


SENSOR = SensorSpec(
    name="ina219",
    config_type=INA219Config,
    factory=_factory,
    transport="i2c",
    summary="TI INA219 bus voltage (V), shunt voltage (V), current (A), power (W), I2C 0x40-0x4F",
)
