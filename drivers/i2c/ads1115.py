"""TI ADS1115 16-bit delta-sigma ADC, 4 inputs (driver name `ads1115`).

Theory of operation
-------------------
Protocol part (pure): four 16-bit big-endian registers behind a pointer byte
(conversion, config, lo/hi threshold). The config word (datasheet Table 8) packs OS
(write 1: start a single conversion; read 1: idle), MUX (4 differential pairs, 4
single-ended inputs against GND), PGA (full-scale ±6.144 .. ±0.256 V), MODE, DR (8 .. 860
samples/s) and the comparator (disabled here: COMP_QUE = 11). A conversion code is two's
complement; volts = code * FSR / 32768, and the codes 0x7FFF / 0x8000 mean the input is
at or beyond full scale (reported with quality UNCERTAIN, counted as `saturated`).

Driver part: single-shot only, one configured channel after the other: write the
config word with OS=1, wait one conversion period (1/DR) on the event loop, poll OS until
the part reports idle (a few polls at most), read the conversion register. Every channel
has its own mux, range, scale and offset, so one ADS1115 can read a shunt amplifier on
±0.256 V and a 0-5 V divider on ±6.144 V.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

import msgspec

from drivers.base import AsyncI2CBusLike, ChannelInfo, DeviceError, Quality, Reading, SensorConfig
from drivers.i2c.common import I2CSensor, check_address, check_bus, check_choice, i2c_factory
from drivers.registry import SensorSpec

# -- protocol ------------------------------------------------------------------------------

REG_CONVERSION = 0x00
REG_CONFIG = 0x01
REG_LO_THRESH = 0x02
REG_HI_THRESH = 0x03
CONFIG_DEFAULT = 0x8583

OS_BIT = 0x8000
MODE_SINGLE = 0x0100
COMP_DISABLE = 0x0003

ADDRESSES = {0x48: "ADDR to GND", 0x49: "ADDR to VDD", 0x4A: "ADDR to SDA", 0x4B: "ADDR to SCL"}

# MUX field (bits 14:12): input name -> code
MUX = {
    "ain0-ain1": 0,
    "ain0-ain3": 1,
    "ain1-ain3": 2,
    "ain2-ain3": 3,
    "ain0": 4,
    "ain1": 5,
    "ain2": 6,
    "ain3": 7,
}
# PGA field (bits 11:9): full-scale range in volts by code (5..7 are all ±0.256 V)
PGA_FSR_V = (6.144, 4.096, 2.048, 1.024, 0.512, 0.256, 0.256, 0.256)
RANGES_V = PGA_FSR_V[:6]
# DR field (bits 7:5): samples per second by code
DATA_RATES_SPS = (8, 16, 32, 64, 128, 250, 475, 860)

InputName = Literal[
    "ain0", "ain1", "ain2", "ain3", "ain0-ain1", "ain0-ain3", "ain1-ain3", "ain2-ain3"
]


def config_word(mux: int, fsr_v: float, data_rate_sps: int, start: bool = True) -> int:
    """The config register for one single-shot conversion, comparator disabled."""
    return (
        (OS_BIT if start else 0)
        | (mux & 7) << 12
        | PGA_FSR_V.index(fsr_v) << 9
        | MODE_SINGLE
        | DATA_RATES_SPS.index(data_rate_sps) << 5
        | COMP_DISABLE
    )


def lsb_volts(fsr_v: float) -> float:
    return fsr_v / 32768.0


def code_to_volts(code: int, fsr_v: float) -> float:
    """Two's complement conversion code -> volts at the given full-scale range."""
    if code >= 0x8000:
        code -= 0x10000
    return code * fsr_v / 32768.0


def volts_to_code(volts: float, fsr_v: float) -> int:
    """Volts -> the (signed) code the ADC outputs, saturating at full scale."""
    return max(-32768, min(32767, round(volts * 32768.0 / fsr_v)))


def is_saturated(code: int) -> bool:
    return code in (0x7FFF, 0x8000)


# -- config ----------------------------------------------------------------------------------


class ADS1115Channel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    input: InputName = "ain0"
    range_v: float = 4.096  # full-scale ± volts: 6.144, 4.096, 2.048, 1.024, 0.512, 0.256
    scale: float = 1.0  # value = volts * scale + offset (e.g. a divider or a shunt)
    offset: float = 0.0
    unit: str = "V"

    def __post_init__(self) -> None:
        check_choice("range_v", self.range_v, RANGES_V, " V")


