"""Acquisition benchmark: 20 emulated I2C sensors at 1-200 Hz through the SensorHub.

Three phases in one run, so the ratios compare like with like on this machine (same
drivers, same emulators, same rates, same CPU caches and load):

1. Idle: the loop-lag probe alone (wakes on absolute deadlines every
   `--lag-interval-ms`; lag = wake time - deadline, as the daemon's monitor measures it).
2. Bare (`--bare-s`, half before the hub phases and half after): each REAL driver reads
   its emulated part directly, paced at its configured rate on absolute deadlines, all 20
   concurrently, with every bus transaction executed inline on the calling thread (the
   real `AsyncI2CBus` code with its worker hop removed): the cost of the emulator calls
   plus the bare minimum to pace them.
3. Acquisition (`--duration-s`): the same 20 sensors in a `SensorHub` (one worker thread
   per bus, four buses, timeouts, retries, health, samples, ring buffers) with a
   telemetry-like subscriber. Before it, the same hub over inline buses
   (`--hub-inline-s`) splits the overhead into the hub's own part and the bus worker hop.

Figures: CPU time of the whole process per read (all threads) in each phase;
`overhead_ratio` = acquisition CPU per read / bare CPU per read (target <= 2);
`emulator_us_per_read`: CPU spent inside the emulated SMBus calls (a meter around them);
achieved/configured rate per sensor (min and mean); loop lag p50/p99/max while acquiring
(target p99 <= 1 ms), with the idle and bare lags beside it; and how long the loop thread
was runnable but waiting for a CPU (`/proc/thread-self/schedstat`) in each phase, which
says how much of the lag the machine's other load caused; per wake, the lag less the
run-queue wait since the previous wake is the loop's own lag (`loop_lag_own_p99_ms`: its
callbacks and its waits for the GIL, not the CPU it was refused).

Honesty of the baseline: the bare phase runs the very driver objects and emulators the
hub runs (same factories, same scenario seed, same metered SMBus wrapper, same bus code
minus the thread hop), measured in the same process minutes before the hub phase. The hub
does nothing the bare loop skips except its own work (timeouts, retries, health, samples,
rings, fan-out, rate bookkeeping) and the hop to the bus workers.

4. Wire time (`--wire-s`, default 30, on by default): the acquisition phase again with
   every emulated transaction also taking its wire time at `--wire-scl-hz` (400 kHz, 9
   clocks per byte), slept with the GIL released, as a kernel I2C transfer is:
   `loop_lag_p99_ms_wire_time`. The emulators' own Python still holds the GIL while it
   runs (a kernel transfer would not), so this figure still carries that tax, kept small:
   a 14-byte MPU-6050 burst with a fresh sample is ~8 us of Python, the scenario's
   vectorised blocks ~0.1 ms once per 250 ms (drivers/emulated/simulated.py GridSignal).

Usage: python benchmarks/acquisition.py [--duration-s 60] [--bare-s 20] [--no-uvloop]
The last line is one JSON object with every figure (units in the names).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.emulated.scenario import Scenario
from drivers.emulated.simulated import SimResources
from drivers.i2c.bus import AsyncI2CBus
from drivers.registry import sensor_drivers
from edgerund.config.schema import Config
from edgerund.context import Supervisor, TaskScope
from edgerund.hub.component import SensorHub

BUSES = (1, 2, 3, 4)
# per bus: (driver, address, rates on buses 1..4, extra keys)
PARTS: tuple[tuple[str, int, tuple[float, ...], dict[str, Any]], ...] = (
    ("mpu6050", 0x68, (200.0, 200.0, 100.0, 100.0), {"read_timeout_ms": 50}),
    ("ina219", 0x40, (50.0, 20.0, 10.0, 10.0), {"shunt_ohms": 0.01, "max_current_a": 20.0}),
    (
        "ads1115",
        0x48,
        (10.0, 5.0, 2.0, 1.0),
        {
            "data_rate_sps": 860,
            "inputs": [
                {"name": "motor_a", "input": "ain0", "range_v": 1.024, "scale": 10.0, "unit": "A"}
            ],
        },
    ),
    ("bme280", 0x76, (1.0, 2.0, 5.0, 1.0), {"mode": "normal"}),
    ("sht", 0x44, (1.0, 1.0, 2.0, 1.0), {}),
)


def sensor_entries() -> list[dict[str, Any]]:
    out = []
    for b_i, bus in enumerate(BUSES):
        for driver, addr, rates, extra in PARTS:
            out.append(
                {
                    "id": f"{driver}_{bus}",
                    "driver": driver,
                    "bus": bus,
                    "address": addr,
                    "rate_hz": rates[b_i],
                    **extra,
                }
            )
    return out


class MeteredSMBus:
    """Wraps an emulated SMBus: CPU time (of the calling worker thread) inside each call."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.cpu_s = 0.0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)
        if not callable(fn):
            return fn

        def metered(*a: Any, **kw: Any) -> Any:
            c0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.cpu_s += time.thread_time() - c0  # one writer per bus: its worker
                self.calls += 1

        return metered


