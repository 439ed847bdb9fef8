"""Bosch BME280 temperature / pressure / humidity sensor (driver name `bme280`).

Theory of operation
-------------------
Protocol part (pure, top of the module): the register map, the calibration NVM layout
(0x88..0xA1 and 0xE1..0xE7, humidity words packed in 12-bit halves), the raw-data layout
(0xF7..0xFE: 20-bit pressure and temperature, 16-bit humidity), and the datasheet's
integer compensation (BME280 datasheet §4.2.3: 32-bit temperature giving `t_fine`, 64-bit
pressure in Q24.8 Pa, 32-bit humidity in Q22.10 %RH) transcribed with C semantics
(truncating 64-bit division) so results match the reference code bit for bit.

Driver part (thin, bottom): `open()` checks the chip id (0x60; a BMP280 answers 0x56..0x58
and has no humidity), soft-resets, waits for the NVM copy, reads the calibration once and
writes ctrl_hum, config and ctrl_meas (ctrl_hum only takes effect after a ctrl_meas
write, so the order matters). In normal mode the chip converts on its own every
t_measure + t_standby and `read()` is one 13-byte burst from 0xF2: the three control
registers (to notice a chip that reset itself and lost its configuration) and the
shadowed data registers, which a single burst returns as one coherent measurement. In
forced mode `read()` triggers one conversion, waits the datasheet's maximum measurement
time on the event loop (not on the bus), polls `status.measuring` and reads the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from drivers.base import AsyncI2CBusLike, ChannelInfo, DeviceError, Quality, Reading, SensorConfig
from drivers.i2c.common import I2CSensor, check_address, check_bus, check_choice, i2c_factory
from drivers.registry import SensorSpec

# -- protocol: registers -------------------------------------------------------------------

CHIP_ID = 0x60
REG_CALIB00 = 0x88  # .. 0xA1, 26 bytes
REG_CHIP_ID = 0xD0
REG_RESET = 0xE0
RESET_WORD = 0xB6
REG_CALIB26 = 0xE1  # .. 0xE7, 7 bytes
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # press_msb .. hum_lsb, 8 bytes
STATUS_MEASURING = 0x08
STATUS_IM_UPDATE = 0x01

MODE_SLEEP = 0b00
MODE_FORCED = 0b01
MODE_NORMAL = 0b11

ADDRESSES = {0x76: "SDO to GND", 0x77: "SDO to VDDIO"}
OTHER_CHIPS = {0x56: "BMP280 (sample)", 0x57: "BMP280 (sample)", 0x58: "BMP280", 0x55: "BMP180"}

OVERSAMPLING = (0, 1, 2, 4, 8, 16)  # 0 = measurement skipped
IIR_COEFFS = (0, 2, 4, 8, 16)
STANDBY_MS = (0.5, 62.5, 125.0, 250.0, 500.0, 1000.0, 10.0, 20.0)  # index = t_sb code
SKIPPED_20 = 0x80000  # the value of a skipped (or never converted) T/P measurement
SKIPPED_16 = 0x8000


def osrs_code(oversampling: int) -> int:
    """Oversampling factor -> the 3-bit osrs field (0 skip, 1 x1 ... 5 x16)."""
    return OVERSAMPLING.index(oversampling)


def ctrl_meas_value(osrs_t: int, osrs_p: int, mode: int) -> int:
    return (osrs_code(osrs_t) << 5) | (osrs_code(osrs_p) << 2) | (mode & 0b11)


def config_value(standby_ms: float, iir: int) -> int:
    return (STANDBY_MS.index(standby_ms) << 5) | (IIR_COEFFS.index(iir) << 2)


def measurement_time_ms(osrs_t: int, osrs_p: int, osrs_h: int) -> tuple[float, float]:
    """(typical, maximum) conversion time in ms, datasheet §9.1."""
    typ = 1.0 + 2.0 * osrs_t
    mx = 1.25 + 2.3 * osrs_t
    if osrs_p:
        typ += 2.0 * osrs_p + 0.5
        mx += 2.3 * osrs_p + 0.575
    if osrs_h:
        typ += 2.0 * osrs_h + 0.5
        mx += 2.3 * osrs_h + 0.575
    return typ, mx


@dataclass(frozen=True, slots=True)
class Calibration:
    """The trimming coefficients from the NVM (names as in the datasheet, Table 16)."""

    T1: int
    T2: int
    T3: int
    P1: int
    P2: int
    P3: int
    P4: int
    P5: int
    P6: int
    P7: int
    P8: int
    P9: int
    H1: int
    H2: int
    H3: int
    H4: int
    H5: int
    H6: int

    @classmethod
    def from_bytes(cls, tp: bytes, h: bytes) -> Calibration:
        """`tp`: the 26 bytes from 0x88; `h`: the 7 bytes from 0xE1."""
        if len(tp) != 26 or len(h) != 7:
            raise ValueError(f"calibration needs 26 + 7 bytes, got {len(tp)} + {len(h)}")
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack_from("<HhhHhhhhhhhh", tp)
        h1 = tp[25]
        h2 = struct.unpack_from("<h", h)[0]
        h3 = h[2]
        e4 = struct.unpack_from("b", h, 3)[0]
        e6 = struct.unpack_from("b", h, 5)[0]
        h4 = (e4 * 16) | (h[4] & 0x0F)
        h5 = (e6 * 16) | (h[4] >> 4)
        h6 = struct.unpack_from("b", h, 6)[0]
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6)

    def to_bytes(self) -> tuple[bytes, bytes]:
        """Inverse of from_bytes (what an emulator puts in its NVM)."""
        tp = struct.pack(
            "<HhhHhhhhhhhh",
            self.T1,
            self.T2,
            self.T3,
            self.P1,
            self.P2,
            self.P3,
            self.P4,
            self.P5,
            self.P6,
            self.P7,
            self.P8,
            self.P9,
        ) + bytes([0, self.H1 & 0xFF])
        h = struct.pack("<hB", self.H2, self.H3) + bytes(
            [
                (self.H4 >> 4) & 0xFF,
                ((self.H5 & 0x0F) << 4) | (self.H4 & 0x0F),
                (self.H5 >> 4) & 0xFF,
                self.H6 & 0xFF,
            ]
        )
        return tp, h


def parse_data(data: bytes) -> tuple[int, int, int]:
    """The 8 bytes from 0xF7 -> (adc_P, adc_T, adc_H)."""
    if len(data) != 8:
        raise ValueError(f"BME280 data block is 8 bytes, got {len(data)}")
    adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
    adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
    adc_h = (data[6] << 8) | data[7]
    return adc_p, adc_t, adc_h


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero; Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def compensate_t(adc_t: int, c: Calibration) -> tuple[int, int]:
    """-> (temperature in 0.01 degC, t_fine). BME280_compensate_T_int32."""
    var1 = (((adc_t >> 3) - (c.T1 << 1)) * c.T2) >> 11
    var2 = (((((adc_t >> 4) - c.T1) * ((adc_t >> 4) - c.T1)) >> 12) * c.T3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_p(adc_p: int, t_fine: int, c: Calibration) -> int:
    """-> pressure in Pa as Q24.8 (divide by 256). BME280_compensate_P_int64."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * c.P6
    var2 = var2 + ((var1 * c.P5) << 17)
    var2 = var2 + (c.P4 << 35)
    var1 = ((var1 * var1 * c.P3) >> 8) + ((var1 * c.P2) << 12)
    var1 = (((1 << 47) + var1) * c.P1) >> 33
    if var1 == 0:
        return 0  # avoid a division by zero (an all-zero calibration)
    p = 1048576 - adc_p
    p = _cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (c.P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (c.P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (c.P7 << 4)


def compensate_h(adc_h: int, t_fine: int, c: Calibration) -> int:
    """-> relative humidity as Q22.10 %RH (divide by 1024). bme280_compensate_H_int32."""
    v = t_fine - 76800
    v = ((((adc_h << 14) - (c.H4 << 20) - (c.H5 * v)) + 16384) >> 15) * (
        (((((v * c.H6) >> 10) * (((v * c.H3) >> 11) + 32768)) >> 10) + 2097152) * c.H2 + 8192
    ) >> 14
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * c.H1) >> 4)
    v = max(0, min(v, 419430400))
    return v >> 12