class ADS1115Config(SensorConfig, tag="ads1115"):
    """```yaml
    - id: analog
      driver: ads1115
      bus: 1
      address: 0x48            # 0x48 GND, 0x49 VDD, 0x4A SDA, 0x4B SCL on the ADDR pin
      data_rate_sps: 128       # 8, 16, 32, 64, 128, 250, 475, 860
      inputs:
        - {name: supply, input: ain0, range_v: 6.144, scale: 2.0}   # 1:1 divider
        - {name: shunt, input: ain2-ain3, range_v: 0.256, scale: 100.0, unit: A}
    ```"""

    bus: int = 1
    address: int = 0x48
    data_rate_sps: int = 128
    inputs: list[ADS1115Channel] = msgspec.field(
        default_factory=lambda: [ADS1115Channel(name="ain0")]
    )
    stuck_after_reads: int = 0

    def __post_init__(self) -> None:
        check_bus(self.bus)
        check_address("ADS1115", self.address, ADDRESSES)
        check_choice("data_rate_sps", self.data_rate_sps, DATA_RATES_SPS, " SPS")
        if not self.inputs:
            raise ValueError("inputs: at least one input is needed")
        names = [c.name for c in self.inputs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"inputs: channel names must be unique, repeated: {sorted(dup)}")
        read_ms = len(self.inputs) * 1100.0 / self.data_rate_sps  # 1/DR + 10 % oscillator
        if read_ms >= self.read_timeout_ms:
            raise ValueError(
                f"{len(self.inputs)} inputs at data_rate_sps {self.data_rate_sps} take "
                f"{read_ms:.0f} ms per read, not less than read_timeout_ms "
                f"{self.read_timeout_ms}: raise data_rate_sps or read_timeout_ms"
            )


# -- driver ------------------------------------------------------------------------------------


class ADS1115(I2CSensor):
    def __init__(self, cfg: ADS1115Config, bus: AsyncI2CBusLike) -> None:
        super().__init__(
            bus, cfg.address, "saturated", "not_ready", stuck_after=cfg.stuck_after_reads
        )
        self.cfg = cfg
        self.channels: Sequence[ChannelInfo] = tuple(
            ChannelInfo(c.name, c.unit) for c in cfg.inputs
        )
        self._words = [config_word(MUX[c.input], c.range_v, cfg.data_rate_sps) for c in cfg.inputs]
        self.conversion_s = 1.0 / cfg.data_rate_sps

    async def open(self) -> None:
        # No id register: an ACKed read of the config register is the presence check
        # (its content depends on whoever used the part last, so it proves nothing).
        await self.bus.read_block(self.addr, REG_CONFIG, 2)
        self._stuck.reset()

    async def _convert(self, word: int) -> int:
        await self.bus.write_block(self.addr, REG_CONFIG, word.to_bytes(2, "big"))
        # A conversion takes 1/DR; the oscillator is ±10 %, so wait 10 % more up front.
        await asyncio.sleep(self.conversion_s * 1.1 + 0.0001)
        for _ in range(5):
            cfg = int.from_bytes(await self.bus.read_block(self.addr, REG_CONFIG, 2), "big")
            if cfg & OS_BIT:
                break
            self.counters["not_ready"] += 1
            await asyncio.sleep(self.conversion_s * 0.1 + 0.0005)
        else:
            raise DeviceError(
                f"{self.where}: ADS1115 conversion not ready after "
                f"{self.conversion_s * 1.6 * 1000:.1f} ms"
            )
        return int.from_bytes(await self.bus.read_block(self.addr, REG_CONVERSION, 2), "big")

    async def read(self) -> Sequence[Reading]:
        codes = []
        with self.counting_read():
            for word in self._words:
                codes.append(await self._convert(word))
        stuck_q = self.stuck_quality(b"".join(c.to_bytes(2, "big") for c in codes))
        out = []
        for ch, code in zip(self.cfg.inputs, codes, strict=True):
            q = stuck_q
            if is_saturated(code):
                self.counters["saturated"] += 1
                q = Quality.UNCERTAIN
            volts = code_to_volts(code, ch.range_v)
            out.append(Reading(ch.name, volts * ch.scale + ch.offset, q))
        return out

    async def close(self) -> None:
        """Single-shot mode: the part powers down after each conversion by itself."""


_factory = i2c_factory(ADS1115)


SENSOR = SensorSpec(
    name="ads1115",
    config_type=ADS1115Config,
    factory=_factory,
    transport="i2c",
    summary="TI ADS1115 16-bit ADC, 4 single-ended or 2 differential inputs, I2C 0x48-0x4B",
)
