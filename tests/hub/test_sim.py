"""Simulated mode: the REAL drivers against the emulators, through the hub.

Plausibility is checked against the scenario itself at the time of the sample, so the
assertions fail if a driver, an emulator or the wiring in SimResources is wrong (a swapped
channel, a wrong scale, a stale register).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.emulated.simulated import SimResources
from edgerund.component import CommandError, Peer
from edgerund.config.loader import load_config
from edgerund.config.schema import Config
from edgerund.context import Event, EventBus, TaskScope
from edgerund.hub.component import SensorHub, build
from edgerund.simulation import Simulation
from tests.hub.conftest import make_config, wait_for

SIMULATE_YAML = Path(__file__).resolve().parents[2] / "edgerund" / "data" / "simulate.yaml"
PEER = Peer(pid=1, uid=0, gid=0, privileged=True)


def scenario_at(hub: SensorHub, sim: SimResources, sid: str, channel: str) -> tuple[float, float]:
    """(sample value, sample's scenario time)."""
    s = hub.latest(sid, channel)
    assert s is not None, f"no sample for {sid}.{channel}"
    import time

    t = sim.now_s() - (time.monotonic() - s.t_mono)
    return s.value, t


def sim_hub_for(cfg: Config, scope: TaskScope, bus: EventBus) -> tuple[SensorHub, Simulation]:
    """The hub on the simulated plant, chosen and wired as the daemon's root does."""
    simulation = Simulation(cfg)
    hub = build(cfg, resources=simulation.resources, scope=scope, events=bus, sim=simulation)
    return hub, simulation


@pytest.fixture
async def sim_hub(hub_scope: TaskScope) -> Any:
    hub, simulation = sim_hub_for(load_config(SIMULATE_YAML), hub_scope, EventBus())
    async with hub:
        yield hub, simulation


async def test_every_emulated_part_gives_plausible_values(
    sim_hub: tuple[SensorHub, Simulation],
) -> None:
    hub, simulation = sim_hub
    plant = simulation.plant
    ids = hub.sensor_ids()
    assert len(ids) == 9
    await wait_for(lambda: all(hub.state(s) == "ok" for s in ids), within_s=15.0)
    await asyncio.sleep(1.2)  # every sensor has read at least once more
    sc = simulation.scenario

    # Vibration: gravity on z, ~40 mg of unbalance on x/y; temperature sensor is there too.
    _, vz = hub.window("motor_vib", "accel_z", 200)
    _, vx = hub.window("motor_vib", "accel_x", 200)
    assert 0.9 < float(np.mean(vz)) < 1.1
    assert 0.01 < float(np.std(vx)) < 0.1
    # Cabinet climate from two different parts agrees with the scenario and each other.
    chans = {c for s, c, _ in hub.channels() if s == "cabinet"}
    t_ch = next(c for c in chans if "temp" in c)
    p_ch = next(c for c in chans if "press" in c)
    h_ch = next(c for c in chans if "hum" in c)
    v, t = scenario_at(hub, plant, "cabinet", t_ch)
    assert abs(v - float(sc.cabinet_temp_c(t)[0])) < 0.5
    v, t = scenario_at(hub, plant, "cabinet", p_ch)
    assert abs(v - float(sc.pressure_pa(t)[0])) < 50.0
    v, t = scenario_at(hub, plant, "cabinet", h_ch)
    assert abs(v - float(sc.humidity_pct(t)[0])) < 2.0
    sht = {c for s, c, _ in hub.channels() if s == "cabinet_sht"}
    v, t = scenario_at(hub, plant, "cabinet_sht", next(c for c in sht if "temp" in c))
    assert abs(v - float(sc.cabinet_temp_c(t)[0])) < 0.5
    # Battery through the INA219, motor current through the ADS1115 clamp.
    bat = {c: u for s, c, u in hub.channels() if s == "battery"}
    bus_v = next(c for c, u in bat.items() if u == "V" and "bus" in c)
    cur = next(c for c, u in bat.items() if u == "A")
    v, t = scenario_at(hub, plant, "battery", bus_v)
    assert abs(v - float(sc.battery_v(t)[0])) < 0.05
    v, t = scenario_at(hub, plant, "battery", cur)
    assert abs(v - float(sc.battery_a(t)[0])) < 0.2
    # The motor current's noise (0.03 A) is drawn per instant and the conversion's instant
    # is not the sample's timestamp, so the two values differ by two draws (sigma 0.042 A):
    # 0.2 A is under 1e-5 of false alarms, and a 10 % gain error is 0.3 A or more.
    v, t = scenario_at(hub, plant, "motor_current", "motor_a")
    assert abs(v - float(sc.motor_current_a(t)[0])) < 0.2
    # Serial: GPS near the scenario's track, the meter's current is the motor current,
    # the BMS pack voltage is the battery voltage, the drive's rpm is the shaft rate.
    gps = {c for s, c, _ in hub.channels() if s == "gps"}
    lat_ch = next(c for c in gps if "lat" in c)
    v, t = scenario_at(hub, plant, "gps", lat_ch)
    assert abs(v - sc.gps(t).lat_deg) < 1e-3
    v, t = scenario_at(hub, plant, "power_meter", "current_a")
    assert abs(v - float(sc.motor_current_a(t)[0])) < 0.2
    v, _ = scenario_at(hub, plant, "power_meter", "frequency_hz")
    assert 49.9 < v < 50.1
    v, t = scenario_at(hub, plant, "bms", "pack_v")
    assert abs(v - float(sc.battery_v(t)[0])) < 0.05
    v, t = scenario_at(hub, plant, "drive", "rpm")
    assert abs(v - float(sc.shaft_hz(t)[0]) * 60.0) < 5.0
    for row in await hub.commands()["sensors"].handler({}, PEER):
        assert row["state"] == "ok" and row["value"], row


async def test_i2c_scan_and_serial_sniff(sim_hub: tuple[SensorHub, Simulation]) -> None:
    hub, _ = sim_hub
    await wait_for(lambda: hub.state("cabinet") == "ok" and hub.state("gps") == "ok", within_s=10.0)
    scan = hub.commands()["i2c-scan"].handler
    rows = await scan({"bus": 1}, PEER)
    by = {r["address"]: r for r in rows}
    # every emulated part is on the bus, all claimed by configured sensors here
    assert set(by) == {"0x40", "0x44", "0x48", "0x68", "0x76"}
    assert by["0x76"]["status"] == "in use" and by["0x76"]["sensor"] == "cabinet"
    assert by["0x76"]["state"] == "ok"
    with pytest.raises(CommandError) as ei:
        await scan({"bus": 7}, PEER)
    assert ei.value.code == "device_error" and "i2c-7" in ei.value.message
    with pytest.raises(CommandError):
        await scan({"bus": "x"}, PEER)

    sniff = hub.commands()["serial-sniff"].handler
    frames = await sniff({"port": "sim://gps", "n": 3}, PEER)
    assert 1 <= len(frames) <= 3
    assert all(f["text"].startswith("$G") and f["hex"].startswith("24 47") for f in frames)
    # a sensor id finds its port too; n limits the answer
    await asyncio.sleep(1.1)  # the meter is polled at 2 Hz: at least 2 responses by now
    meter = await sniff({"port": "power_meter", "n": 2}, PEER)
    assert len(meter) == 2
    assert all(f["hex"].startswith("01 03") for f in meter)  # unit 1, read holding regs
    with pytest.raises(CommandError) as ei:
        await sniff({"port": "/dev/ttyNOPE", "n": 2}, PEER)
    assert ei.value.code == "not_found" and "sim://gps" in ei.value.message


def _sim_cfg(sensors: list[dict[str, Any]]) -> Config:
    return make_config({"simulation": {"enabled": True, "seed": 7}, "sensors": sensors})


async def _start(
    cfg: Config, scope: TaskScope
) -> tuple[SensorHub, SimResources, Simulation, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    hub, simulation = sim_hub_for(cfg, scope, bus)
    await hub.__aenter__()
    return hub, simulation.plant, simulation, events


async def test_scan_finds_unclaimed_parts_and_not_unplugged_ones(hub_scope: TaskScope) -> None:
    cfg = _sim_cfg([{"id": "cab", "driver": "bme280", "bus": 1, "address": 0x76, "rate_hz": 5}])
    hub, sim, _, _ = await _start(cfg, hub_scope)
    try:
        await wait_for(lambda: hub.state("cab") == "ok", within_s=10.0)
        sim.devices["ina219"].unplug()
        rows = await hub.commands()["i2c-scan"].handler({"bus": 1}, PEER)
        by = {r["address"]: r["status"] for r in rows}
        assert by == {"0x44": "responds", "0x48": "responds", "0x68": "responds", "0x76": "in use"}
        assert hub.state("cab") == "ok"  # scanning did not disturb the sensor
    finally:
        await hub.__aexit__(None, None, None)


async def test_i2c_nack_crc_and_dropout_through_hub(hub_scope: TaskScope) -> None:
    cfg = _sim_cfg(
        [
            {
                "id": "sht",
                "driver": "sht",
                "bus": 1,
                "address": 0x44,
                "rate_hz": 10,
                "retries": 1,
                "fail_after": 2,
                "reprobe_s": 0.3,
            },
            {"id": "vib", "driver": "mpu6050", "bus": 1, "address": 0x68, "rate_hz": 100},
        ]
    )
    hub, sim, simulation, events = await _start(cfg, hub_scope)
    try:
        await wait_for(lambda: hub.state("sht") == "ok" and hub.state("vib") == "ok", within_s=10.0)
        dev = sim.devices["sht"]
        # bad CRC: counted, the read retried, the sensor stays ok
        n0 = hub.sensor_status("sht")["frame_errors"]
        dev.inject_bit_flips(1, byte_index=1, bit=3)
        await wait_for(lambda: hub.sensor_status("sht")["frame_errors"] > n0)
        # one NACK: retried immediately, nothing visible but the counter
        e0 = hub.sensor_status("sht")["read_errors"]
        dev.inject_nack(1)
        await wait_for(lambda: hub.sensor_status("sht")["read_errors"] > e0)
        await asyncio.sleep(0.3)
        assert hub.state("sht") == "ok"
        # a dropout via sim-inject (by sensor id): failed, then back by itself
        res = await hub.commands()["sim-inject"].handler(
            {"kind": "dropout", "duration_s": 1.5, "sensor": "sht"}, PEER
        )
        assert res["sensor"] == "sht" and res["kind"] == "dropout"
        await wait_for(lambda: hub.state("sht") == "failed", within_s=5.0)
        assert hub.state("vib") == "ok"  # the other part on the same bus is unaffected
        await wait_for(lambda: hub.state("sht") == "ok", within_s=10.0)
        states = [
            e.fields["state"] for e in events if e.kind == "sensor.state" and e.source == "sht"
        ]
        assert states == ["ok", "failed", "ok"]
        with pytest.raises(CommandError) as ei:
            await hub.commands()["sim-inject"].handler({"kind": "meteor"}, PEER)
        assert ei.value.code == "bad_args"
        # an anomaly that changes a signal: overheat raises the cabinet temperature
        sc = simulation.scenario
        t = sim.now_s()
        before = float(sc.cabinet_temp_c(t + 5.0)[0])
        await hub.commands()["sim-inject"].handler(
            {"kind": "overheat", "duration_s": 60, "severity": 1.0}, PEER
        )
        assert float(sc.cabinet_temp_c(t + 5.0)[0]) > before
    finally:
        await hub.__aexit__(None, None, None)


async def test_sim_inject_refused_when_not_simulating(fake_hub: Any) -> None:
    from tests.hub.conftest import fake

    h = await fake_hub([fake("a")])
    with pytest.raises(CommandError) as ei:
        await h.hub.commands()["sim-inject"].handler({"kind": "overheat"}, PEER)
    assert ei.value.code == "not_simulating"
    assert h.hub.commands()["sim-inject"].mutating
    assert h.hub._sim is None


async def test_serial_dropout_goes_silent_then_recovers(hub_scope: TaskScope) -> None:
    cfg = _sim_cfg(
        [
            {
                "id": "gps",
                "driver": "nmea",
                "port": "sim://gps",
                "rate_hz": 1,
                "read_timeout_ms": 1000,
                "fail_after": 1,
                "reprobe_s": 0.5,
            },
        ]
    )
    hub, sim, _, events = await _start(cfg, hub_scope)
    try:
        await wait_for(lambda: hub.state("gps") == "ok", within_s=10.0)
        await hub.commands()["sim-inject"].handler(
            {"kind": "dropout", "duration_s": 3.0, "sensor": "gps"}, PEER
        )
        await wait_for(lambda: hub.state("gps") == "failed", within_s=8.0)
        await wait_for(lambda: hub.state("gps") == "ok", within_s=10.0)
        states = [e.fields["state"] for e in events if e.kind == "sensor.state"]
        assert states == ["ok", "failed", "ok"]
        assert sim.serial_devices["gps"].counters["frames_dropped"] >= 1
    finally:
        await hub.__aexit__(None, None, None)


async def test_mpu6050_fifo_through_the_hub_keeps_every_sample_at_the_odr(
    hub_scope: TaskScope,
) -> None:
    """`fifo: true`: the hub polls at 20 Hz and still holds every sample the emulated part
    took at its 200 Hz output data rate, each stamped k / ODR before the newest record of
    its read (register reads would give 20 samples/s)."""
    cfg = _sim_cfg(
        [
            {
                "id": "vib",
                "driver": "mpu6050",
                "bus": 1,
                "address": 0x68,
                "rate_hz": 20,
                "sample_rate_hz": 200,
                "fifo": True,
            }
        ]
    )
    hub, _, _, _ = await _start(cfg, hub_scope)
    try:
        await wait_for(lambda: hub.state("vib") == "ok", within_s=10.0)
        await asyncio.sleep(0.3)  # the first poll enabled the FIFO
        n0 = len(hub.window("vib", "accel_x", 4096)[0])
        await asyncio.sleep(1.5)
        t, v = hub.window("vib", "accel_x", 4096)
        t = t[n0:]
        rate = (len(t) - 1) / float(t[-1] - t[0])
        assert 170 < rate < 230, rate  # the ODR, not the 20 Hz poll rate
        dt = np.diff(t)
        assert abs(float(np.median(dt)) - 0.005) < 0.0005, np.median(dt)
        assert (dt > 0).all()
        assert np.isfinite(v).all()
        assert hub.sensor_status("vib")["driver_counters"].get("fifo_overflows", 0) == 0
    finally:
        await hub.__aexit__(None, None, None)