class InlineBus(AsyncI2CBus):
    """The real bus code with the worker hop removed: transactions run on the caller."""

    async def _call(self, fn: Callable[[Any], Any], addr: int, reg: int | None, op: str) -> Any:
        return self._run(fn, addr, reg, op)


class MultiBusSim:
    """Resources routing bus n to its own SimResources (one emulated bus each), each
    emulated SMBus wrapped in a CPU meter; `inline` drops the bus worker threads."""

    def __init__(
        self, scenario: Scenario, inline: bool = False, scl_hz: float | None = None
    ) -> None:
        self.sims = {b: SimResources(scenario, i2c_bus=b, scl_hz=scl_hz) for b in BUSES}
        self.inline = inline
        self.meters: dict[int, MeteredSMBus] = {}
        self._buses: dict[int, AsyncI2CBus] = {}

    def i2c_bus(self, bus: int) -> Any:
        b = self._buses.get(bus)
        if b is None:
            sim = self.sims[bus]
            sim.i2c_bus(bus)  # builds the emulated SMBus with its parts
            meter = MeteredSMBus(sim.smbus)
            self.meters[bus] = meter
            cls = InlineBus if self.inline else AsyncI2CBus
            b = cls.from_smbus(meter, f"bench-{bus}")
            self._buses[bus] = b
        return b

    def emulator_cpu_s(self) -> float:
        return sum(m.cpu_s for m in self.meters.values())

    def serial_port(self, url: str, **settings: Any) -> Any:
        raise RuntimeError("no serial devices in this benchmark")

    async def aclose(self) -> None:
        for b in self._buses.values():
            await b.close()
        for s in self.sims.values():
            await s.aclose()


def runqueue_wait_s() -> float:
    """Time the calling thread spent runnable but waiting for a CPU (Linux schedstat).

    The share of loop lag that is the machine's doing, not ours: other processes (or our
    own bus workers) holding both cores when the loop's timer fires. NaN when unavailable.
    """
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return math.nan


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


class RunQueueClock:
    """The calling thread's run-queue wait so far (s), from its schedstat kept open: an
    fd opened on /proc/thread-self stays the opening thread's (~2 us a read)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return math.nan
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def lag_probe(
    interval_s: float, out: list[float], stop: asyncio.Event, own: list[float] | None = None
) -> None:
    """Wake on absolute deadlines; `out` gets each wake's lag. `own` gets the same lag less
    the loop thread's run-queue wait since the previous wake (time it was runnable but
    another thread, of this process or any other, had the CPU): the part of the lag the
    machine's load does not explain (our callbacks on the loop, waiting for the GIL)."""
    rq = RunQueueClock()
    deadline = time.perf_counter()
    rq_prev = rq()
    try:
        while not stop.is_set():
            deadline += interval_s
            delay = deadline - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            lag = max(0.0, now - deadline)
            out.append(lag)
            if own is not None:
                rq_now = rq()
                own.append(max(0.0, lag - (rq_now - rq_prev)))
                rq_prev = rq_now
            if now - deadline > interval_s:  # fell behind: skip, as the daemon's monitor does
                deadline = now
    finally:
        rq.close()


async def measure_lag(seconds: float, interval_s: float) -> tuple[list[float], list[float], float]:
    """(lags, own lags, loop thread's run-queue wait per second) of the idle loop."""
    out: list[float] = []
    own: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(lag_probe(interval_s, out, stop, own))
    w0, t0 = runqueue_wait_s(), time.monotonic()
    await asyncio.sleep(seconds)
    rq = (runqueue_wait_s() - w0) / (time.monotonic() - t0)
    stop.set()
    await task
    return out, own, rq


