"""MPU-6050: LSB scales, burst decode, round trips, 200 reads/s, FIFO, faults."""

from __future__ import annotations

import asyncio
import math
import struct
import time

import msgspec
import numpy as np
import pytest

from drivers.base import DeviceError, Quality
from drivers.emulated.i2c import EmulatedSMBus
from drivers.emulated.mpu6050 import EmulatedMPU6050
from drivers.i2c import mpu6050 as proto
from drivers.i2c.mpu6050 import MPU6050, MPU6050Config

from .conftest import MakeBus
from .helpers import FakeClock, cfg, values


def test_lsb_scales_from_the_register_map() -> None:
    # RM-MPU-6000A §4.17 / §4.19: sensitivity per full-scale setting
    assert dict(zip(proto.ACCEL_RANGES_G, proto.ACCEL_LSB_PER_G, strict=True)) == {
        2: 16384.0,
        4: 8192.0,
        8: 4096.0,
        16: 2048.0,
    }
    assert dict(zip(proto.GYRO_RANGES_DPS, proto.GYRO_LSB_PER_DPS, strict=True)) == {
        250: 131.0,
        500: 65.5,
        1000: 32.8,
        2000: 16.4,
    }
    assert proto.temp_counts_to_c(0) == pytest.approx(36.53)
    assert proto.temp_counts_to_c(-521) == pytest.approx(35.0, abs=0.01)


def test_decode_burst_big_endian_signed() -> None:
    data = struct.pack(">7h", 16384, -8192, 0, -521, 131, -32768, 32767)
    assert proto.decode_burst(data) == (16384, -8192, 0, -521, 131, -32768, 32767)
    with pytest.raises(ValueError):
        proto.decode_burst(data[:12])


def test_sample_rate_divider() -> None:
    assert proto.divider_for(1000, 3) == 0
    assert proto.divider_for(100, 3) == 9
    assert proto.divider_for(8000, 0) == 0  # DLPF off: 8 kHz gyro output rate
    assert proto.sample_rate_hz(1, 4) == 200.0
    with pytest.raises(ValueError, match="not 1000 Hz"):
        proto.divider_for(300, 2)


@pytest.mark.parametrize(("accel_g", "gyro_dps"), [(2, 250), (16, 2000)])
async def test_round_trip_per_range(make_bus: MakeBus, accel_g: int, gyro_dps: int) -> None:
    a_true = (0.1234, -0.5, 1.01)
    g_true = (12.5, -100.25, 0.0)
    emu = EmulatedMPU6050(accel_g=a_true, gyro_dps=g_true, temperature_c=41.2)
    bus, _ = make_bus(emu)
    d = MPU6050(cfg(MPU6050Config, accel_range_g=accel_g, gyro_range_dps=gyro_dps), bus)
    await d.open()
    v = values(await d.read())
    a_lsb = proto.ACCEL_LSB_PER_G[proto.ACCEL_RANGES_G.index(accel_g)]
    g_lsb = proto.GYRO_LSB_PER_DPS[proto.GYRO_RANGES_DPS.index(gyro_dps)]
    for axis, a, g in zip("xyz", a_true, g_true, strict=True):
        assert v[f"accel_{axis}"] == pytest.approx(a, abs=0.5 / a_lsb)
        assert v[f"gyro_{axis}"] == pytest.approx(g, abs=0.5 / g_lsb)
    assert v["temperature"] == pytest.approx(41.2, abs=0.5 / 340)


async def test_saturation_at_full_scale(make_bus: MakeBus) -> None:
    bus, _ = make_bus(EmulatedMPU6050(accel_g=(3.0, -3.0, 0.0)))
    d = MPU6050(cfg(MPU6050Config, accel_range_g=2), bus)
    await d.open()
    v = values(await d.read())
    assert v["accel_x"] == pytest.approx(32767 / 16384) and v["accel_y"] == -2.0


def test_emulator_powers_up_asleep_and_samples_at_the_configured_rate() -> None:
    clk = FakeClock()
    n = {"k": 0}

    def accel(t: float) -> tuple[float, float, float]:
        n["k"] += 1
        return (t - 1000.0, 0.0, 1.0)

    emu = EmulatedMPU6050(accel_g=accel, clock=clk)
    smbus = EmulatedSMBus([emu])
    assert smbus.read_byte_data(0x68, proto.REG_PWR_MGMT_1) == 0x40
    assert smbus.read_i2c_block_data(0x68, 0x3B, 14) == [0] * 14  # asleep: frozen
    smbus.write_byte_data(0x68, proto.REG_CONFIG, 3)  # DLPF 44 Hz: 1 kHz base, 4.9 ms delay
    smbus.write_byte_data(0x68, proto.REG_SMPLRT_DIV, 9)  # 100 Hz
    smbus.write_byte_data(0x68, proto.REG_PWR_MGMT_1, 0x01)
    assert smbus.read_byte_data(0x68, proto.REG_INT_STATUS) & proto.INT_DATA_RDY
    assert smbus.read_byte_data(0x68, proto.REG_INT_STATUS) == 0  # cleared on read
    clk.advance(0.0095)
    assert smbus.read_byte_data(0x68, proto.REG_INT_STATUS) == 0  # no new sample yet
    clk.advance(0.001)
    assert smbus.read_byte_data(0x68, proto.REG_INT_STATUS) & proto.INT_DATA_RDY
    ax = proto.decode_burst(bytes(smbus.read_i2c_block_data(0x68, 0x3B, 14)))[0] / 16384
    # sample 1 at t0 + 10 ms, seen through the DLPF's 4.9 ms delay
    assert ax == pytest.approx(0.010 - 0.0049, abs=1 / 16384)


