"""Cost of the I2C path: the bus worker hop and the drivers, against the bare emulator call.

Figures, measured in the same run so a shared, noisy machine affects both sides:
- bare_read_us: `EmulatedSMBus.read_i2c_block_data(0x68, 0x3B, 14)` called directly (the
  floor: what the emulated "ioctl" itself costs);
- bus_read_us: the same read through `AsyncI2CBus.read_block` (one executor hop to the bus
  worker and back); bus_overhead_ratio = bus_read_us / bare_read_us;
- mpu_read_us: `MPU6050.read()` (hop + decode + 7 Readings);
- mpu_rate_achieved_hz: an MPU-6050 polled on absolute deadlines at --rate-hz (default
  200) for --seconds, with a BME280 in forced mode at 10 Hz on the same bus, and the
  event-loop lag p99 (a 1 ms ticker) while they run. With --scl-hz the emulated bus adds
  the wire time of every transaction (400 kHz by default, as recommended for >= 200 Hz).

    python benchmarks/i2c_bus.py [--seconds 3] [--rate-hz 200] [--scl-hz 400000]

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drivers.emulated.bme280 import EmulatedBME280  # noqa: E402
from drivers.emulated.i2c import EmulatedSMBus  # noqa: E402
from drivers.emulated.mpu6050 import EmulatedMPU6050  # noqa: E402
from drivers.i2c.bme280 import BME280, BME280Config  # noqa: E402
from drivers.i2c.bus import AsyncI2CBus  # noqa: E402
from drivers.i2c.mpu6050 import MPU6050, MPU6050Config  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def vib(t: float) -> tuple[float, float, float]:
    return (0.2 * math.sin(2 * math.pi * 47 * t), 0.1 * math.sin(2 * math.pi * 31 * t), 1.0)


async def main(seconds: float, rate_hz: float, scl_hz: float | None) -> dict[str, float]:
    n = 2000
    smbus = EmulatedSMBus([EmulatedMPU6050(accel_g=vib), EmulatedBME280()])
    smbus.write_byte_data(0x68, 0x6B, 0x01)  # wake the part for the bare measurement
    t0 = time.perf_counter()
    for _ in range(n):
        smbus.read_i2c_block_data(0x68, 0x3B, 14)
    bare_us = (time.perf_counter() - t0) / n * 1e6

    bus = AsyncI2CBus.from_smbus(smbus, "bench")
    for _ in range(50):  # warm the worker thread
        await bus.read_block(0x68, 0x3B, 14)
    t0 = time.perf_counter()
    for _ in range(n):
        await bus.read_block(0x68, 0x3B, 14)
    bus_us = (time.perf_counter() - t0) / n * 1e6

    mpu = MPU6050(
        msgspec.convert({"id": "vib", "driver": "mpu6050", "rate_hz": rate_hz}, MPU6050Config),
        bus,
    )
    await mpu.open()
    t0 = time.perf_counter()
    for _ in range(n):
        await mpu.read()
    mpu_us = (time.perf_counter() - t0) / n * 1e6
    await bus.close()

    # -- sustained, scheduled acquisition with the wire time of a real bus --------------
    smbus2 = EmulatedSMBus([EmulatedMPU6050(accel_g=vib), EmulatedBME280()], scl_hz=scl_hz)
    bus2 = AsyncI2CBus.from_smbus(smbus2, "bench2")
    mpu2 = MPU6050(
        msgspec.convert({"id": "vib", "driver": "mpu6050", "rate_hz": rate_hz}, MPU6050Config),
        bus2,
    )
    bme = BME280(
        msgspec.convert({"id": "c", "driver": "bme280", "mode": "forced"}, BME280Config), bus2
    )
    await mpu2.open()
    await bme.open()
    loop = asyncio.get_running_loop()

    async def ticker(until: float, out: list[float]) -> None:
        while loop.time() < until:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            out.append((time.perf_counter() - t - 0.001) * 1000)

    idle_lags: list[float] = []  # baseline: the same ticker with nothing else running
    await ticker(loop.time() + min(1.0, seconds), idle_lags)

    stop = loop.time() + seconds
    lags: list[float] = []
    reads = 0
    done_at: list[float] = []

    async def poll_mpu() -> None:
        nonlocal reads
        period = 1 / rate_hz
        start = loop.time()
        k = 0
        while True:
            k += 1
            deadline = start + k * period
            if deadline >= stop:
                return
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            await mpu2.read()
            reads += 1
            done_at.append(loop.time())

    async def poll_bme() -> None:
        while loop.time() < stop:
            await bme.read()
            await asyncio.sleep(0.1)

    await asyncio.gather(ticker(stop, lags), poll_mpu(), poll_bme())
    achieved = (reads - 1) / (done_at[-1] - done_at[0])
    stats = bus2.stats()
    await bus2.close()
    return {
        "bare_read_us": round(bare_us, 2),
        "bus_read_us": round(bus_us, 2),
        "bus_overhead_ratio": round(bus_us / bare_us, 2),
        "mpu_read_us": round(mpu_us, 2),
        "mpu_rate_configured_hz": rate_hz,
        "mpu_rate_achieved_hz": round(achieved, 1),
        "rate_achieved_ratio": round(achieved / rate_hz, 3),
        "loop_lag_p50_ms": round(statistics.median(lags), 3),
        "loop_lag_p99_ms": round(pct(lags, 99), 3),
        "loop_lag_idle_p99_ms": round(pct(idle_lags, 99), 3),
        "loop_lag_p99_ratio": round(pct(lags, 99) / max(pct(idle_lags, 99), 1e-3), 2),
        "bus_utilisation_ratio": round(stats["busy_s"] / seconds, 3),
        "bus_errors": stats["errors"],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate-hz", type=float, default=200.0)
    ap.add_argument("--scl-hz", type=float, default=400_000.0, help="0: no wire time")
    a = ap.parse_args()
    figures = asyncio.run(main(a.seconds, a.rate_hz, a.scl_hz or None))
    print("I2C bus path (emulated devices; no real hardware)")
    print(f"  bare emulator 14-byte read : {figures['bare_read_us']:8.1f} us")
    print(
        f"  through AsyncI2CBus        : {figures['bus_read_us']:8.1f} us "
        f"({figures['bus_overhead_ratio']}x the bare call: the executor hop)"
    )
    print(f"  MPU6050.read()             : {figures['mpu_read_us']:8.1f} us")
    print(
        f"  MPU-6050 at {a.rate_hz:g} Hz + BME280 forced 10 Hz, scl {a.scl_hz:g} Hz: "
        f"{figures['mpu_rate_achieved_hz']} Hz achieved "
        f"(ratio {figures['rate_achieved_ratio']}), loop lag p50/p99 "
        f"{figures['loop_lag_p50_ms']}/{figures['loop_lag_p99_ms']} ms (idle p99 "
        f"{figures['loop_lag_idle_p99_ms']} ms), bus busy "
        f"{figures['bus_utilisation_ratio'] * 100:.1f} %"
    )
    print(json.dumps(figures))