@dataclass(frozen=True, slots=True)
class Measurement:
    temperature_c: float
    pressure_pa: float | None
    humidity_pct: float | None


def decode(data: bytes, cal: Calibration) -> Measurement:
    """The data block -> physical values; None for a channel whose value was skipped."""
    adc_p, adc_t, adc_h = parse_data(data)
    if adc_t == SKIPPED_20:
        raise ValueError("temperature not converted yet (reads the reset value 0x80000)")
    t, t_fine = compensate_t(adc_t, cal)
    p = None if adc_p == SKIPPED_20 else compensate_p(adc_p, t_fine, cal) / 256.0
    h = None if adc_h == SKIPPED_16 else compensate_h(adc_h, t_fine, cal) / 1024.0
    return Measurement(t / 100.0, p, h)


# -- config ----------------------------------------------------------------------------------


class BME280Config(SensorConfig, tag="bme280"):
    """```yaml
    - id: cabinet
      driver: bme280
      bus: 1                        # /dev/i2c-1
      address: 0x76                 # 0x76 (SDO to GND) or 0x77 (SDO to VDDIO)
      mode: normal                  # normal (chip converts on its own) | forced
      temperature_oversampling: 1   # 1, 2, 4, 8, 16 (needed to compensate P and H)
      pressure_oversampling: 1      # 0 (skip), 1, 2, 4, 8, 16
      humidity_oversampling: 1      # 0 (skip), 1, 2, 4, 8, 16
      iir_filter_coeff: 0           # 0 (off), 2, 4, 8, 16
      standby_ms: 62.5              # normal mode: 0.5, 10, 20, 62.5, 125, 250, 500, 1000
    ```"""

    bus: int = 1
    address: int = 0x76
    mode: Literal["normal", "forced"] = "normal"
    temperature_oversampling: int = 1
    pressure_oversampling: int = 1
    humidity_oversampling: int = 1
    iir_filter_coeff: int = 0
    standby_ms: float = 62.5
    stuck_after_reads: int = 0  # 0 = off; raw data unchanged this many reads -> UNCERTAIN

    def __post_init__(self) -> None:
        check_bus(self.bus)
        check_address("BME280", self.address, ADDRESSES)
        check_choice("temperature_oversampling", self.temperature_oversampling, OVERSAMPLING[1:])
        check_choice("pressure_oversampling", self.pressure_oversampling, OVERSAMPLING)
        check_choice("humidity_oversampling", self.humidity_oversampling, OVERSAMPLING)
        check_choice("iir_filter_coeff", self.iir_filter_coeff, IIR_COEFFS)
        check_choice("standby_ms", self.standby_ms, STANDBY_MS, " ms")
        _, t_max = measurement_time_ms(
            self.temperature_oversampling, self.pressure_oversampling, self.humidity_oversampling
        )
        if self.mode == "forced" and t_max >= self.read_timeout_ms:
            raise ValueError(
                f"a forced conversion at these oversampling settings takes up to "
                f"{t_max:.1f} ms, not less than read_timeout_ms {self.read_timeout_ms}"
            )