async def test_sustains_200_reads_per_second(make_bus: MakeBus) -> None:
    t = {"v": 0.0}

    def vib(ts: float) -> tuple[float, float, float]:
        return (0.3 * math.sin(2 * math.pi * 50 * ts), 0.0, 1.0)

    emu = EmulatedMPU6050(accel_g=vib)
    bus, _ = make_bus(emu, scl_hz=400_000)  # 0.39 ms of wire time per 14-byte burst
    d = MPU6050(cfg(MPU6050Config, rate_hz=200, sample_rate_hz=1000), bus)
    await d.open()
    loop = asyncio.get_running_loop()
    period = 1 / 200
    start = loop.time() + 0.01
    late: list[float] = []
    got = 0
    for k in range(200):  # one second on absolute deadlines, as the hub schedules
        deadline = start + k * period
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        await d.read()
        t["v"] = loop.time()
        late.append(t["v"] - deadline)
        got += 1
    elapsed = t["v"] - start
    assert got == 200 and d.counters["reads"] == 200
    # 200 reads in (about) one second: the bus path keeps up with 200 Hz
    assert elapsed < 1.0 + 0.25, f"200 reads took {elapsed:.3f} s"
    assert float(np.median(late)) < period, "typical read finished within its period"
    # capacity: back-to-back reads far exceed 200/s
    t0 = time.perf_counter()
    for _ in range(100):
        await d.read()
    assert 100 / (time.perf_counter() - t0) > 200


async def test_fifo_drain_returns_every_sample() -> None:
    clk = FakeClock()
    emu = EmulatedMPU6050(accel_g=lambda t: (round(t - 1000.0, 6), 0.0, 1.0), clock=clk)
    smbus = EmulatedSMBus([emu])
    from drivers.i2c.bus import AsyncI2CBus

    bus = AsyncI2CBus.from_smbus(smbus, "emu")
    d = MPU6050(cfg(MPU6050Config, dlpf_hz=260, sample_rate_hz=1000, accel_range_g=2), bus)
    await d.open()
    assert (await d.read_fifo()).shape == (0, 7)  # enables the FIFO
    clk.advance(0.0405)  # 40 more samples at 1 kHz (DLPF off: 8 kHz / 8)
    got = await d.read_fifo(max_samples=100)
    assert got.shape == (40, 7)
    assert np.all(np.diff(got[:, 0]) == pytest.approx(0.001, abs=1 / 16384))
    clk.advance(0.2)  # 200 samples > 73 records of 14 bytes: overflow
    assert (await d.read_fifo()).shape == (0, 7)
    assert d.counters["fifo_overflows"] == 1
    await bus.close()


async def test_wrong_who_am_i(make_bus: MakeBus) -> None:
    bus, _ = make_bus(EmulatedMPU6050(who_am_i=0x70))
    with pytest.raises(DeviceError, match=r"WHO_AM_I 0x70 \(that is an MPU-6500\)"):
        await MPU6050(cfg(MPU6050Config), bus).open()


async def test_nack_stuck_and_brownout(make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch) -> None:
    phase = {"v": 0.0}
    emu = EmulatedMPU6050(accel_g=lambda t: (phase["v"], 0.0, 1.0))
    bus, _ = make_bus(emu)
    d = MPU6050(cfg(MPU6050Config, stuck_after_reads=3), bus)
    await d.open()
    emu.inject_nack(1)
    with pytest.raises(DeviceError):
        await d.read()
    assert d.counters["bus_errors"] == 1
    emu.stuck = True
    phase["v"] = 0.5
    rs = [await d.read() for _ in range(4)]
    assert values(rs[-1])["accel_x"] == 0.0 and rs[-1][0].quality is Quality.UNCERTAIN
    emu.stuck = False
    await asyncio.sleep(0.003)  # the next 1 kHz sample
    r = await d.read()
    assert values(r)["accel_x"] == pytest.approx(0.5, abs=1e-3) and r[0].quality is Quality.GOOD
    # brown-out: the part comes back asleep; the periodic check notices and re-initialises
    monkeypatch.setattr(proto, "HEALTH_CHECK_EVERY", 2)
    emu.unplug()
    emu.replug()
    with pytest.raises(DeviceError, match="PWR_MGMT_1 reads 0x40"):
        for _ in range(3):
            await d.read()
    assert d.counters["config_lost"] == 1
    assert values(await d.read())["accel_x"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"address": 0x6A}, "legal: 0x68 (AD0 low), 0x69 (AD0 high)"),
        ({"accel_range_g": 3}, "accel_range_g 3 g is not supported; legal: 2 g, 4 g"),
        ({"gyro_range_dps": 300}, "legal: 250 °/s"),
        ({"dlpf_hz": 50}, "dlpf_hz 50 Hz"),
        ({"sample_rate_hz": 300}, "sample_rate_hz 300"),
    ],
)
def test_config_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as ei:
        cfg(MPU6050Config, **kw)
    assert message in str(ei.value)