async def bare_phase(
    sensors: list[Any], seconds: float, interval_s: float
) -> tuple[float, float, float, list[float], float]:
    """(CPU s per read, emulator CPU s per read, reads per s, loop lags, loop thread's
    run-queue wait per s) of the bare loop."""
    specs = sensor_drivers()
    res = MultiBusSim(Scenario(seed=42), inline=True)
    drivers = [(cfg, specs[cfg.__struct_config__.tag].factory(cfg, res)) for cfg in sensors]
    for _, drv in drivers:
        await drv.open()
    reads = [0]

    async def pace(cfg: Any, drv: Any) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / cfg.rate_hz
        deadline = loop.time()
        while True:
            deadline += period
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                await drv.read()
                reads[0] += 1

    tasks = [asyncio.create_task(pace(cfg, drv)) for cfg, drv in drivers]
    await asyncio.sleep(2.0)  # warm-up
    lag: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(lag_probe(interval_s, lag, stop))
    r0, c0, e0, t0 = reads[0], time.process_time(), res.emulator_cpu_s(), time.monotonic()
    w0 = runqueue_wait_s()
    await asyncio.sleep(seconds)
    rq = (runqueue_wait_s() - w0) / seconds
    n = reads[0] - r0
    cpu, emu, dt = time.process_time() - c0, res.emulator_cpu_s() - e0, time.monotonic() - t0
    stop.set()
    await probe
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, drv in drivers:
        await drv.close()
    await res.aclose()
    return cpu / max(1, n), emu / max(1, n), n / dt, lag, rq


async def hub_phase(
    sensors: list[Any],
    seconds: float,
    interval_s: float,
    inline: bool,
    scl_hz: float | None = None,
) -> dict[str, Any]:
    """Run the 20 sensors in a SensorHub; CPU, reads, lag and final status."""
    async with Supervisor(print) as sup, sup.scope("hub") as scope:
        return await _hub_phase(sensors, seconds, interval_s, inline, scope, scl_hz)


