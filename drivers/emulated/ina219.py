"""TI INA219 emulator: shunt/bus ADCs, PGA clipping, the calibration arithmetic, CNVR/OVF.

Theory of operation
-------------------
The physical inputs are the bus voltage and the load current; the shunt voltage is
current * `shunt_ohms` (the resistor on the emulated board). In the continuous modes a
conversion completes every (bus ADC time + shunt ADC time) from the last config write
(Table 5 times for the selected resolution/averaging); the triggered modes do one
conversion per config write. A completed conversion latches:
  shunt register = round(V_shunt / 10 µV), clipped at the PGA range (±40..±320 mV);
  bus register   = round(V_bus / 4 mV) << 3 | CNVR, clipped at the bus range;
  current        = trunc(shunt * Cal / 4096), power = trunc(current * bus / 5000)
and sets OVF when either calculation leaves the 16-bit register, exactly the arithmetic
the datasheet gives (so a driver that mis-programs Cal reads wrong currents here too).
CNVR is cleared by reading the power register or writing the config register; Cal
resets to 0 at power-on, so current and power read 0 until a driver writes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from drivers.emulated.i2c import Clock, SignalLike, WordRegisterDevice, as_signal
from drivers.i2c.ina219 import (
    BUS_CNVR,
    BUS_LSB_V,
    BUS_OVF,
    CONFIG_DEFAULT,
    CONFIG_RESET,
    REG_BUS,
    REG_CALIBRATION,
    REG_CONFIG,
    REG_CURRENT,
    REG_POWER,
    REG_SHUNT,
    SHUNT_LSB_V,
    SHUNT_RANGES_MV,
    adc_time_s,
)

__all__ = ["EmulatedINA219"]


class EmulatedINA219(WordRegisterDevice):
    part = "ina219"

    def __init__(
        self,
        address: int = 0x40,
        *,
        bus_voltage_v: SignalLike = 12.0,
        current_a: SignalLike = 0.5,
        shunt_ohms: float = 0.1,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        self.bus_voltage_v = as_signal(bus_voltage_v)
        self.current_a = as_signal(current_a)
        self.shunt_ohms = shunt_ohms
        self.conversions = 0
        super().__init__(address, clock=clock, online=online)

    def power_on_reset(self) -> None:
        super().power_on_reset()
        self.config = CONFIG_DEFAULT
        self.cal = 0
        self.shunt = 0
        self.bus = 0  # without flags
        self.current = 0
        self.power = 0
        self.cnvr = False
        self.ovf = False
        self._t0 = self.clock()
        self._done = 0

    def _conv_s(self) -> float:
        mode = self.config & 7
        t = 0.0
        if mode & 0b010:
            t += adc_time_s((self.config >> 7) & 0xF)
        if mode & 0b001:
            t += adc_time_s((self.config >> 3) & 0xF)
        return max(t, 84e-6)

    def _convert(self, t: float) -> None:
        self.conversions += 1
        self.cnvr = True
        if not self.stuck:
            fs = SHUNT_RANGES_MV[(self.config >> 11) & 3] * 100  # in 10 µV units
            v_shunt = self.current_a(t) * self.shunt_ohms
            self.shunt = max(-fs, min(fs, round(v_shunt / SHUNT_LSB_V)))
            bus_max = 4000 if not self.config & 0x2000 else 8000
            self.bus = max(0, min(bus_max, round(self.bus_voltage_v(t) / BUS_LSB_V)))
        current = math.trunc(self.shunt * self.cal / 4096)
        power = math.trunc(current * self.bus / 5000)
        self.ovf = not (-32768 <= current <= 32767 and 0 <= abs(power) <= 0xFFFF)
        self.current = max(-32768, min(32767, current))
        self.power = min(0xFFFF, abs(power))

    def on_transaction_start(self) -> None:
        mode = self.config & 7
        if mode in (0, 4):
            return  # power-down / ADC off
        now = self.clock()
        period = self._conv_s()
        k = int((now - self._t0) // period)
        if mode >= 5:
            if k > self._done:
                self._done = k
                self._convert(self._t0 + k * period)
        elif self._done == 0 and k >= 1:  # triggered: one conversion per config write
            self._done = 1
            self._convert(self._t0 + period)

    def read_word(self, reg: int) -> int:
        if reg == REG_CONFIG:
            return self.config
        if reg == REG_SHUNT:
            return self.shunt & 0xFFFF
        if reg == REG_BUS:
            return (self.bus << 3) | (BUS_CNVR if self.cnvr else 0) | (BUS_OVF if self.ovf else 0)
        if reg == REG_POWER:
            self.cnvr = False
            return self.power
        if reg == REG_CURRENT:
            return self.current & 0xFFFF
        if reg == REG_CALIBRATION:
            return self.cal
        return 0

    def write_word(self, reg: int, value: int) -> None:
        if reg == REG_CONFIG:
            if value & CONFIG_RESET:
                self.power_on_reset()
                return
            self.config = value & 0x3FFF
            self.cnvr = False
            self._t0 = self.clock()
            self._done = 0
        elif reg == REG_CALIBRATION:
            self.cal = value & 0xFFFE
