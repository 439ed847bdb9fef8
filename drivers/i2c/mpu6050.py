"""InvenSense MPU-6050 6-axis accelerometer + gyroscope (driver name `mpu6050`).

Theory of operation
-------------------
Protocol part (pure): the register map (RM-MPU-6000A rev 4.2), the full-scale range
fields of GYRO_CONFIG / ACCEL_CONFIG and their sensitivities (accelerometer 16384, 8192,
4096, 2048 LSB/g for ±2/4/8/16 g; gyro 131, 65.5, 32.8, 16.4 LSB/(°/s) for ±250/500/
1000/2000 °/s), the DLPF settings of CONFIG (accelerometer bandwidth 260 .. 5 Hz), the
sample-rate divider (rate = gyro output rate / (1 + SMPLRT_DIV), the gyro output rate
being 8 kHz with the DLPF off and 1 kHz otherwise) and the temperature formula
(TEMP_OUT / 340 + 36.53 °C). `decode_burst` turns the 14 bytes from ACCEL_XOUT_H (0x3B)
.. GYRO_ZOUT_L (0x48) into raw counts; one burst is one coherent sample because the part
latches the output registers for the duration of a read.

Driver part: this is the vibration source of the anomaly model, so `read()` is exactly one
14-byte burst (one executor hop, 1.56 ms on a 100 kHz bus, 0.39 ms at 400 kHz: use 400 kHz
for rates above ~200 Hz). `open()` checks WHO_AM_I (0x68; MPU-6500/9250 answer 0x70/0x71),
resets the part, takes it out of sleep with the X-gyro PLL as clock, and writes the
divider, DLPF and ranges. Every 256 reads PWR_MGMT_1 is re-read: a part that browned out
comes back asleep with frozen outputs, which the driver notices and re-initialises.
`read_fifo()` drains the 1024-byte FIFO for consumers that want every sample at the full
output rate rather than one per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Sequence

import numpy as np

from drivers.base import (
    AsyncI2CBusLike,
    ChannelInfo,
    DeviceError,
    Quality,
    Reading,
    SensorConfig,
    acquired_at,
)
from drivers.i2c.common import I2CSensor, check_address, check_bus, check_choice, i2c_factory
from drivers.registry import SensorSpec

# -- protocol ------------------------------------------------------------------------------

REG_SMPLRT_DIV = 0x19
REG_CONFIG = 0x1A
REG_GYRO_CONFIG = 0x1B
REG_ACCEL_CONFIG = 0x1C
REG_FIFO_EN = 0x23
REG_INT_STATUS = 0x3A
REG_ACCEL_XOUT_H = 0x3B  # .. 0x48: accel xyz, temp, gyro xyz
REG_USER_CTRL = 0x6A
REG_PWR_MGMT_1 = 0x6B
REG_FIFO_COUNT_H = 0x72
REG_FIFO_R_W = 0x74
REG_WHO_AM_I = 0x75
WHO_AM_I = 0x68
OTHER_CHIPS = {0x70: "MPU-6500", 0x71: "MPU-9250", 0x73: "MPU-9255", 0x98: "ICM-20689"}

PWR_RESET = 0x80
PWR_SLEEP = 0x40
CLKSEL_PLL_XGYRO = 0x01
USER_CTRL_FIFO_EN = 0x40
USER_CTRL_FIFO_RESET = 0x04
FIFO_EN_TEMP_GYRO_ACCEL = 0x80 | 0x70 | 0x08  # FIFO record = 14 bytes, register order
INT_DATA_RDY = 0x01
INT_FIFO_OFLOW = 0x10
FIFO_SIZE = 1024
BURST_LEN = 14

ADDRESSES = {0x68: "AD0 low", 0x69: "AD0 high"}
ACCEL_RANGES_G = (2, 4, 8, 16)
ACCEL_LSB_PER_G = (16384.0, 8192.0, 4096.0, 2048.0)
GYRO_RANGES_DPS = (250, 500, 1000, 2000)
GYRO_LSB_PER_DPS = (131.0, 65.5, 32.8, 16.4)
# DLPF_CFG code -> accelerometer bandwidth (Hz); 0 means the DLPF is off (260 Hz)
DLPF_HZ = (260, 184, 94, 44, 21, 10, 5)
DLPF_DELAY_MS = (0.0, 2.0, 3.0, 4.9, 8.5, 13.8, 19.0)  # accelerometer delay, RM Table 26


def gyro_output_rate_hz(dlpf_code: int) -> int:
    return 8000 if dlpf_code in (0, 7) else 1000


def sample_rate_hz(dlpf_code: int, smplrt_div: int) -> float:
    return gyro_output_rate_hz(dlpf_code) / (1 + smplrt_div)


def divider_for(rate_hz: float, dlpf_code: int) -> int:
    """SMPLRT_DIV giving exactly `rate_hz`; ValueError if no integer divider does."""
    base = gyro_output_rate_hz(dlpf_code)
    div = base / rate_hz - 1
    if abs(div - round(div)) > 1e-9 or not 0 <= round(div) <= 255:
        raise ValueError(
            f"sample_rate_hz {rate_hz:g} is not {base} Hz / (1 + n) for n in 0..255 "
            f"(e.g. 1000, 500, 250, 200, 125, 100 with the DLPF on)"
        )
    return round(div)


def decode_burst(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    """14 bytes from 0x3B -> (ax, ay, az, temp, gx, gy, gz) signed counts."""
    if len(data) != BURST_LEN:
        raise ValueError(f"MPU-6050 burst is {BURST_LEN} bytes, got {len(data)}")
    ax, ay, az, t, gx, gy, gz = struct.unpack(">7h", data)
    return ax, ay, az, t, gx, gy, gz


def temp_counts_to_c(counts: int) -> float:
    return counts / 340.0 + 36.53


def decode_fifo(data: bytes, accel_lsb: float, gyro_lsb: float) -> np.ndarray:
    """FIFO bytes (whole 14-byte records) -> float array (n, 7): ax ay az T gx gy gz."""
    n = len(data) // BURST_LEN
    raw = np.frombuffer(data[: n * BURST_LEN], dtype=">i2").reshape(n, 7).astype(np.float64)
    out = raw.copy()
    out[:, 0:3] /= accel_lsb
    out[:, 3] = raw[:, 3] / 340.0 + 36.53
    out[:, 4:7] /= gyro_lsb
    return out


# -- config ----------------------------------------------------------------------------------


class MPU6050Config(SensorConfig, tag="mpu6050"):
    """```yaml
    - id: motor_vib
      driver: mpu6050
      bus: 1
      address: 0x68            # 0x68 (AD0 low) or 0x69 (AD0 high)
      rate_hz: 200             # poll rate (one 14-byte burst per poll)
      accel_range_g: 4         # 2, 4, 8, 16
      gyro_range_dps: 500      # 250, 500, 1000, 2000
      dlpf_hz: 94              # 260 (off), 184, 94, 44, 21, 10, 5: accelerometer bandwidth
      sample_rate_hz: 1000     # output data rate: gyro rate / (1 + SMPLRT_DIV)
      fifo: false              # true: each poll drains the hardware FIFO (below)
    ```

    `fifo: true`: each poll reads every sample the part took since the previous poll from
    its 1024-byte FIFO (73 records of accel + temperature + gyro), oldest first, each
    stamped `k / sample_rate_hz` before the newest: the hub then holds every sample at the
    output data rate whatever the poll's own timing, and a control loop polling at its
    tick (`fresh: true`) gets all of them, the newest at most one ODR period old. Poll at
    least every 73 / sample_rate_hz s (an overflow resets the FIFO and is counted in
    `fifo_overflows`); at 400 kHz a 10-record drain costs ~3.5 ms of bus time.
    """

    bus: int = 1
    address: int = 0x68
    accel_range_g: int = 4
    gyro_range_dps: int = 500
    dlpf_hz: int = 94
    sample_rate_hz: float = 1000.0
    stuck_after_reads: int = 100  # identical 14-byte bursts in a row -> UNCERTAIN
    fifo: bool = False  # drain the hardware FIFO on each poll (every sample at the ODR)

    def __post_init__(self) -> None:
        check_bus(self.bus)
        check_address("MPU-6050", self.address, ADDRESSES)
        check_choice("accel_range_g", self.accel_range_g, ACCEL_RANGES_G, " g")
        check_choice("gyro_range_dps", self.gyro_range_dps, GYRO_RANGES_DPS, " °/s")
        check_choice("dlpf_hz", self.dlpf_hz, DLPF_HZ, " Hz")
        divider_for(self.sample_rate_hz, DLPF_HZ.index(self.dlpf_hz))


# -- driver ------------------------------------------------------------------------------------

CHANNELS = (
    ChannelInfo("accel_x", "g"),
    ChannelInfo("accel_y", "g"),
    ChannelInfo("accel_z", "g"),
    ChannelInfo("temperature", "°C"),
    ChannelInfo("gyro_x", "°/s"),
    ChannelInfo("gyro_y", "°/s"),
    ChannelInfo("gyro_z", "°/s"),
)
HEALTH_CHECK_EVERY = 256


class MPU6050(I2CSensor):
    channels: Sequence[ChannelInfo] = CHANNELS

    def __init__(self, cfg: MPU6050Config, bus: AsyncI2CBusLike) -> None:
        super().__init__(
            bus, cfg.address, "config_lost", "fifo_overflows", stuck_after=cfg.stuck_after_reads
        )
        self.cfg = cfg
        self._afs = ACCEL_RANGES_G.index(cfg.accel_range_g)
        self._fs = GYRO_RANGES_DPS.index(cfg.gyro_range_dps)
        self._dlpf = DLPF_HZ.index(cfg.dlpf_hz)
        self._div = divider_for(cfg.sample_rate_hz, self._dlpf)
        self.accel_lsb = ACCEL_LSB_PER_G[self._afs]
        self.gyro_lsb = GYRO_LSB_PER_DPS[self._fs]
        self.odr_hz = gyro_output_rate_hz(self._dlpf) / (1 + self._div)
        self._since_check = 0
        self._need_init = True
        self._fifo_on = False
        self._fifo_last_t: float | None = None  # the last FIFO record's time (monotonic)

    async def open(self) -> None:
        await self.check_id(
            REG_WHO_AM_I, WHO_AM_I, "MPU-6050", OTHER_CHIPS, label="WHO_AM_I", article="an"
        )
        await self._init()

    async def _init(self) -> None:
        await self.bus.write_byte(self.addr, REG_PWR_MGMT_1, PWR_RESET)
        await asyncio.sleep(0.1)  # reset; the part comes back asleep
        await self.bus.write_byte(self.addr, REG_PWR_MGMT_1, CLKSEL_PLL_XGYRO)  # wake, PLL
        await self.bus.write_byte(self.addr, REG_SMPLRT_DIV, self._div)
        await self.bus.write_byte(self.addr, REG_CONFIG, self._dlpf)
        await self.bus.write_byte(self.addr, REG_GYRO_CONFIG, self._fs << 3)
        await self.bus.write_byte(self.addr, REG_ACCEL_CONFIG, self._afs << 3)
        await asyncio.sleep(0.03)  # gyro start-up time (PS §6.1: 30 ms)
        self._stuck.reset()
        self._since_check = 0
        self._fifo_on = False
        self._need_init = False

    async def _check_config(self) -> None:
        pwr = (await self.bus.read_block(self.addr, REG_PWR_MGMT_1, 1))[0]
        if pwr != CLKSEL_PLL_XGYRO:
            self.counters["config_lost"] += 1
            self._need_init = True
            raise DeviceError(
                f"{self.where}: MPU-6050 PWR_MGMT_1 reads 0x{pwr:02x}, "
                f"expected 0x{CLKSEL_PLL_XGYRO:02x} (reset/asleep): re-initialising"
            )

    async def read(self) -> Sequence[Reading]:
        with self.counting_read():
            if self._need_init:
                await self._init()
            self._since_check += 1
            if self._since_check >= HEALTH_CHECK_EVERY:
                self._since_check = 0
                await self._check_config()
            if self.cfg.fifo:
                return self._fifo_readings(await self.read_fifo(FIFO_SIZE // BURST_LEN))
            data = await self.bus.read_block(self.addr, REG_ACCEL_XOUT_H, BURST_LEN)
        ax, ay, az, t, gx, gy, gz = decode_burst(data)
        q = self.stuck_quality(data)
        a, g = self.accel_lsb, self.gyro_lsb
        return (
            Reading("accel_x", ax / a, q),
            Reading("accel_y", ay / a, q),
            Reading("accel_z", az / a, q),
            Reading("temperature", temp_counts_to_c(t), q),
            Reading("gyro_x", gx / g, q),
            Reading("gyro_y", gy / g, q),
            Reading("gyro_z", gz / g, q),
        )

    def _fifo_readings(self, recs: np.ndarray) -> list[Reading]:
        """(n, 7) records, oldest first -> 7 readings per record, each with its age.

        The records are exactly 1/ODR apart and continue across drains, so they are put
        on one continuous timeline (the previous drain's last record + k/ODR), anchored at
        the read's acquisition instant: the newest record was taken within the last ODR
        period before it. When the part's clock and ours drift apart (the newest record
        would fall after the read, or more than two periods before it), the timeline is
        re-anchored with the new records spread between the previous one and the read,
        so sample times only ever increase.
        """
        n = len(recs)
        if n == 0:
            return []
        t_ref = acquired_at() or time.monotonic()
        step = 1.0 / self.odr_hz
        last = self._fifo_last_t
        if last is None:
            times = [t_ref - (n - 1 - k) * step for k in range(n)]
        else:
            newest = last + n * step
            if t_ref - 2 * step <= newest <= t_ref:
                times = [last + (k + 1) * step for k in range(n)]
            else:
                top = max(last + n * 1e-6, min(t_ref, max(newest, t_ref - step)))
                spread = (top - last) / n
                times = [last + (k + 1) * spread for k in range(n)]
        self._fifo_last_t = times[-1]
        names = [c.name for c in CHANNELS]
        out: list[Reading] = []
        for k in range(n):
            age = t_ref - times[k]
            row = recs[k]
            out += [Reading(names[j], float(row[j]), Quality.GOOD, age) for j in range(7)]
        return out

    async def read_fifo(self, max_samples: int = 73) -> np.ndarray:
        """Drain up to `max_samples` whole records -> (n, 7) array, oldest first.

        Enables the FIFO on first use. An overflow (more than 1024 bytes queued) loses the
        oldest data and misaligns records, so the FIFO is reset and the overflow counted.
        """
        if not self._fifo_on:
            await self.bus.write_byte(self.addr, REG_USER_CTRL, USER_CTRL_FIFO_RESET)
            await self.bus.write_byte(self.addr, REG_FIFO_EN, FIFO_EN_TEMP_GYRO_ACCEL)
            await self.bus.write_byte(self.addr, REG_USER_CTRL, USER_CTRL_FIFO_EN)
            self._fifo_on = True
            self._fifo_last_t = None
            return np.empty((0, 7))
        status = (await self.bus.read_block(self.addr, REG_INT_STATUS, 1))[0]
        if status & INT_FIFO_OFLOW:
            self.counters["fifo_overflows"] += 1
            await self.bus.write_byte(
                self.addr, REG_USER_CTRL, USER_CTRL_FIFO_EN | USER_CTRL_FIFO_RESET
            )
            self._fifo_last_t = None  # records were lost: a new timeline
            return np.empty((0, 7))
        count = int.from_bytes(await self.bus.read_block(self.addr, REG_FIFO_COUNT_H, 2), "big")
        n = min(count // BURST_LEN, max_samples)
        if n == 0:
            return np.empty((0, 7))
        data = await self.bus.read_block(self.addr, REG_FIFO_R_W, n * BURST_LEN)
        return decode_fifo(data, self.accel_lsb, self.gyro_lsb)

    async def close(self) -> None:
        with contextlib.suppress(DeviceError):  # sleep mode: ~5 µA instead of ~4 mA
            await self.bus.write_byte(self.addr, REG_PWR_MGMT_1, PWR_SLEEP | CLKSEL_PLL_XGYRO)


_factory = i2c_factory(MPU6050)


SENSOR = SensorSpec(
    name="mpu6050",
    config_type=MPU6050Config,
    factory=_factory,
    transport="i2c",
    summary="InvenSense MPU-6050 accelerometer (g), gyro (°/s), temperature, I2C 0x68/0x69",
)
