"""TI ADS1115 emulator: MUX, PGA, data rate, single-shot and continuous conversions.

Theory of operation
-------------------
Four 16-bit registers behind the pointer byte. Writing the config register with OS=1 in
single-shot mode starts one conversion lasting exactly 1/DR; while it runs the config
register reads OS=0, afterwards OS=1 and the conversion register holds the code for the
selected input pair sampled at the END of the conversion, at the selected PGA range:
code = round(V * 32768 / FSR), saturated to 0x7FFF / 0x8000. In continuous mode a new
code is ready every 1/DR from the config write. Inputs are four signal sources in volts
(AIN0..AIN3 against GND). A stuck fault freezes the conversion register.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers.emulated.i2c import Clock, SignalLike, WordRegisterDevice, as_signal
from drivers.i2c.ads1115 import (
    CONFIG_DEFAULT,
    DATA_RATES_SPS,
    MODE_SINGLE,
    OS_BIT,
    PGA_FSR_V,
    REG_CONFIG,
    REG_CONVERSION,
    REG_HI_THRESH,
    REG_LO_THRESH,
    volts_to_code,
)

__all__ = ["EmulatedADS1115"]

# MUX code -> (positive input, negative input or None for GND)
_PAIRS: dict[int, tuple[int, int | None]] = {
    0: (0, 1),
    1: (0, 3),
    2: (1, 3),
    3: (2, 3),
    4: (0, None),
    5: (1, None),
    6: (2, None),
    7: (3, None),
}


class EmulatedADS1115(WordRegisterDevice):
    part = "ads1115"

    def __init__(
        self,
        address: int = 0x48,
        *,
        ain0_v: SignalLike = 0.0,
        ain1_v: SignalLike = 0.0,
        ain2_v: SignalLike = 0.0,
        ain3_v: SignalLike = 0.0,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        self.inputs = [as_signal(v) for v in (ain0_v, ain1_v, ain2_v, ain3_v)]
        self.conversions = 0
        super().__init__(address, clock=clock, online=online)

    def power_on_reset(self) -> None:
        super().power_on_reset()
        self.config = CONFIG_DEFAULT
        self.conversion = 0
        self.lo_thresh = 0x8000
        self.hi_thresh = 0x7FFF
        self._conv_end: float | None = None  # single shot in progress
        self._cont_start: float | None = None  # continuous mode start
        self._cont_done = -1

    def _period_s(self) -> float:
        return 1.0 / DATA_RATES_SPS[(self.config >> 5) & 7]

    def _sample(self, t: float) -> None:
        self.conversions += 1
        if self.stuck:
            return
        pos, neg = _PAIRS[(self.config >> 12) & 7]
        v = self.inputs[pos](t) - (self.inputs[neg](t) if neg is not None else 0.0)
        fsr = PGA_FSR_V[(self.config >> 9) & 7]
        self.conversion = volts_to_code(v, fsr) & 0xFFFF

    def on_transaction_start(self) -> None:
        now = self.clock()
        if self._conv_end is not None and now >= self._conv_end:
            self._sample(self._conv_end)
            self._conv_end = None
            self.config |= OS_BIT  # idle again
        if self._cont_start is not None:
            period = self._period_s()
            k = int((now - self._cont_start) // period)
            if k > self._cont_done and k >= 1:
                self._cont_done = k
                self._sample(self._cont_start + k * period)

    def read_word(self, reg: int) -> int:
        reg &= 3
        if reg == REG_CONVERSION:
            return self.conversion
        if reg == REG_CONFIG:
            return self.config
        return self.lo_thresh if reg == REG_LO_THRESH else self.hi_thresh

    def write_word(self, reg: int, value: int) -> None:
        reg &= 3
        if reg == REG_CONFIG:
            now = self.clock()
            single = bool(value & MODE_SINGLE)
            self.config = value & ~OS_BIT  # OS reads 0 while converting
            if single:
                self._cont_start = None
                if value & OS_BIT:
                    self._conv_end = now + self._period_s()
                else:
                    self.config |= OS_BIT if self._conv_end is None else 0
            else:
                self._conv_end = None
                self._cont_start = now
                self._cont_done = 0  # OS stays 0: a continuous-mode part is always converting
        elif reg == REG_LO_THRESH:
            self.lo_thresh = value
        elif reg == REG_HI_THRESH:
            self.hi_thresh = value
