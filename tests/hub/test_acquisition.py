"""Acquisition scheduling and fault handling, with a test driver of our own (fakes.py).

Timing assertions are deliberately loose (2 shared cores, many parallel test runs): each
compares against what a wrong implementation would produce, with a wide margin.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np
import structlog

from tests.hub.conftest import fake, fake_stream, wait_for


async def test_absolute_deadlines_do_not_drift(fake_hub: Any) -> None:
    # A read that takes 6 ms at 50 Hz: `sleep(period)` after the work would run at
    # 1 / 26 ms = 38 Hz (77% of the rate); deadlines keep 50 Hz.
    h = await fake_hub([fake("a", rate_hz=50.0, work_ms=6.0)])
    await asyncio.sleep(2.0)
    d = h.driver("a")
    starts = np.array(d.read_starts)
    assert len(starts) >= 60
    periods = np.diff(starts)
    assert abs(statistics.median(periods.tolist()) - 0.020) < 0.003
    # No cumulative drift: against the grid from the first read, lateness stays bounded.
    overruns = h.hub._rts["a"].counters.overruns
    grid = starts[0] + 0.020 * np.arange(len(starts))
    if overruns == 0:
        assert float(starts[-1] - grid[-1]) < 0.020
    ratio = (len(starts) - 1) / (starts[-1] - starts[0]) / 50.0
    assert ratio > 0.9, f"achieved {ratio:.2f} of the configured rate"
    # the ring holds what was read, newest last
    t, v = h.hub.window("a", "x", 10)
    assert len(v) == 10 and np.all(np.diff(v) == 1.0) and np.all(np.diff(t) > 0)
    latest = h.hub.latest("a", "y")
    assert latest is not None and latest.value == -v[-1] and latest.unit == "v"


async def test_fail_reprobe_recover_logged_once(fake_hub: Any) -> None:
    with structlog.testing.capture_logs() as logs:
        h = await fake_hub([fake("s", rate_hz=50.0, retries=1, fail_after=3, reprobe_s=0.2)])
        d = h.driver("s")
        await wait_for(lambda: h.hub.state("s") == "ok")
        d.fault = "device"
        await wait_for(lambda: h.hub.state("s") == "failed")
        d.open_fault = "device"
        opens_before = d.opens
        await asyncio.sleep(1.2)
        reprobes = d.opens - opens_before
        # re-probed about every 0.2 s (each with 1 + retries attempts), not hammered at 50 Hz
        assert 2 <= reprobes <= 16, reprobes
        d.open_fault = None
        await asyncio.sleep(0.5)  # opens now work but reads still fail: stays failed
        assert h.hub.state("s") == "failed"
        d.fault = None
        await wait_for(lambda: h.hub.state("s") == "ok")
        await asyncio.sleep(0.1)
    assert h.states("s") == ["ok", "failed", "ok"]
    evs = [e["event"] for e in logs if e.get("sensor") == "s"]
    assert evs.count("sensor_failed") == 1
    assert evs.count("sensor_recovered") == 1
    st = h.hub.sensor_status("s")
    assert st["read_errors"] >= 6 and st["reprobes"] >= 2
    assert "NACK" in (st["last_error"] or "")


async def test_frame_errors_counted_and_skipped(fake_hub: Any) -> None:
    h = await fake_hub([fake("c", rate_hz=100.0, retries=0, fail_after=1000)])
    d = h.driver("c")
    await wait_for(lambda: h.hub.state("c") == "ok")
    d.fault = "frame"
    await asyncio.sleep(0.3)
    n_bad = h.hub._rts["c"].counters.frame_errors
    d.fault = None
    before = d.n
    await wait_for(lambda: d.n >= before + 5)
    assert n_bad >= 5
    assert h.hub.state("c") == "ok"
    assert h.hub.sensor_status("c")["frame_errors"] == n_bad


async def test_driver_bug_is_survived(fake_hub: Any) -> None:
    with structlog.testing.capture_logs() as logs:
        h = await fake_hub([fake("b", rate_hz=100.0, retries=0, fail_after=2, reprobe_s=0.1)])
        d = h.driver("b")
        d.fault = "bug"
        await wait_for(lambda: h.hub.state("b") == "failed")
        await asyncio.sleep(0.3)
        d.fault = None
        await wait_for(lambda: h.hub.state("b") == "ok")
    assert sum(1 for e in logs if e["event"] == "driver_exception") == 1
    assert h.hub._rts["b"].counters.driver_bugs >= 2


async def test_one_failing_sensor_does_not_delay_others(fake_hub: Any) -> None:
    # "hang" reads time out after 150 ms, with retries; "nack" errors at once. Neither
    # may slow the healthy 100 Hz sensor down.
    h = await fake_hub(
        [
            fake("healthy", rate_hz=100.0, work_ms=1.0),
            fake("hang", rate_hz=100.0, read_timeout_ms=150, retries=2, fail_after=1000),
            fake("nack", rate_hz=200.0, retries=3, fail_after=1000, reprobe_s=0.05),
        ]
    )
    await wait_for(lambda: h.hub.state("healthy") == "ok")
    h.driver("hang").fault = "hang"
    h.driver("nack").fault = "device"
    await asyncio.sleep(0.3)
    d = h.driver("healthy")
    i0 = len(d.read_starts)
    await asyncio.sleep(2.0)
    starts = np.array(d.read_starts[i0:])
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert rate > 90.0, f"healthy sensor slowed to {rate:.1f} Hz"
    gaps = np.diff(starts)
    # a blocking 150 ms timeout anywhere on the loop would show up as a gap >= 150 ms
    assert float(gaps.max()) < 0.14, float(gaps.max())
    assert h.hub._rts["hang"].counters.timeouts >= 3
    assert h.hub.state("healthy") == "ok"
    st = {s["id"]: s for s in h.hub.status()["sensors"]}
    assert st["healthy"]["rate_achieved_hz"] > 80.0
    assert st["hang"]["rate_achieved_hz"] < 10.0


async def test_absent_at_start_then_plugged(fake_hub: Any) -> None:
    from tests.hub import fakes

    orig = fakes.FakePolled.open

    async def absent_open(self: Any) -> None:
        if not getattr(self, "plugged", False):
            self.opens += 1
            raise fakes.DeviceError("fake: chip id 0x00, expected 0x60")
        await orig(self)

    fakes.FakePolled.open = absent_open  # type: ignore[method-assign]
    try:
        h = await fake_hub([fake("late", rate_hz=20.0, reprobe_s=0.1)])
        await wait_for(lambda: h.hub.state("late") == "failed")
        assert h.hub.latest("late", "x") is None
        h.driver("late").plugged = True
        await wait_for(lambda: h.hub.state("late") == "ok")
    finally:
        fakes.FakePolled.open = orig  # type: ignore[method-assign]
    assert h.states("late") == ["failed", "ok"]


async def test_stream_frame_error_and_loss(fake_hub: Any) -> None:
    from drivers.errors import DeviceError, FrameError

    h = await fake_hub(
        [fake_stream("g", rate_hz=10.0, fail_after=2, reprobe_s=0.1, read_timeout_ms=2000)]
    )
    d = h.driver("g")
    for i in range(3):
        d.queue.put_nowait(i)
    await wait_for(lambda: h.hub.state("g") == "ok")
    d.queue.put_nowait(FrameError("checksum", "bad *hh"))
    d.queue.put_nowait(7)
    await wait_for(lambda: (h.hub.latest("g", "x") or 0) and h.hub.latest("g", "x").value == 7)
    assert h.hub._rts["g"].counters.frame_errors == 1
    assert h.hub.state("g") == "ok"
    # the adapter is pulled: read error, then opens fail -> failed once
    opens = d.opens
    d.open_fault = "gone"
    d.queue.put_nowait(DeviceError("serial port x: read failed: EIO"))
    await wait_for(lambda: h.hub.state("g") == "failed")
    await asyncio.sleep(0.4)
    assert d.opens - opens >= 2  # re-probed
    d.open_fault = None
    d.queue.put_nowait(8)
    await wait_for(lambda: h.hub.state("g") == "ok")
    assert h.states("g") == ["ok", "failed", "ok"]


async def test_subscribers_fan_out_and_bad_one_is_isolated(fake_hub: Any) -> None:
    h = await fake_hub([fake("a", rate_hz=100.0)])
    got: list[Any] = []

    def bad(s: Any) -> None:
        raise RuntimeError("subscriber bug")

    unsub_bad = h.hub.subscribe(bad)
    unsub = h.hub.subscribe(got.append)
    await wait_for(lambda: len(got) >= 20)
    unsub()
    unsub_bad()
    n = len(got)
    await asyncio.sleep(0.1)
    assert len(got) == n
    assert {s.channel for s in got} == {"x", "y"}
    assert all(s.sensor_id == "a" and s.t_wall > 1e9 for s in got)
    assert h.hub._sub_errors >= 20
    assert h.hub.channels() == [("a", "x", "u"), ("a", "y", "v")]


async def test_sensors_command_and_disabled(fake_hub: Any) -> None:
    from edgerund.component import Peer

    h = await fake_hub([fake("on", rate_hz=20.0), fake("off", enabled=False)])
    await wait_for(lambda: h.hub.state("on") == "ok")
    rows = await h.hub.commands()["sensors"].handler({}, Peer(1, 0, 0))
    by = {r["id"]: r for r in rows}
    assert by["off"]["state"] == "disabled"
    assert by["on"]["state"] == "ok" and by["on"]["value"].endswith("v")
    assert h.driver("off").opens == 0


async def test_reload_changes_rate_live_and_flags_the_rest(fake_hub: Any) -> None:
    from types import SimpleNamespace

    import pytest

    from edgerund.errors import ConfigError

    h = await fake_hub([fake("a", rate_hz=20.0), fake("b", rate_hz=20.0)])
    await wait_for(lambda: h.hub.state("a") == "ok")
    d = h.driver("a")
    # a's rate goes up live; b's driver key changes: restart needed, named
    new = SimpleNamespace(sensors=[fake("a", rate_hz=100.0), fake("b", rate_hz=20.0, work_ms=1.0)])
    with pytest.raises(ConfigError, match="restart: b"):
        h.hub.reload(new)
    await asyncio.sleep(0.2)
    i0 = len(d.read_starts)
    await asyncio.sleep(1.0)
    rate = len(d.read_starts) - i0
    assert rate > 60, rate  # ~100 Hz now, was 20
    assert h.hub._rts["b"].config.work_ms == 0.0


async def test_samples_are_the_frozen_dataclass_with_every_field(fake_hub: Any) -> None:
    # The hot path fills Sample's slots directly: the objects must be indistinguishable
    # from ones built by the constructor (equal, hashable, frozen).
    import dataclasses

    from drivers.base import Quality, Sample

    h = await fake_hub([fake("a", rate_hz=100.0)])
    got: list[Sample] = []
    unsub = h.hub.subscribe(got.append)
    await wait_for(lambda: len(got) >= 4)
    unsub()
    s = got[-1]
    rebuilt = Sample(s.sensor_id, s.channel, s.t_mono, s.t_wall, s.value, s.unit, s.quality)
    assert s == rebuilt and hash(s) == hash(rebuilt)
    assert (s.sensor_id, s.unit, s.quality) == ("a", "u" if s.channel == "x" else "v", Quality.GOOD)
    try:
        s.value = 0.0  # type: ignore[misc]
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("Sample must stay frozen")
    # both channels of one read carry the same instant
    pair = [x for x in got if x.t_mono == got[-1].t_mono]
    assert {x.channel for x in pair} == {"x", "y"}


async def test_sensor_grids_are_spread_not_aligned(fake_hub: Any) -> None:
    # Sensors started together at harmonic rates must not all fall due at one instant:
    # each grid is offset by a stable fraction of half its period (of 0.5 s at most).
    ids = [f"s{i}" for i in range(8)]
    h = await fake_hub([fake(i, rate_hz=10.0) for i in ids])
    phases = [h.hub._acq[i].phase for i in ids]
    assert all(0.0 <= p < 1.0 for p in phases) and len({round(p, 3) for p in phases}) == 8
    assert max(phases) - min(phases) > 0.3  # spread over the period, not bunched
    await wait_for(lambda: all(len(h.driver(i).read_starts) >= 3 for i in ids))
    offsets = sorted(float(np.mean(np.asarray(h.driver(i).read_starts[1:3]) % 0.1)) for i in ids)
    # the reads themselves are spread in time (offsets span >= 0.3 of half the period)
    assert offsets[-1] - offsets[0] > 0.01


async def test_samples_carry_the_instant_the_transport_noted(fake_hub: Any) -> None:
    """The driver contract's acquisition time (drivers/base.py): the hub stamps a read's
    samples with the first transaction's start that the transport noted, not with the
    completion 30 ms later, and t_wall is the same instant on the wall clock."""
    import time

    from drivers.base import Sample

    h = await fake_hub([fake("a", rate_hz=20.0, work_ms=30.0, transport_notes=True)])
    got: list[tuple[Sample, float, float]] = []
    unsub = h.hub.subscribe(lambda s: got.append((s, time.monotonic(), time.time())))
    await wait_for(lambda: len(got) >= 6)
    unsub()
    noted = set(h.driver("a").noted)
    for s, done_mono, done_wall in got:
        assert s.t_mono in noted  # exactly the first note of its read
        assert done_mono - s.t_mono >= 0.025  # a completion stamp would be ~0
        # the same instant on both clocks (a completion-time t_wall would be 30 ms off)
        assert abs((done_wall - s.t_wall) - (done_mono - s.t_mono)) < 0.005


async def test_a_note_does_not_outlive_its_read(fake_hub: Any) -> None:
    """A stream frame nobody noted is stamped on arrival, even if the driver wrote to the
    device (and so noted a time) when it opened: the hub begins each frame afresh."""
    import time

    from drivers.base import Sample

    h = await fake_hub([fake_stream("s", command_at_open=True)])
    await wait_for(lambda: h.driver("s").opens == 1)
    await asyncio.sleep(0.2)
    got: list[Sample] = []
    h.hub.subscribe(got.append)
    before = time.monotonic()
    h.driver("s").queue.put_nowait(1.0)
    await wait_for(lambda: len(got) == 1)
    assert got[0].t_mono >= before  # not the open's note, 200 ms earlier


async def test_phase_lock_reads_each_deadline_when_the_loop_asks(fake_hub: Any) -> None:
    """A loop's `fresh` input locks its polled sensor to the loop's deadline grid: the read
    of each deadline is made when the loop asks (`request_read`), its future resolving
    once a sample taken after the request is stored; the read in between (200 Hz under a
    100 Hz loop) stays on the grid; a deadline nobody asked for is still read, half a slot
    late (counted), so a stalled loop never stops the sensor."""
    h = await fake_hub([fake("p", rate_hz=200.0, work_ms=1.0, transport_notes=True)])
    await wait_for(lambda: h.hub.state("p") == "ok")
    assert h.hub.request_read("p") is None  # not locked: nothing to wait for
    period = 0.010
    t0 = time.monotonic() + 0.05
    assert h.hub.lock_phase("p", period, t0)
    await asyncio.sleep(0.1)
    acq = h.hub._acq["p"]
    drv = h.driver("p")
    used: list[tuple[float, float]] = []  # (request time, newest sample after it)
    for _ in range(40):
        before = time.monotonic()
        fut = h.hub.request_read("p")
        assert fut is not None
        assert await asyncio.wait_for(fut, 1.0) is True
        t, _ = h.hub.window("p", "x", 1)
        used.append((before, float(t[-1])))
        await asyncio.sleep(period)
    # every request got a sample of its own read: taken after the request (not a grid read
    # before it, at most one 5 ms slot older), and promptly (generous: a loaded machine)
    assert all(req <= t_s < req + 0.1 for req, t_s in used), used
    assert acq.lock_counters.requested == 40
    # the reads in between ran on the grid: about two reads per loop period overall
    n0, s0 = drv.n, time.monotonic()
    await asyncio.sleep(1.0)  # no requests now: deadlines are read anyway, half a slot late
    rate = (drv.n - n0) / (time.monotonic() - s0)
    assert 120 < rate < 260, rate
    assert acq.lock_counters.unrequested >= 50
    st = h.hub.sensor_status("p")["phase_lock"]
    assert st["read_period_ms"] == 5.0 and st["reads_per_tick"] == 2
    # a requested read that fails says so (False), it does not leave the loop waiting
    drv.fault = "device"
    fut = h.hub.request_read("p")
    assert fut is not None
    assert await asyncio.wait_for(fut, 1.0) is False
    # a sensor that is not "ok" gets no request (its loop would only wait for nothing)
    await wait_for(lambda: h.hub.state("p") != "ok", within_s=10.0)
    assert h.hub.request_read("p") is None
