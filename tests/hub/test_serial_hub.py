"""Serial sensors through the hub over a kernel pty: unplug/replug, bad frames, sniffing.

The GPS is the real NMEA driver on the real AsyncSerialPort (HardwareResources), the
device an emulator writing into a pty behind a symlink, as /dev/serial/by-id is on a
gateway. Unplugging closes the pty and removes the link (reads fail with EIO, a reopen
finds no node); replugging makes a new pty behind the same link.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from drivers.emulated.nmea_gps import NmeaGpsEmulator
from drivers.emulated.scenario import Scenario
from edgerund.component import Peer
from edgerund.context import Event, EventBus, TaskScope
from edgerund.hub.component import SensorHub
from edgerund.hub.resources import HardwareResources
from tests.hub.conftest import make_config, wait_for

PEER = Peer(pid=1, uid=0, gid=0, privileged=True)


async def test_pty_unplug_replug_and_bad_frames(tmp_path: Path, hub_scope: TaskScope) -> None:
    sc = Scenario(seed=3)
    link = tmp_path / "ttyGPS0"
    emu = NmeaGpsEmulator(link, fix=sc.gps, rate_hz=10.0)
    await emu.start()
    cfg = make_config(
        {
            "sensors": [
                {
                    "id": "gps",
                    "driver": "nmea",
                    "port": str(link),
                    "rate_hz": 10,
                    "read_timeout_ms": 500,
                    "fail_after": 2,
                    "reprobe_s": 0.2,
                }
            ]
        }
    )
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    other_ticks: list[float] = []

    async def other_loop() -> None:  # stands in for a control loop on the same event loop
        loop = asyncio.get_running_loop()
        while True:
            other_ticks.append(loop.time())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(other_loop())
    with structlog.testing.capture_logs() as logs:
        hub = SensorHub(list(cfg.sensors), HardwareResources(), scope=hub_scope, events=bus)
        await hub.__aenter__()
        try:
            await wait_for(lambda: hub.state("gps") == "ok", within_s=5.0)
            # corrupted sentences are counted by the driver and skipped
            emu.inject("bit_flip", 3)
            await wait_for(lambda: hub.sensor_status("gps")["frame_errors"] >= 3, within_s=5.0)
            assert hub.state("gps") == "ok"
            emu.inject("garbage", 2)
            n = hub._rts["gps"].counters.reads
            await wait_for(lambda: hub._rts["gps"].counters.reads > n + 5, within_s=5.0)
            # pull the adapter
            emu.unplug()
            await wait_for(lambda: hub.state("gps") == "failed", within_s=5.0)
            assert not link.exists()
            await asyncio.sleep(1.0)  # several failed re-probes: none logged
            ticks_during = len(other_ticks)
            emu.replug()
            await wait_for(lambda: hub.state("gps") == "ok", within_s=5.0)
            lat = next(c for s, c, _ in hub.channels() if s == "gps" and "lat" in c)
            s = hub.latest("gps", lat)
            assert s is not None and abs(s.value - sc.gps(emu.now()).lat_deg) < 1e-3
            frames = await hub.commands()["serial-sniff"].handler({"port": str(link), "n": 5}, PEER)
            assert len(frames) == 5 and all(f["text"].startswith("$GP") for f in frames[-2:])
        finally:
            await hub.__aexit__(None, None, None)
            ticker.cancel()
            await emu.stop()
    st = [e.fields["state"] for e in events if e.kind == "sensor.state"]
    assert st == ["ok", "failed", "ok"]
    names = [e["event"] for e in logs if e.get("sensor") == "gps"]
    assert names.count("sensor_failed") == 1 and names.count("sensor_recovered") == 1
    assert ticks_during > 50  # the other loop kept running while the port was gone


async def test_missing_port_at_start_is_failed_not_fatal(
    tmp_path: Path, hub_scope: TaskScope
) -> None:
    cfg = make_config(
        {
            "sensors": [
                {"id": "gps", "driver": "nmea", "port": str(tmp_path / "ttyNONE"), "reprobe_s": 0.2}
            ]
        }
    )
    hub = SensorHub(list(cfg.sensors), HardwareResources(), scope=hub_scope)
    emu: NmeaGpsEmulator | None = None
    await hub.__aenter__()
    try:
        await wait_for(lambda: hub.state("gps") == "failed", within_s=5.0)
        st = hub.sensor_status("gps")
        assert "does not exist" in (st["last_error"] or "")
        # the adapter appears later: picked up at the next re-probe
        emu = NmeaGpsEmulator(tmp_path / "ttyNONE", fix=Scenario().gps, rate_hz=5.0)
        await emu.start()
        await wait_for(lambda: hub.state("gps") == "ok", within_s=5.0)
    finally:
        await hub.__aexit__(None, None, None)
        if emu is not None:
            await emu.stop()