async def _hub_phase(
    sensors: list[Any],
    seconds: float,
    interval_s: float,
    inline: bool,
    scope: TaskScope,
    scl_hz: float | None = None,
) -> dict[str, Any]:
    res = MultiBusSim(Scenario(seed=42), inline=inline, scl_hz=scl_hz)
    hub = SensorHub(sensors, res, scope=scope)
    n_samples = [0]

    def subscriber(sample: Any) -> None:  # a cheap fan-out consumer, as telemetry is
        n_samples[0] += 1

    hub.subscribe(subscriber)
    lag: list[float] = []
    own: list[float] = []
    stop = asyncio.Event()
    async with hub:
        # settle: every sensor opened and read once before the clock starts
        for _ in range(200):
            if all(hub.state(s.id) == "ok" for s in sensors):
                break
            await asyncio.sleep(0.05)
        gc.collect()
        gc.freeze()  # as the daemon does after start-up
        probe = asyncio.create_task(lag_probe(interval_s, lag, stop, own))
        reads0 = {s.id: hub._rts[s.id].counters.reads for s in sensors}
        t0 = time.monotonic()
        c0 = time.process_time()
        m0 = time.thread_time()  # the event loop's thread
        w0 = runqueue_wait_s()
        e0 = res.emulator_cpu_s()
        s0 = n_samples[0]
        await asyncio.sleep(seconds)
        out: dict[str, Any] = {
            "cpu": time.process_time() - c0,
            "loop_cpu": time.thread_time() - m0,
            "rq_wait": runqueue_wait_s() - w0,
            "emu_cpu": res.emulator_cpu_s() - e0,
            "dt": time.monotonic() - t0,
            "reads": {s.id: hub._rts[s.id].counters.reads - reads0[s.id] for s in sensors},
            "samples": n_samples[0] - s0,
            "lag": lag,
            "own_lag": own,
        }
        stop.set()
        await probe
        out["status"] = {st["id"]: st for st in hub.status()["sensors"]}
    await res.aclose()
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = msgspec.convert({"gateway": {"id": "bench"}, "sensors": sensor_entries()}, Config)
    sensors = list(cfg.sensors)
    interval = args.lag_interval_ms / 1000.0

    print(f"event loop: {type(asyncio.get_running_loop()).__module__}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    idle_lag, idle_own, idle_rq = await measure_lag(args.idle_s, interval)
    print(
        f"idle loop lag: p50 {pct(idle_lag, 50) * 1e3:.3f} ms, "
        f"p99 {pct(idle_lag, 99) * 1e3:.3f} ms, max {max(idle_lag) * 1e3:.3f} ms; "
        f"loop thread waited {idle_rq * 1e3:.2f} ms/s for a CPU"
    )

    total_rate = sum(s.rate_hz for s in sensors)
    # The baseline runs in two halves, before and after the hub phases, so a change of
    # the machine's load during the run weighs on both sides of the ratio alike.
    bare_runs = [await bare_phase(sensors, args.bare_s / 2, interval)]

    hub_inline = await hub_phase(sensors, args.hub_inline_s, interval, inline=True)
    hi_path = hub_inline["cpu"] / max(1, sum(hub_inline["reads"].values()))
    print(f"hub over inline buses (no worker threads): {hi_path * 1e6:.1f} us CPU/read")
    m = await hub_phase(sensors, args.duration_s, interval, inline=False)
    wire = None
    if args.wire_s > 0:  # the same hub, every transaction also taking its wire time
        wire = await hub_phase(
            sensors, args.wire_s, interval, inline=False, scl_hz=args.wire_scl_hz
        )
    bare_runs.append(await bare_phase(sensors, args.bare_s / 2, interval))
    # same rates and durations: each half has the same number of reads (to <1 %)
    (b0, e0, r0, _, q0), (b1, e1, r1, _, q1) = bare_runs
    bare, bare_emu, bare_rps, bare_rq = (b0 + b1) / 2, (e0 + e1) / 2, (r0 + r1) / 2, (q0 + q1) / 2
    bare_lag = bare_runs[0][3] + bare_runs[1][3]
    print(
        f"bare (drivers on inline buses, paced, no hub; half before, half after): "
        f"{bare * 1e6:.1f} us CPU/read ({bare_runs[0][0] * 1e6:.1f} / "
        f"{bare_runs[1][0] * 1e6:.1f}; emulator {bare_emu * 1e6:.1f}), {bare_rps:.1f} reads/s, "
        f"loop lag p99 {pct(bare_lag, 99) * 1e3:.3f} ms (loop thread waited "
        f"{bare_rq * 1e3:.2f} ms/s for a CPU)"
    )
    cpu, loop_cpu, emu_cpu, dt = m["cpu"], m["loop_cpu"], m["emu_cpu"], m["dt"]
    reads, samples, lag, status = m["reads"], m["samples"], m["lag"], m["status"]
    total_reads = sum(reads.values())
    path = cpu / max(1, total_reads)
    emu_per_read = emu_cpu / max(1, total_reads)
    ratios = {s.id: reads[s.id] / (s.rate_hz * dt) for s in sensors}
    worst = min(ratios, key=lambda k: ratios[k])
    overruns = sum(st["overruns"] for st in status.values())
    errors = sum(st["read_errors"] + st["timeouts"] + st["frame_errors"] for st in status.values())
    not_ok = [k for k, st in status.items() if st["state"] != "ok"]
    print(
        f"acquisition: {len(sensors)} sensors, {total_rate:.0f} reads/s configured, "
        f"{total_reads / dt:.1f} reads/s achieved over {dt:.1f} s, {samples} samples"
    )
    print(
        f"acquisition path: {path * 1e6:.1f} us CPU/read (all threads; emulator "
        f"{emu_per_read * 1e6:.1f}) vs bare {bare * 1e6:.1f} us -> overhead ratio "
        f"{path / bare:.2f}x (+{(path - bare) * 1e6:.1f} us/read); event-loop thread "
        f"{loop_cpu / max(1, total_reads) * 1e6:.1f} us/read, {cpu / dt:.2f} cores in all"
    )
    print(
        f"rate achieved / configured: min {ratios[worst]:.3f} ({worst}), "
        f"mean {sum(ratios.values()) / len(ratios):.3f}; overruns {overruns}, "
        f"read errors {errors}, not ok: {not_ok or 'none'}"
    )
    print(
        f"loop lag while acquiring: p50 {pct(lag, 50) * 1e3:.3f} ms, "
        f"p99 {pct(lag, 99) * 1e3:.3f} ms, max {max(lag) * 1e3:.3f} ms "
        f"(idle p99 {pct(idle_lag, 99) * 1e3:.3f} ms); loop thread waited "
        f"{m['rq_wait'] / dt * 1e3:.2f} ms/s for a CPU (idle {idle_rq * 1e3:.2f} ms/s)"
    )
    own = m["own_lag"]
    print(
        f"  less the loop thread's run-queue wait (the machine's share): p99 "
        f"{pct(own, 99) * 1e3:.3f} ms, max {max(own) * 1e3:.3f} ms (idle p99 "
        f"{pct(idle_own, 99) * 1e3:.3f} ms)"
    )
    wire_fig: dict[str, Any] = {}
    if wire is not None:
        wl, wdt = wire["lag"], wire["dt"]
        wratios = [wire["reads"][s.id] / (s.rate_hz * wdt) for s in sensors]
        print(
            f"with wire time ({args.wire_scl_hz / 1000:.0f} kHz SCL, slept by the emulated bus "
            f"with the GIL released, as a kernel transfer would be; {args.wire_s:g} s): loop "
            f"lag p50 {pct(wl, 50) * 1e3:.3f} ms, p99 {pct(wl, 99) * 1e3:.3f} ms, max "
            f"{max(wl) * 1e3:.3f} ms; rate achieved min {min(wratios):.3f}; loop thread "
            f"waited {wire['rq_wait'] / wdt * 1e3:.2f} ms/s for a CPU; less that wait: p99 "
            f"{pct(wire['own_lag'], 99) * 1e3:.3f} ms"
        )
        wire_fig = {
            "loop_lag_p50_ms_wire_time": round(pct(wl, 50) * 1e3, 3),
            "loop_lag_p99_ms_wire_time": round(pct(wl, 99) * 1e3, 3),
            "loop_lag_max_ms_wire_time": round(max(wl) * 1e3, 3),
            "loop_lag_own_p99_ms_wire_time": round(pct(wire["own_lag"], 99) * 1e3, 3),
            "rate_achieved_ratio_min_wire_time": round(min(wratios), 4),
            "loop_runqueue_wait_ms_per_s_wire_time": round(wire["rq_wait"] / wdt * 1e3, 3),
            "wire_scl_hz": args.wire_scl_hz,
        }
    return {
        **wire_fig,
        "sensors": len(sensors),
        "duration_s": round(dt, 2),
        "configured_reads_per_s": round(total_rate, 1),
        "achieved_reads_per_s": round(total_reads / dt, 1),
        "samples_total": samples,
        "bare_us_per_read": round(bare * 1e6, 2),
        "bare_emulator_us_per_read": round(bare_emu * 1e6, 2),
        "path_us_per_read": round(path * 1e6, 2),
        "path_emulator_us_per_read": round(emu_per_read * 1e6, 2),
        "overhead_us_per_read": round((path - bare) * 1e6, 2),
        "overhead_ratio": round(path / bare, 3),
        "hub_inline_us_per_read": round(hi_path * 1e6, 2),
        "loop_thread_us_per_read": round(loop_cpu / max(1, total_reads) * 1e6, 2),
        "cpu_cores_used": round(cpu / dt, 3),
        "rate_achieved_ratio_min": round(ratios[worst], 4),
        "rate_achieved_ratio_mean": round(sum(ratios.values()) / len(ratios), 4),
        "overruns_total": overruns,
        "read_errors_total": errors,
        "loop_lag_p50_ms": round(pct(lag, 50) * 1e3, 3),
        "loop_lag_p99_ms": round(pct(lag, 99) * 1e3, 3),
        "loop_lag_max_ms": round(max(lag) * 1e3, 3),
        "loop_lag_own_p99_ms": round(pct(own, 99) * 1e3, 3),
        "loop_lag_own_idle_p99_ms": round(pct(idle_own, 99) * 1e3, 3),
        "loop_lag_idle_p99_ms": round(pct(idle_lag, 99) * 1e3, 3),
        "loop_lag_bare_p99_ms": round(pct(bare_lag, 99) * 1e3, 3),
        "loop_runqueue_wait_ms_per_s": round(m["rq_wait"] / dt * 1e3, 3),
        "loop_runqueue_wait_idle_ms_per_s": round(idle_rq * 1e3, 3),
        "loop_runqueue_wait_bare_ms_per_s": round(bare_rq * 1e3, 3),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--bare-s", type=float, default=20.0)
    ap.add_argument("--hub-inline-s", type=float, default=15.0)
    ap.add_argument("--lag-interval-ms", type=float, default=10.0)
    ap.add_argument(
        "--wire-s",
        type=float,
        default=30.0,
        help="a further hub phase with each transaction's I2C wire time modelled (0: none)",
    )
    ap.add_argument("--wire-scl-hz", type=float, default=400_000.0)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval (default: Python's 5 ms)",
    )
    args = ap.parse_args()
    # state transitions (sensor_ok x 20 per phase) are logged as in the daemon, but the
    # benchmark's output is its figures
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        figures = runner.run(run(args))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
