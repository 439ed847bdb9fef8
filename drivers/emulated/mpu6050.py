"""InvenSense MPU-6050 register-level emulator: ranges, sample rate, DLPF delay, FIFO.

Theory of operation
-------------------
Power-on state as the register map says: PWR_MGMT_1 = 0x40 (asleep, outputs frozen at
zero), WHO_AM_I = 0x68. Once awake the part produces samples at the configured rate
(gyro output rate / (1 + SMPLRT_DIV)); sample k is taken at `t_wake + k / rate` from the
physical signal sources, delayed by the DLPF's group delay (RM Table 26), scaled by the
selected full-scale range (counts = round(value * LSB per unit), saturating at ±32767) and
written to the output registers 0x3B..0x48, which an auto-incrementing burst read returns
as one coherent sample. Each new sample sets DATA_RDY in INT_STATUS (cleared by reading
it). With the FIFO enabled (USER_CTRL.FIFO_EN and FIFO_EN selecting accel+temp+gyro) each
sample appends its 14 bytes; past 1024 bytes the oldest bytes are lost and FIFO_OFLOW is
set, as on the part. FIFO_R_W does not auto-increment: a burst read of it pops bytes.
Samples are produced lazily when a transaction arrives (at most one FIFO's worth per
transaction), so an idle emulator costs nothing.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from drivers.emulated.i2c import Clock, RegisterDevice, SignalLike, as_signal
from drivers.i2c.mpu6050 import (
    ACCEL_LSB_PER_G,
    BURST_LEN,
    DLPF_DELAY_MS,
    FIFO_SIZE,
    GYRO_LSB_PER_DPS,
    INT_DATA_RDY,
    INT_FIFO_OFLOW,
    PWR_RESET,
    PWR_SLEEP,
    REG_ACCEL_CONFIG,
    REG_ACCEL_XOUT_H,
    REG_CONFIG,
    REG_FIFO_COUNT_H,
    REG_FIFO_EN,
    REG_FIFO_R_W,
    REG_GYRO_CONFIG,
    REG_INT_STATUS,
    REG_PWR_MGMT_1,
    REG_SMPLRT_DIV,
    REG_USER_CTRL,
    REG_WHO_AM_I,
    USER_CTRL_FIFO_EN,
    USER_CTRL_FIFO_RESET,
    WHO_AM_I,
    sample_rate_hz,
)

__all__ = ["EmulatedMPU6050", "Vec3Like", "Vec3Signal"]

Vec3Signal = Callable[[float], tuple[float, float, float]]


def _const3(x: float, y: float, z: float) -> Vec3Signal:
    def signal(_t: float) -> tuple[float, float, float]:
        return (x, y, z)

    return signal


Vec3Like = Vec3Signal | tuple[float, float, float]


def _as_vec3(source: Vec3Like) -> Vec3Signal:
    return _const3(*source) if isinstance(source, tuple) else source


def _counts(v: float, lsb: float) -> int:
    return max(-32768, min(32767, round(v * lsb)))


_BURST = struct.Struct(">7h")  # accel x y z, temperature, gyro x y z: big-endian words


class EmulatedMPU6050(RegisterDevice):
    part = "mpu6050"
    # the output registers read as one burst without side effects (INT_STATUS, the FIFO
    # count and FIFO_R_W have them: read byte by byte through read_reg)
    plain_read = range(REG_ACCEL_XOUT_H, REG_ACCEL_XOUT_H + BURST_LEN)

    def __init__(
        self,
        address: int = 0x68,
        *,
        accel_g: Vec3Like = (0.0, 0.0, 1.0),
        gyro_dps: Vec3Like = (0.0, 0.0, 0.0),
        temperature_c: SignalLike = 25.0,
        who_am_i: int = WHO_AM_I,
        clock: Clock = time.monotonic,
        online: Callable[[float], bool] | None = None,
    ) -> None:
        self.accel_g = _as_vec3(accel_g)
        self.gyro_dps = _as_vec3(gyro_dps)
        self.temperature_c = as_signal(temperature_c)
        self.who_am_i = who_am_i
        self.samples = 0
        super().__init__(address, clock=clock, online=online)

    def power_on_reset(self) -> None:
        super().power_on_reset()
        self.regs[REG_PWR_MGMT_1] = PWR_SLEEP
        self.regs[REG_WHO_AM_I] = self.who_am_i
        self.fifo = bytearray()
        self._t0: float | None = None  # time the part woke up
        self._last_k = -1

    # -- sampling ------------------------------------------------------------------------------

    def rate_hz(self) -> float:
        return sample_rate_hz(self.regs[REG_CONFIG] & 7, self.regs[REG_SMPLRT_DIV])

    def _sample_bytes(self, t: float) -> bytes:
        a_lsb = ACCEL_LSB_PER_G[(self.regs[REG_ACCEL_CONFIG] >> 3) & 3]
        g_lsb = GYRO_LSB_PER_DPS[(self.regs[REG_GYRO_CONFIG] >> 3) & 3]
        dlpf = self.regs[REG_CONFIG] & 7
        ts = t - (DLPF_DELAY_MS[dlpf] / 1000.0 if dlpf < 7 else 0.0)
        ax, ay, az = self.accel_g(ts)
        gx, gy, gz = self.gyro_dps(ts)
        return _BURST.pack(
            _counts(ax, a_lsb),
            _counts(ay, a_lsb),
            _counts(az, a_lsb),
            _counts(self.temperature_c(ts) - 36.53, 340.0),
            _counts(gx, g_lsb),
            _counts(gy, g_lsb),
            _counts(gz, g_lsb),
        )

    def on_transaction_start(self) -> None:
        if self._t0 is None:
            return  # asleep: outputs frozen
        rate = self.rate_hz()
        k = int((self.clock() - self._t0) * rate)
        if k <= self._last_k:
            return
        fifo_on = bool(self.regs[REG_USER_CTRL] & USER_CTRL_FIFO_EN) and bool(
            self.regs[REG_FIFO_EN] & 0xF8
        )
        first = self._last_k + 1
        if fifo_on:
            first = max(first, k - FIFO_SIZE // BURST_LEN - 1)  # older ones would be lost anyway
        else:
            first = k
        for i in range(first, k + 1):
            self.samples += 1
            if not self.stuck:
                data = self._sample_bytes(self._t0 + i / rate)
                self.regs[REG_ACCEL_XOUT_H : REG_ACCEL_XOUT_H + BURST_LEN] = data
            if fifo_on:
                self.fifo += self.regs[REG_ACCEL_XOUT_H : REG_ACCEL_XOUT_H + BURST_LEN]
        if fifo_on and len(self.fifo) > FIFO_SIZE:
            del self.fifo[: len(self.fifo) - FIFO_SIZE]
            self.regs[REG_INT_STATUS] |= INT_FIFO_OFLOW
        self.regs[REG_INT_STATUS] |= INT_DATA_RDY
        self._last_k = k

    # -- registers -------------------------------------------------------------------------------

    def next_ptr(self, reg: int) -> int:
        return reg if reg == REG_FIFO_R_W else (reg + 1) & 0xFF

    def read_reg(self, reg: int) -> int:
        if reg == REG_INT_STATUS:
            v = self.regs[reg]
            self.regs[reg] = 0  # cleared on read
            return v
        if reg == REG_FIFO_COUNT_H:
            return (len(self.fifo) >> 8) & 0xFF
        if reg == REG_FIFO_COUNT_H + 1:
            return len(self.fifo) & 0xFF
        if reg == REG_FIFO_R_W:
            if not self.fifo:
                return 0
            b = self.fifo[0]
            del self.fifo[0]
            return b
        return self.regs[reg]

    def write_reg(self, reg: int, value: int) -> None:
        value &= 0xFF
        if reg == REG_WHO_AM_I or REG_ACCEL_XOUT_H <= reg < REG_ACCEL_XOUT_H + BURST_LEN:
            return  # read-only
        if reg == REG_PWR_MGMT_1:
            if value & PWR_RESET:
                self.power_on_reset()
                return
            self.regs[reg] = value
            if value & PWR_SLEEP:
                self._t0 = None
            elif self._t0 is None:
                self._t0 = self.clock()
                self._last_k = -1
            return
        if reg == REG_USER_CTRL:
            if value & USER_CTRL_FIFO_RESET:
                self.fifo.clear()
            self.regs[reg] = value & ~USER_CTRL_FIFO_RESET  # self-clearing
            return
        if reg in (REG_SMPLRT_DIV, REG_CONFIG) and self._t0 is not None:
            # keep the sample clock continuous across a rate change
            self._t0 = self.clock()
            self._last_k = -1
        self.regs[reg] = value
