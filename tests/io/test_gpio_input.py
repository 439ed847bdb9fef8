"""Digital inputs: the pure debounce / count / frequency logic, and the sensor over its
LineSource port.

No kernel GPIO path can be exercised in this sandbox (no /dev/gpiochip*, no gpio-sim
module, no configfs, no `gpiod` binding installed), so `GpiodLineSource` is untested here;
`PipeLine` below speaks the same port (a readable fd, timestamped edges with sequence
numbers) so the event-loop plumbing (add_reader, draining, lost-event accounting) runs
for real.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec
import pytest

from drivers.edges import EdgeTracker
from drivers.errors import DeviceError
from drivers.gpio_input import GpioInput, GpioInputConfig
from drivers.registry import sensor_drivers
from tests.hub.conftest import wait_for
from tests.i2c.helpers import cfg


def test_no_debounce_counts_every_edge() -> None:
    tr = EdgeTracker(level=False, count_edge="rising")
    for i in range(5):
        tr.feed(i * 1.0, True)
        tr.feed(i * 1.0 + 0.5, False)
    assert tr.count == 5 and tr.accepted == 10 and not tr.level


def test_bounces_settle_to_one_edge_at_the_first_instant() -> None:
    tr = EdgeTracker(level=False, debounce_s=0.010, count_edge="rising")
    # a contact closing at t=1.000 with 2 ms of bounce
    for k, t in enumerate((1.000, 1.0005, 1.001, 1.0015, 1.002)):
        tr.feed(t, k % 2 == 0)
    assert tr.count == 0  # not yet stable
    tr.settle(1.013)
    assert tr.count == 1 and tr.level and tr.rejected == 4
    # a 3 ms spike back to open is no edge at all
    tr.feed(1.5, False)
    tr.feed(1.503, True)
    tr.settle(2.0)
    assert tr.count == 1 and tr.level
    # opening (bouncing), then stable
    tr.feed(2.0, False)
    tr.feed(2.001, True)
    tr.feed(2.002, False)
    tr.feed(2.5, True)  # next edge long after: the pending "open" was accepted at 2.002
    assert tr.accepted == 2 and tr.count == 1  # rising edge at 2.5 is pending
    tr.settle(2.6)
    assert tr.count == 2
    # dated by the first edge of the burst that settled, not by a spike before it
    spiky = EdgeTracker(level=False, debounce_s=0.010)
    spiky.feed(5.0, True)
    spiky.feed(5.002, False)  # spike
    for k, t in enumerate((6.0, 6.001, 6.002)):
        spiky.feed(t, k % 2 == 0)
    spiky.settle(7.0)
    assert spiky.count == 1 and list(spiky._times) == [6.0]


def test_counting_kinds() -> None:
    for kind, want in (("rising", 3), ("falling", 3), ("both", 6)):
        tr = EdgeTracker(level=False, count_edge=kind)  # type: ignore[arg-type]
        for i in range(3):
            tr.feed(2 * i, True)
            tr.feed(2 * i + 1, False)
        assert tr.count == want, kind


def test_frequency_from_periods_and_decay() -> None:
    tr = EdgeTracker(level=False, window_s=5.0)
    t = 0.0
    while t < 10.0:  # 4 Hz square wave
        tr.feed(t, True)
        tr.feed(t + 0.125, False)
        t += 0.25
    assert tr.frequency(10.0) == pytest.approx(4.0)
    # the meter stops: the estimate decays instead of holding 4 Hz
    assert tr.frequency(11.0) == pytest.approx(1 / 1.25)
    assert tr.frequency(16.0) == 0.0  # no edges left in the window
    both = EdgeTracker(level=False, count_edge="both")
    for i in range(21):
        both.feed(i * 0.05, i % 2 == 0)  # 10 Hz square wave: 20 edges per second
    assert both.frequency(1.0) == pytest.approx(10.0)


def test_config() -> None:
    assert sensor_drivers()["gpio_input"].config_type is GpioInputConfig
    c = cfg(GpioInputConfig, line=17, per_pulse=2.25, pulse_unit="mL")
    assert c.chip_path() == "/dev/gpiochip0"
    with pytest.raises(msgspec.ValidationError, match="go together"):
        cfg(GpioInputConfig, line=17, per_pulse=2.25)
    with pytest.raises(msgspec.ValidationError):
        cfg(GpioInputConfig, line=-1)


class PipeLine:
    """A LineSource over a pipe: edges queued by the test, fd readable while queued."""

    def __init__(self, level: bool = False) -> None:
        self.level0 = level
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.queue: list[tuple[float, bool, int]] = []
        self.seq = 0
        self.closed = False
        self.fail: OSError | None = None

    def open(self) -> bool:
        return self.level0

    def fileno(self) -> int:
        return self.r

    def edge(self, t: float, level: bool, skip: int = 0) -> None:
        self.seq += 1 + skip
        self.queue.append((t, level, self.seq))
        os.write(self.w, b"x")

    def read_events(self) -> list[tuple[float, bool, int]]:
        if self.fail is not None:
            raise self.fail
        while True:
            try:
                if not os.read(self.r, 4096):
                    break
            except BlockingIOError:
                break
        out, self.queue = self.queue, []
        return out

    def close(self) -> None:
        self.closed = True


async def test_sensor_counts_edges_from_the_event_fd() -> None:
    line = PipeLine(level=True)
    s = GpioInput(cfg(GpioInputConfig, line=4, debounce_ms=0, per_pulse=0.5, pulse_unit="L"), line)
    await s.open()
    r = {x.channel: x.value for x in await s.read()}
    assert r == {"level": 1.0, "count": 0.0, "frequency": 0.0, "total": 0.0, "rate": 0.0}
    now = time.monotonic()
    for i in range(10):  # 10 Hz over the last second
        line.edge(now - 1.0 + i * 0.1, False)
        line.edge(now - 1.0 + i * 0.1 + 0.05, True)
    await wait_for(lambda: s.counters["events"] == 20)
    r = {x.channel: x.value for x in await s.read()}
    assert r["count"] == 10 and r["level"] == 1.0 and r["total"] == 5.0
    assert r["frequency"] == pytest.approx(10.0, rel=0.05) and r["rate"] == pytest.approx(
        5.0, rel=0.05
    )
    line.edge(now + 0.01, False, skip=3)  # the kernel queue overflowed: seqno jumps
    await wait_for(lambda: s.counters["events"] == 21)
    assert s.counters["lost_events"] == 3
    line.fail = OSError(19, "No such device")
    line.edge(now + 0.02, True)
    await asyncio.sleep(0.05)
    with pytest.raises(DeviceError, match="No such device"):
        await s.read()
    await s.close()
    assert line.closed


def test_edgerunctl_check_names_a_missing_gpio_chip(tmp_path: Path) -> None:
    from edgerund.config.loader import load_config
    from edgerund.toolkit.check import FAIL, check_devices, device_access

    path = tmp_path / "gw.yaml"
    path.write_text(
        "gateway: {id: gw}\n"
        f"paths: {{state_dir: {tmp_path / 's'}}}\n"
        "sensors:\n"
        "  - {id: door, driver: gpio_input, chip: gpiochip9, line: 4}\n"
    )
    r = check_devices(load_config(path), None, device_access)
    assert r.level == FAIL and "sensor door: /dev/gpiochip9 does not exist" in r.message
