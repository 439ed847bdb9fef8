"""Register-level Bosch BME280 emulator.

Theory of operation
-------------------
Registers as in the datasheet's memory map: chip id 0x60 at 0xD0, calibration NVM at
0x88..0xA1 / 0xE1..0xE7 (by default the datasheet's example trimming words, Bosch BMP280
datasheet §3.12 / BME280 §4.2.3, plus typical humidity words), ctrl_hum (latched only by a
ctrl_meas write, as the datasheet warns), status (measuring / im_update), ctrl_meas,
config, and the shadowed data registers 0xF7..0xFE.

Time drives conversions through `clock`: a forced-mode write starts one conversion that
completes after the datasheet's typical measurement time (§9.1) and returns the chip to
sleep; normal mode repeats t_measure + t_standby forever. The data registers change only
when a conversion completes, sampled from the physical signals at that instant.

Raw values come from INVERTING the datasheet's floating-point compensation (§8.1, an
independent formula from the integer one the driver uses) by bisection over the ADC code,
then quantising to the resolution the oversampling gives (16 + osrs - 1 bits without the
IIR filter). The IIR filter is applied once per conversion the bus observes (a simplifi-
cation: conversions nobody read in between are not filtered one by one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from drivers.emulated.i2c import Clock, RegisterDevice, SignalLike, as_signal
from drivers.i2c.bme280 import (
    CHIP_ID,
    IIR_COEFFS,
    MODE_NORMAL,
    MODE_SLEEP,
    OVERSAMPLING,
    REG_CALIB00,
    REG_CALIB26,
    REG_CHIP_ID,
    REG_CONFIG,
    REG_CTRL_HUM,
    REG_CTRL_MEAS,
    REG_DATA,
    REG_RESET,
    REG_STATUS,
    RESET_WORD,
    STANDBY_MS,
    STATUS_MEASURING,
    Calibration,
    measurement_time_ms,
)

__all__ = ["DATASHEET_CALIBRATION", "EmulatedBME280", "float_compensate"]

# Datasheet example trimming (T1..P9), with typical humidity trimming of production parts.
DATASHEET_CALIBRATION = Calibration(
    T1=27504,
    T2=26435,
    T3=-1000,
    P1=36477,
    P2=-10685,
    P3=3024,
    P4=2855,
    P5=140,
    P6=-7,
    P7=15500,
    P8=-14600,
    P9=6000,
    H1=75,
    H2=362,
    H3=0,
    H4=313,
    H5=50,
    H6=30,
)


def float_compensate(
    adc_t: int, adc_p: int, adc_h: int, c: Calibration
) -> tuple[float, float, float, int]:
    """The datasheet's double-precision compensation (§8.1) -> (T degC, P Pa, H %RH, t_fine)."""
    var1 = (adc_t / 16384.0 - c.T1 / 1024.0) * c.T2
    var2 = ((adc_t / 131072.0 - c.T1 / 8192.0) * (adc_t / 131072.0 - c.T1 / 8192.0)) * c.T3
    t_fine = int(var1 + var2)
    t = (var1 + var2) / 5120.0
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * c.P6 / 32768.0
    v2 = v2 + v1 * c.P5 * 2.0
    v2 = v2 / 4.0 + c.P4 * 65536.0
    v1 = (c.P3 * v1 * v1 / 524288.0 + c.P2 * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * c.P1
    if v1 == 0.0:
        p = 0.0
    else:
        p = 1048576.0 - adc_p
        p = (p - v2 / 4096.0) * 6250.0 / v1
        v1 = c.P9 * p * p / 2147483648.0
        v2 = p * c.P8 / 32768.0
        p = p + (v1 + v2 + c.P7) / 16.0
    h = t_fine - 76800.0
    h = (adc_h - (c.H4 * 64.0 + c.H5 / 16384.0 * h)) * (
        c.H2 / 65536.0 * (1.0 + c.H6 / 67108864.0 * h * (1.0 + c.H3 / 67108864.0 * h))
    )
    h = h * (1.0 - c.H1 * h / 524288.0)
    h = min(max(h, 0.0), 100.0)
    return t, p, h, t_fine


def _bisect(f: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """Integer x in [lo, hi] with f(x) closest to target, f monotonic (either way)."""
    increasing = f(hi) >= f(lo)
    a, b = lo, hi
    while b - a > 1:
        m = (a + b) // 2
        if (f(m) < target) == increasing:
            a = m
        else:
            b = m
    return a if abs(f(a) - target) <= abs(f(b) - target) else b


class EmulatedBME280(RegisterDevice):
    part = "bme280"

    def __init__(
        self,
        address: int = 0x76,
        *,
        temperature_c: SignalLike = 22.0,
        pressure_pa: SignalLike = 101325.0,
        humidity_pct: SignalLike = 45.0,
        calibration: Calibration = DATASHEET_CALIBRATION,
        chip_id: int = CHIP_ID,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        self.temperature_c = as_signal(temperature_c)
        self.pressure_pa = as_signal(pressure_pa)
        self.humidity_pct = as_signal(humidity_pct)
        self.calibration = calibration
        self.chip_id = chip_id
        self.conversions = 0
        super().__init__(address, clock=clock, online=online)

    def power_on_reset(self) -> None:
        super().power_on_reset()
        tp, h = self.calibration.to_bytes()
        self.regs[REG_CALIB00 : REG_CALIB00 + 26] = tp
        self.regs[REG_CALIB26 : REG_CALIB26 + 7] = h
        self.regs[REG_CHIP_ID] = self.chip_id
        self.regs[REG_DATA : REG_DATA + 8] = bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])
        self._hum_latched = 0
        self._conv_start: float | None = None  # forced: start of the running conversion
        self._cycle_start: float | None = None  # normal: start of the first cycle
        self._last_cycle = -1
        self._filt: tuple[float, float] | None = None

    # -- timing --------------------------------------------------------------------------------

    def _osrs(self) -> tuple[int, int, int]:
        m = self.regs[REG_CTRL_MEAS]

        def osr(code: int) -> int:
            return OVERSAMPLING[min(code, 5)]  # codes 6 and 7 also mean x16

        return osr(m >> 5), osr((m >> 2) & 7), osr(self._hum_latched)

    def _t_meas_s(self) -> float:
        return measurement_time_ms(*self._osrs())[0] / 1000.0

    def _period_s(self) -> float:
        return self._t_meas_s() + STANDBY_MS[self.regs[REG_CONFIG] >> 5] / 1000.0

    def on_transaction_start(self) -> None:
        now = self.clock()
        mode = self.regs[REG_CTRL_MEAS] & 0b11
        measuring = False
        if self._conv_start is not None:  # forced conversion running
            end = self._conv_start + self._t_meas_s()
            if now >= end:
                self._convert(end)
                self._conv_start = None
                self.regs[REG_CTRL_MEAS] &= ~0b11  # back to sleep
            else:
                measuring = True
        elif mode == MODE_NORMAL and self._cycle_start is not None:
            period = self._period_s()
            elapsed = now - self._cycle_start
            k = int(elapsed // period)
            into = elapsed - k * period
            t_meas = self._t_meas_s()
            done = k if into >= t_meas else k - 1
            if done > self._last_cycle and done >= 0:
                self._last_cycle = done
                self._convert(self._cycle_start + done * period + t_meas)
            measuring = into < t_meas
        status = self.regs[REG_STATUS] & ~STATUS_MEASURING
        self.regs[REG_STATUS] = status | (STATUS_MEASURING if measuring else 0)

    def write_reg(self, reg: int, value: int) -> None:
        if reg == REG_RESET:
            if value == RESET_WORD:
                self.power_on_reset()
            return
        if reg in (REG_CTRL_HUM, REG_CONFIG):
            self.regs[reg] = value & 0xFF
            return
        if reg == REG_CTRL_MEAS:
            self.regs[reg] = value & 0xFF
            self._hum_latched = self.regs[REG_CTRL_HUM] & 0x07  # datasheet §5.4.3
            mode = value & 0b11
            now = self.clock()
            if mode == MODE_SLEEP:
                self._conv_start = self._cycle_start = None
            elif mode == MODE_NORMAL:
                self._conv_start = None
                self._cycle_start = now
                self._last_cycle = -1
            else:
                self._conv_start = now
            return
        # calibration, chip id and data registers are read-only

    # -- conversion: physical -> raw ---------------------------------------------------------

    def raw_for(self, t_c: float, p_pa: float, h_pct: float) -> tuple[int, int, int]:
        """(adc_T, adc_P, adc_H) that the datasheet's float formulas map to the inputs."""
        c = self.calibration
        adc_t = _bisect(lambda x: float_compensate(x, 0, 0, c)[0], t_c, 0, (1 << 20) - 1)
        adc_p = _bisect(lambda x: float_compensate(adc_t, x, 0, c)[1], p_pa, 0, (1 << 20) - 1)
        adc_h = _bisect(lambda x: float_compensate(adc_t, 0, x, c)[2], h_pct, 0, 0xFFFF)
        return adc_t, adc_p, adc_h

    def _convert(self, t: float) -> None:
        self.conversions += 1
        if self.stuck:
            return
        osrs_t, osrs_p, osrs_h = self._osrs()
        adc_t, adc_p, adc_h = self.raw_for(
            self.temperature_c(t), self.pressure_pa(t), self.humidity_pct(t)
        )
        iir = IIR_COEFFS[min((self.regs[REG_CONFIG] >> 2) & 7, 4)]
        if iir:
            if self._filt is None:
                self._filt = (float(adc_t), float(adc_p))
            ft, fp = self._filt
            self._filt = ((ft * (iir - 1) + adc_t) / iir, (fp * (iir - 1) + adc_p) / iir)
            adc_t, adc_p = round(self._filt[0]), round(self._filt[1])

        def quant(v: int, osrs: int) -> int:
            if osrs == 0:
                return 0x80000
            if iir:
                return v  # the filter output has full 20-bit resolution
            drop = 5 - OVERSAMPLING.index(osrs)  # x1: 16 bit -> 4 LSBs dropped
            return (v >> drop) << drop

        adc_t, adc_p = quant(adc_t, osrs_t), quant(adc_p, osrs_p)
        if osrs_h == 0:
            adc_h = 0x8000
        d = self.regs
        d[0xF7], d[0xF8], d[0xF9] = adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4
        d[0xFA], d[0xFB], d[0xFC] = adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4
        d[0xFD], d[0xFE] = adc_h >> 8, adc_h & 0xFF

    def set_signals(self, **signals: Any) -> None:
        """Replace signal sources at run time (temperature_c=..., pressure_pa=..., ...)."""
        with self.lock:
            for k, v in signals.items():
                if k not in ("temperature_c", "pressure_pa", "humidity_pct"):
                    raise KeyError(k)
                setattr(self, k, v)
