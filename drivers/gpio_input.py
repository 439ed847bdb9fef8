"""A digital input as a sensor (driver name `gpio_input`): level, edge count, frequency.

Theory of operation
-------------------
One GPIO line is requested as an input with edge detection on both edges through the
kernel's GPIO character device and libgpiod v2's Python binding (`gpiod` >= 2). The
kernel queues every edge with a CLOCK_MONOTONIC timestamp (the same clock as
`time.monotonic()`), so pulses are counted even between the hub's reads and no polling
thread is needed: the request's file descriptor is registered with the event loop
(`loop.add_reader`), and when it becomes readable the queued events are read (a
non-blocking read of a ready fd) and fed to the pure `EdgeTracker` (drivers/edges.py:
debounce, counting, frequency). The hub polls the sensor at `rate_hz`; each read settles
the debouncer at the current instant and returns:
  level      1 / 0, the debounced logical level (`active_low` inverts in the kernel);
  count      debounced edges of the kind `count_edge` since the sensor opened;
  frequency  Hz, from the edge instants of the last `window_s` seconds.
With `per_pulse` and `pulse_unit` (a flow meter's litres per pulse, an energy meter's
Wh per pulse) two more channels: `total` = count * per_pulse and `rate` = frequency *
per_pulse (`pulse_unit`/s).

The kernel's own debounce (`debounce_period`, done in software by gpiolib-cdev for chips
without hardware debounce) is requested too when `kernel_debounce` is on; our
debouncer then sees clean edges and is a no-op. Lost events (the kernel's queue
overflowed: the event sequence numbers jump) are counted in `lost_events`.

The chip access (`GpiodLineSource`) is the only part that needs `gpiod` and a real GPIO
chip; nothing in this sandbox can exercise it (no /dev/gpiochip*, no gpio-sim module, no
configfs), so the tests drive the sensor through the `LineSource` port with a fake that
speaks the same interface over a pipe (fd readiness, timestamped edges), and the logic
through EdgeTracker directly. Requesting and releasing the line touch the filesystem and
run in a thread.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from drivers.base import ChannelInfo, DeviceError, Reading, Resources, SensorConfig
from drivers.edges import CountEdge, EdgeTracker
from drivers.registry import SensorSpec

__all__ = ["SENSOR", "GpioInput", "GpioInputConfig", "GpiodLineSource", "LineSource"]

INSTALL_HINT = "the package's venv carries gpiod >= 2; elsewhere: pip install 'gpiod>=2'"


class GpioInputConfig(SensorConfig, tag="gpio_input", kw_only=True):
    """```yaml
    - id: flow
      driver: gpio_input
      chip: gpiochip0          # Pi 5: the header is on the RP1 (gpiochip4 before kernel 6.6.45, else gpiochip0)
      line: 17                 # line offset (BCM number on the Pi header)
      bias: pull_up            # as_is | pull_up | pull_down | disabled
      active_low: false
      debounce_ms: 5           # level must hold this long (contacts: 5-20 ms; S0 meters: 10)
      kernel_debounce: true    # also ask the kernel to debounce (where the chip allows)
      count_edge: rising       # rising | falling | both
      window_s: 10             # frequency from the edges of the last window_s seconds
      per_pulse: 2.25          # optional: units per pulse -> channels total and rate
      pulse_unit: mL
      rate_hz: 1
    ```"""

    chip: str = "gpiochip0"
    line: int
    bias: Literal["as_is", "pull_up", "pull_down", "disabled"] = "as_is"
    active_low: bool = False
    debounce_ms: float = 0.0
    kernel_debounce: bool = True
    count_edge: CountEdge = "rising"
    window_s: float = 10.0
    per_pulse: float | None = None
    pulse_unit: str = ""
    consumer: str = "edgerund"

    def __post_init__(self) -> None:
        if self.line < 0:
            raise ValueError(f"line: expected an offset >= 0, got {self.line}")
        if self.debounce_ms < 0 or self.window_s <= 0:
            raise ValueError("debounce_ms must be >= 0 and window_s > 0")
        if (self.per_pulse is None) != (not self.pulse_unit):
            raise ValueError("per_pulse and pulse_unit go together (e.g. 2.25 and mL)")

    def chip_path(self) -> str:
        return self.chip if self.chip.startswith("/") else f"/dev/{self.chip}"


class LineSource(Protocol):
    """The port to one input line: what GpiodLineSource does with a real chip."""

    def open(self) -> bool:  # request the line; -> its current logical level
        ...

    def fileno(self) -> int:  # readable when edge events are queued
        ...

    def read_events(self) -> list[tuple[float, bool, int]]:  # [(t_mono_s, level, seqno)]
        ...

    def close(self) -> None: ...


class GpiodLineSource:
    """libgpiod v2: one input line with edge events (thin; see the module docstring)."""

    def __init__(self, cfg: GpioInputConfig) -> None:
        self.cfg = cfg
        self._req: Any = None

    def open(self) -> bool:
        try:
            gpiod = importlib.import_module("gpiod")
            gl = importlib.import_module("gpiod.line")
        except ImportError as exc:
            raise DeviceError(
                f"gpio_input needs libgpiod's Python binding: {INSTALL_HINT}"
            ) from exc
        if not hasattr(gpiod, "request_lines"):
            raise DeviceError(f"gpio_input needs libgpiod v2 bindings, found v1: {INSTALL_HINT}")
        c = self.cfg
        bias = {
            "as_is": gl.Bias.AS_IS,
            "pull_up": gl.Bias.PULL_UP,
            "pull_down": gl.Bias.PULL_DOWN,
            "disabled": gl.Bias.DISABLED,
        }[c.bias]
        kw: dict[str, Any] = {
            "direction": gl.Direction.INPUT,
            "edge_detection": gl.Edge.BOTH,
            "bias": bias,
            "active_low": c.active_low,
            "event_clock": gl.Clock.MONOTONIC,
        }
        if c.kernel_debounce and c.debounce_ms > 0:
            kw["debounce_period"] = datetime.timedelta(milliseconds=c.debounce_ms)
        try:
            self._req = gpiod.request_lines(
                c.chip_path(), consumer=c.consumer, config={c.line: gpiod.LineSettings(**kw)}
            )
            return bool(self._req.get_value(c.line) == gl.Value.ACTIVE)
        except (OSError, ValueError) as exc:
            raise DeviceError(
                f"gpio {c.chip_path()} line {c.line}: cannot request input: {exc}"
            ) from exc

    def fileno(self) -> int:
        return int(self._req.fd)

    def read_events(self) -> list[tuple[float, bool, int]]:
        rising = importlib.import_module("gpiod").EdgeEvent.Type.RISING_EDGE
        return [
            (e.timestamp_ns / 1e9, e.event_type == rising, int(e.line_seqno))
            for e in self._req.read_edge_events()
        ]

    def close(self) -> None:
        if self._req is not None:
            self._req.release()
            self._req = None


class GpioInput:
    mode: Literal["poll"] = "poll"

    def __init__(self, cfg: GpioInputConfig, source: LineSource | None = None) -> None:
        self.cfg = cfg
        self.source: LineSource = source if source is not None else GpiodLineSource(cfg)
        chans = [ChannelInfo("level", ""), ChannelInfo("count", ""), ChannelInfo("frequency", "Hz")]
        if cfg.per_pulse is not None:
            chans += [
                ChannelInfo("total", cfg.pulse_unit),
                ChannelInfo("rate", f"{cfg.pulse_unit}/s"),
            ]
        self.channels: Sequence[ChannelInfo] = tuple(chans)
        self.counters = {"reads": 0, "events": 0, "bounces": 0, "lost_events": 0}
        self.tracker: EdgeTracker | None = None
        self._fd: int | None = None
        self._seqno: int | None = None
        self._fault: str | None = None

    @property
    def where(self) -> str:
        return f"gpio {self.cfg.chip_path()} line {self.cfg.line}"

    async def open(self) -> None:
        level = await asyncio.to_thread(self.source.open)
        self.tracker = EdgeTracker(
            level=level,
            debounce_s=self.cfg.debounce_ms / 1000.0,
            count_edge=self.cfg.count_edge,
            window_s=self.cfg.window_s,
        )
        self._seqno = None
        self._fault = None
        self._fd = self.source.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._drain)

    def _drain(self) -> None:
        """The fd is readable: take the queued edges (a read that does not block)."""
        tr = self.tracker
        if tr is None:
            return
        try:
            events = self.source.read_events()
        except OSError as exc:  # the chip went away under us
            self._fault = f"{self.where}: reading edge events: {exc}"
            self._remove_reader()
            return
        for t, level, seq in events:
            if self._seqno is not None and seq > self._seqno + 1:
                self.counters["lost_events"] += seq - self._seqno - 1
            self._seqno = seq
            self.counters["events"] += 1
            tr.feed(t, level)
        self.counters["bounces"] = tr.rejected

    def _remove_reader(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None

    async def read(self) -> Sequence[Reading]:
        tr = self.tracker
        if tr is None:
            raise DeviceError(f"{self.where}: not open")
        if self._fault is not None:
            raise DeviceError(self._fault)
        now = time.monotonic()
        tr.settle(now)
        f = tr.frequency(now)
        out = [
            Reading("level", 1.0 if tr.level else 0.0),
            Reading("count", float(tr.count)),
            Reading("frequency", f),
        ]
        if self.cfg.per_pulse is not None:
            out += [
                Reading("total", tr.count * self.cfg.per_pulse),
                Reading("rate", f * self.cfg.per_pulse),
            ]
        self.counters["reads"] += 1
        return out

    async def close(self) -> None:
        self._remove_reader()
        self.tracker = None
        await asyncio.to_thread(self.source.close)


def _factory(cfg: Any, resources: Resources) -> GpioInput:
    return GpioInput(cfg)


SENSOR = SensorSpec(
    name="gpio_input",
    config_type=GpioInputConfig,
    factory=_factory,
    transport="other",
    summary="digital input via libgpiod v2: level, debounced edge count, frequency (Hz)",
)