# -- driver ------------------------------------------------------------------------------------


class BME280(I2CSensor):
    def __init__(self, cfg: BME280Config, bus: AsyncI2CBusLike) -> None:
        super().__init__(bus, cfg.address, "config_lost", stuck_after=cfg.stuck_after_reads)
        self.cfg = cfg
        self.cal: Calibration | None = None
        chans = [ChannelInfo("temperature", "°C")]
        if cfg.pressure_oversampling:
            chans.append(ChannelInfo("pressure", "Pa"))
        if cfg.humidity_oversampling:
            chans.append(ChannelInfo("humidity", "%RH"))
        self.channels: Sequence[ChannelInfo] = tuple(chans)
        run_mode = MODE_NORMAL if cfg.mode == "normal" else MODE_FORCED
        self._ctrl_meas = ctrl_meas_value(
            cfg.temperature_oversampling, cfg.pressure_oversampling, run_mode
        )
        self._ctrl_hum = osrs_code(cfg.humidity_oversampling)
        self._config = config_value(cfg.standby_ms, cfg.iir_filter_coeff)
        _, t_max = measurement_time_ms(
            cfg.temperature_oversampling, cfg.pressure_oversampling, cfg.humidity_oversampling
        )
        self.t_measure_max_s = t_max / 1000.0
        self._need_init = True

    async def open(self) -> None:
        await self.check_id(REG_CHIP_ID, CHIP_ID, "BME280", OTHER_CHIPS)
        await self._init()

    async def _init(self) -> None:
        await self.bus.write_byte(self.addr, REG_RESET, RESET_WORD)
        await asyncio.sleep(0.002)  # start-up time after reset, datasheet Table 1: 2 ms
        for _ in range(10):  # wait for the NVM copy (im_update) to finish
            status = (await self.bus.read_block(self.addr, REG_STATUS, 1))[0]
            if not status & STATUS_IM_UPDATE:
                break
            await asyncio.sleep(0.001)
        tp = await self.bus.read_block(self.addr, REG_CALIB00, 26)
        h = await self.bus.read_block(self.addr, REG_CALIB26, 7)
        self.cal = Calibration.from_bytes(tp, h)
        # config is only reliably written in sleep mode; ctrl_hum latches on ctrl_meas.
        await self.bus.write_byte(self.addr, REG_CONFIG, self._config)
        await self.bus.write_byte(self.addr, REG_CTRL_HUM, self._ctrl_hum)
        await self.bus.write_byte(self.addr, REG_CTRL_MEAS, self._ctrl_meas)
        if self.cfg.mode == "normal":
            await asyncio.sleep(self.t_measure_max_s)  # the first conversion
        self._stuck.reset()
        self._need_init = False

    async def read(self) -> Sequence[Reading]:
        if self._need_init or self.cal is None:
            await self._init()
        assert self.cal is not None
        with self.counting_read():
            if self.cfg.mode == "forced":
                data = await self._read_forced()
            else:
                block = await self.bus.read_block(self.addr, REG_CTRL_HUM, 13)
                if block[2] != self._ctrl_meas or (block[0] & 0x07) != self._ctrl_hum:
                    self.counters["config_lost"] += 1
                    self._need_init = True
                    raise DeviceError(
                        f"{self.where}: BME280 lost its configuration (ctrl_meas "
                        f"0x{block[2]:02x}, expected 0x{self._ctrl_meas:02x}): chip reset? "
                        "re-initialising"
                    )
                data = block[5:13]
        try:
            m = decode(data, self.cal)
        except ValueError as exc:
            self.counters["bus_errors"] += 1
            raise DeviceError(f"BME280 0x{self.addr:02x}: {exc}") from exc
        q = self.stuck_quality(data)
        out = [Reading("temperature", m.temperature_c, q)]
        if self.cfg.pressure_oversampling:
            out.append(
                Reading("pressure", m.pressure_pa or 0.0, q if m.pressure_pa else Quality.BAD)
            )
        if self.cfg.humidity_oversampling:
            hq = q if m.humidity_pct is not None else Quality.BAD
            out.append(Reading("humidity", m.humidity_pct or 0.0, hq))
        return out

    async def _read_forced(self) -> bytes:
        await self.bus.write_byte(self.addr, REG_CTRL_MEAS, self._ctrl_meas)
        await asyncio.sleep(self.t_measure_max_s)
        for _ in range(5):
            status = (await self.bus.read_block(self.addr, REG_STATUS, 1))[0]
            if not status & STATUS_MEASURING:
                break
            await asyncio.sleep(0.001)
        else:
            raise DeviceError(
                f"{self.where}: BME280 still measuring "
                f"{self.t_measure_max_s * 1000 + 5:.1f} ms after a forced conversion"
            )
        return await self.bus.read_block(self.addr, REG_DATA, 8)

    async def close(self) -> None:
        # leave the chip asleep (lowest power); a vanished chip is fine here
        with contextlib.suppress(DeviceError):
            await self.bus.write_byte(self.addr, REG_CTRL_MEAS, self._ctrl_meas & ~0b11)


_factory = i2c_factory(BME280)


SENSOR = SensorSpec(
    name="bme280",
    config_type=BME280Config,
    factory=_factory,
    transport="i2c",
    summary="Bosch BME280 temperature (°C), pressure (Pa), humidity (%RH), I2C 0x76/0x77",
)
