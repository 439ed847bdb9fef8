"""Acquisition: one task per sensor, on absolute deadlines, surviving device faults.

Theory of operation
-------------------
Every configured sensor gets a `SensorRuntime` (its driver object, health, rings, counters)
and ONE task owned by the daemon's supervisor. Tasks share nothing but the loop, so a
sensor whose reads time out, or whose port vanished, only ever waits on itself: the other
tasks keep their own deadlines. (Sensors on one I2C bus do share that bus's worker thread:
the wire is serial anyway. A transaction that hangs in the kernel is bounded by the
adapter's own timeout; the hub's `read_timeout_ms` frees the *task* immediately.)

Polled sensors (`mode == "poll"`): the first read comes at once (`t0`), then deadlines
are `t0 - offset + k * period` on `loop.time()`, `offset` a stable fraction (from the
sensor's id) of half the period (of 0.5 s at most) that spreads sensors at harmonic
rates instead of waking them all at once. The
task sleeps until the next deadline, reads, stores, and computes the next deadline from
the grid, never `sleep(period)` after the work (that drifts by the work time every
tick). When the task falls a whole period or more behind (a slow read, a stalled loop),
the missed deadlines are skipped and counted in `overruns`; a deadline missed by less
than a period is served late, so ordinary wake-up jitter costs no samples.

One read = `1 + retries` attempts, each under `asyncio.timeout(read_timeout_ms)` (a
timeout ends the read at once: the device had its time, and an I2C transaction that timed
out still occupies the bus worker, so an immediate retry would only queue behind it).
Drivers that time each exchange themselves (`SelfTimedRead`, e.g. Modbus: a silent unit
is `no response within N ms` naming unit and function, a `DeviceError` retried at once
like any other) get the hub's timer only as a backstop beyond their own deadline. A read
whose every attempt failed is a `ReadFailed` event for the health state machine
(edgerund/hub/health.py). Between failed reads the task backs off (capped, jittered
exponential, never faster than the grid); after `fail_after` consecutive failures the
sensor is `failed`: the device is closed, and re-opened every `reprobe_s` until a read
works again. Logging and `sensor.state` events come from the state machine's actions, so
each visible transition is logged once, not every retry.

Phase lock (`lock(period_s, t0_s, before_s)`, asked for by a control loop whose input is
`fresh`): the polled grid moves onto the loop's: reads are due at `t0 + k*P - before -
lead` on `time.monotonic()` (the loop's clock; uvloop's `loop.time()` is whole
milliseconds), `P` the loop period divided by the whole number of reads per tick nearest
the configured rate, so the read that completes last before each tick ends `before` (the
loop's spin, during which the event loop stores nothing) ahead of it. `lead` is learned:
the LEAD_QUANTILE quantile of the last LEAD_WINDOW locked reads, each timed from its due
instant to its sample being stored (the read itself plus the timer's wake-up lateness and the hop back to
the event loop), plus LOCK_SLACK_S; so a sensor whose reads slow down (a busy bus, a
loaded CPU) starts earlier instead of delivering after the tick. The sample a tick uses is then `before + lead` old rather than
anything up to a whole sensor period plus the read's own lateness.

Stream sensors (`mode == "stream"`) iterate `frames()`. A `FrameError` escaping the
iterator (a bad CRC, a garbage line) is counted and the iteration resumes with a fresh
`frames()` (drivers keep their framer state on the object, so nothing is lost); a
`DeviceError`/`OSError` (the adapter was pulled, the instrument went silent) closes the
sensor and re-opens it with a short backoff, and at the re-probe period once failed, so a
USB-serial adapter that comes back is picked up.

Storing: each `Reading` becomes one `Sample` (the only per-sample allocation), stamped
with the read's acquisition time from the driver contract (drivers/base.py: the first bus
transaction's start, as the transport noted it, else the completion), written into the
channel's preallocated ring; the samples of one read go to the hub's sink in one
call, which fans them out to subscribers (telemetry).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import structlog

from drivers.base import (
    ChannelInfo,
    Reading,
    Sample,
    SelfTimedRead,
    SensorConfig,
    acquired_at,
    begin_acquisition,
)
from drivers.errors import DeviceError, FrameError
from edgerund.hub import health as hm
from edgerund.hub.ring import Ring

log = structlog.get_logger("edgerund.hub")

SampleSink = Callable[[list[Sample], float], None]  # (the samples of one read, t_mono)
Publish = Callable[..., Any]

BACKOFF_INITIAL_S = 0.05  # first pause after a failed read (then x2 per failure)
BACKOFF_MAX_S = 1.0  # ... capped here: a flaky sensor below fail_after keeps being read
OPEN_TIMEOUT_MIN_S = 2.0  # opening reads calibration, chip ids...: more than one read
# a self-timed driver's read (drivers/base.py SelfTimedRead) gets this long beyond its own
# deadline before the hub's backstop timer ends it
SELF_TIMED_MARGIN_S = 0.25
READ_OK = hm.ReadOk()  # events are immutable: one instance for the hot path
LEAD_WINDOW = 32  # phase lock: reads whose durations set the lead (the longest of them)
LOCK_SLACK_S = 0.0004  # phase lock: the event loop's timer wake-up error, on top of the lead
LEAD_QUANTILE = 0.8  # phase lock: the lead covers this share of recent reads


@dataclass(frozen=True, slots=True)
class PhaseLock:
    """Reads due at `t0_s + k * period_s - before_s - lead` (time.monotonic)."""

    period_s: float
    t0_s: float
    before_s: float

    def slot(self, now: float, lead_s: float) -> int:
        """The first grid slot whose read starts at or after `now` (pure)."""
        return math.ceil((now - self.t0_s + self.before_s + lead_s) / self.period_s)

    def start(self, k: int, lead_s: float) -> float:
        return self.t0_s + k * self.period_s - self.before_s - lead_s


@dataclass(slots=True)
class ChannelSlot:
    info: ChannelInfo
    ring: Ring
    latest: Sample | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        self.unit = self.info.unit


# The hot path builds one frozen `Sample` per channel per read. Its generated __init__
# goes through object.__setattr__ once per field (frozen dataclass), about twice the cost
# of filling the slots directly; the result is the same immutable object.
_new_sample = object.__new__
_SLOTS: dict[str, Any] = dict(vars(Sample))  # field name -> its slot descriptor
_set_sid: Callable[[Sample, Any], None] = _SLOTS["sensor_id"].__set__
_set_channel: Callable[[Sample, Any], None] = _SLOTS["channel"].__set__
_set_t_mono: Callable[[Sample, Any], None] = _SLOTS["t_mono"].__set__
_set_t_wall: Callable[[Sample, Any], None] = _SLOTS["t_wall"].__set__
_set_value: Callable[[Sample, Any], None] = _SLOTS["value"].__set__
_set_unit: Callable[[Sample, Any], None] = _SLOTS["unit"].__set__
_set_quality: Callable[[Sample, Any], None] = _SLOTS["quality"].__set__
_monotonic = time.monotonic
_wall = time.time

# isinstance() against a runtime-checkable Protocol walks the protocol's members every
# call (~10-60 us, on the event loop, per read): answered once per driver class (no
# driver delegates attributes, so the answer is the class's).
_SELF_TIMED: dict[type, bool] = {}


def _self_timed(sensor: object) -> TypeGuard[SelfTimedRead]:
    cls = type(sensor)
    hit = _SELF_TIMED.get(cls)
    if hit is None:
        hit = _SELF_TIMED[cls] = isinstance(sensor, SelfTimedRead)
    return hit


@dataclass
class SensorCounters:
    reads: int = 0  # successful acquisitions (a poll, or one stream frame)
    samples: int = 0
    read_errors: int = 0  # DeviceError / OSError attempts
    frame_errors: int = 0  # FrameError attempts (CRC, checksum, syntax)
    timeouts: int = 0  # attempts that hit read_timeout_ms
    failed_reads: int = 0  # reads whose every attempt failed
    overruns: int = 0  # deadlines skipped because the task fell >= 1 period behind
    opens: int = 0
    open_errors: int = 0
    reprobes: int = 0
    unknown_channel: int = 0  # readings naming a channel the driver did not declare
    driver_bugs: int = 0  # unexpected exceptions from the driver (counted, survived)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SensorRuntime:
    """Everything the hub knows about one configured sensor."""

    config: SensorConfig
    driver_name: str
    transport: str  # "i2c" | "serial" | "other"
    where: str  # "i2c-1@0x76", "/dev/ttyUSB0", ...
    sensor: Any  # PolledSensor | StreamSensor
    slots: dict[str, ChannelSlot]
    health: hm.Health = field(default_factory=hm.Health)
    counters: SensorCounters = field(default_factory=SensorCounters)
    opened: bool = False
    last_read_mono: float = 0.0
    started_mono: float = 0.0
    _bug_logged: bool = False

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def mode(self) -> str:
        return str(getattr(self.sensor, "mode", "poll"))


def make_slots(channels: Sequence[ChannelInfo], window: int) -> dict[str, ChannelSlot]:
    return {c.name: ChannelSlot(c, Ring(window)) for c in channels}


class Acquirer:
    """Runs the acquisition task of one sensor (see the module docstring)."""

    def __init__(self, rt: SensorRuntime, sink: SampleSink, publish: Publish) -> None:
        self.rt = rt
        self._sink = sink
        self._publish = publish
        self.apply(rt.config)
        self._log = log.bind(sensor=rt.config.id, driver=rt.driver_name)
        # Where in its period this sensor's grid sits, stable per id (0 <= phase < 1).
        # Sensors at harmonic rates started together (1, 10, 50, 200 Hz) would otherwise
        # all fall due on the same instant every second, and the loop would run twenty
        # reads back to back while a control loop's tick waits behind them.
        self.phase = zlib.crc32(rt.config.id.encode()) / 2.0**32
        self._last_was_frame_error = False
        self.lock_: PhaseLock | None = None
        self._read_s: collections.deque[float] = collections.deque(maxlen=LEAD_WINDOW)
        self._relock = asyncio.Event()

    def lock(self, loop_period_s: float, t0_s: float, before_s: float) -> None:
        """Phase-lock the polled reads to a loop's ticks (see the module docstring)."""
        per_tick = max(1, round(loop_period_s / self.period_s))
        self.lock_ = PhaseLock(loop_period_s / per_tick, t0_s, before_s)
        self._relock.set()

    @property
    def lead_s(self) -> float:
        """How long before its due instant a locked read starts (learned)."""
        if not self._read_s:
            return self.timeout_s / 4 + LOCK_SLACK_S
        # a high quantile, not the maximum: one stalled read (a busy bus, a preempted
        # thread) would otherwise pull every read a whole stall early for LEAD_WINDOW reads
        ordered = sorted(self._read_s)
        return max(0.0, ordered[int(LEAD_QUANTILE * (len(ordered) - 1))]) + LOCK_SLACK_S

    def apply(self, cfg: SensorConfig) -> None:
        """Take (new) acquisition settings; a running task uses them from its next read."""
        self.rt.config = cfg
        self.period_s = 1.0 / cfg.rate_hz
        self.timeout_s = cfg.read_timeout_ms / 1000.0
        if isinstance(self.rt.sensor, SelfTimedRead):  # it bounds its own exchanges
            self.rt.sensor.set_read_timeout(self.timeout_s)
        self.open_timeout_s = max(OPEN_TIMEOUT_MIN_S, 4.0 * self.timeout_s)
        # A stream with no frame for this long is stalled. Drivers detect stalls
        # themselves (and name the cause); this is the backstop for one that does not.
        self.stall_s = 2.0 * max(self.timeout_s, 2.0 * self.period_s) + 0.5

    # -- health -----------------------------------------------------------------------
    def _event(self, ev: hm.HealthEvent) -> bool:
        """Feed the state machine; carry out its actions. True when told to re-probe."""
        rt = self.rt
        rt.health, actions = hm.step(rt.health, ev, rt.config.fail_after)
        reprobe = False
        for a in actions:
            if isinstance(a, hm.LogTransition):
                fn = self._log.warning if a.level == "warning" else self._log.info
                fn(
                    a.event,
                    from_state=a.from_state,
                    to_state=a.to_state,
                    reason=a.reason,
                    where=rt.where,
                )
            elif isinstance(a, hm.PublishState):
                with contextlib.suppress(Exception):
                    self._publish("sensor.state", rt.id, state=a.state, reason=a.reason)
            elif isinstance(a, hm.Reprobe):
                reprobe = True
        return reprobe

    def _driver_bug(self, exc: BaseException) -> str:
        rt = self.rt
        rt.counters.driver_bugs += 1
        if not rt._bug_logged:
            rt._bug_logged = True
            self._log.error("driver_exception", error=repr(exc), exc_info=exc)
        return f"driver error: {exc!r}"

    # -- open / close -----------------------------------------------------------------
    async def open(self) -> str | None:
        """Open with immediate retries. None on success, else the reason."""
        rt = self.rt
        reason = "not opened"
        for _ in range(rt.config.retries + 1):
            try:
                async with asyncio.timeout(self.open_timeout_s):
                    await rt.sensor.open()
            except TimeoutError:
                reason = f"open timed out after {self.open_timeout_s:.1f} s"
            except (DeviceError, OSError, FrameError) as exc:
                reason = f"open failed: {exc}"
            except Exception as exc:
                reason = self._driver_bug(exc)
            else:
                rt.opened = True
                rt.counters.opens += 1
                return None
            rt.counters.open_errors += 1
            # A failed open may have left a half-open transport (a port without its
            # chip): close so the next attempt starts clean and references balance.
            await self._close_quietly(force=True)
        return reason

    async def close(self) -> None:
        await self._close_quietly()

    async def _close_quietly(self, force: bool = False) -> None:
        rt = self.rt
        if not rt.opened and not force:
            return
        rt.opened = False
        try:
            async with asyncio.timeout(self.open_timeout_s):
                await rt.sensor.close()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # closing a broken device must not stop the task
            self._log.debug("close_failed", error=repr(exc))

    async def _reprobe_wait(self) -> None:
        """Close, then wait the re-probe period (jittered so a fleet does not beat)."""
        self.rt.counters.reprobes += 1
        await self._close_quietly()
        await asyncio.sleep(self.rt.config.reprobe_s * random.uniform(0.9, 1.1))

    def _backoff_s(self) -> float:
        """Pause after a failed read: 50 ms doubling per consecutive failure, capped at
        BACKOFF_MAX_S (and reprobe_s), jittered. Bad frames do not back off (the device
        answered; the next frame is likely fine)."""
        if self._last_was_frame_error:
            return 0.0
        k = max(1, self.rt.health.consecutive_failures)
        cap = min(BACKOFF_MAX_S, float(self.rt.config.reprobe_s))
        return min(BACKOFF_INITIAL_S * 2.0 ** (k - 1), cap) * random.uniform(0.8, 1.2)

    # -- storing ----------------------------------------------------------------------
    def store(self, readings: Sequence[Reading]) -> None:
        rt = self.rt
        t_mono = _monotonic()
        # Samples carry the instant the device was read, as its transport noted it
        # (drivers/base.py, acquisition time), not when the loop got the result: under
        # CPU load that hop adds milliseconds of jitter to the sample times.
        t_acq = acquired_at()
        t_sample = t_acq if t_acq is not None and t_acq <= t_mono else t_mono
        # The same instant on the wall clock (telemetry timestamps agree with t_mono).
        t_wall = _wall() - (t_mono - t_sample)
        sid = rt.config.id
        slots = rt.slots
        samples: list[Sample] = []
        append = samples.append
        for r in readings:
            slot = slots.get(r.channel)
            if slot is None:
                rt.counters.unknown_channel += 1
                continue
            v = float(r.value)
            s = _new_sample(Sample)
            _set_sid(s, sid)
            _set_channel(s, r.channel)
            age = r.age_s  # a FIFO record: sampled that long before the read
            _set_t_mono(s, t_sample - age)
            _set_t_wall(s, t_wall - age)
            _set_value(s, v)
            _set_unit(s, slot.unit)
            _set_quality(s, r.quality)
            slot.ring.push(t_sample - age, v)
            slot.latest = s
            append(s)
        c = rt.counters
        c.reads += 1
        c.samples += len(samples)
        rt.last_read_mono = t_mono
        self._sink(samples, t_mono)

    # -- polled -----------------------------------------------------------------------
    async def read_once(self) -> str | None:
        """One acquisition with retries: None when stored, else the failure reason."""
        rt = self.rt
        c = rt.counters
        sensor = rt.sensor
        timeout_s = self.timeout_s
        if _self_timed(sensor):
            # the driver times each exchange itself and names what did not answer
            timeout_s = max(timeout_s, sensor.read_deadline_s) + SELF_TIMED_MARGIN_S
        reason = "no attempt"
        frame_only = True
        for _ in range(rt.config.retries + 1):
            t_start = _monotonic()
            begin_acquisition()  # the read's first bus transaction notes its instant
            try:
                async with asyncio.timeout(timeout_s):
                    readings = await sensor.read()
            except TimeoutError:
                c.timeouts += 1
                frame_only = False
                reason = f"read timed out after {timeout_s * 1000:.0f} ms"
                # No immediate retry: the device already had its whole timeout, and on an
                # I2C bus the timed-out transaction still occupies the worker, so a retry
                # would only queue behind it. The grid (with backoff) tries again.
                break
            except FrameError as exc:
                c.frame_errors += 1
                reason = str(exc)
            except (DeviceError, OSError) as exc:
                c.read_errors += 1
                frame_only = False
                reason = str(exc) or exc.__class__.__name__
            except Exception as exc:
                c.read_errors += 1
                frame_only = False
                reason = self._driver_bug(exc)
            else:
                self.store(readings)
                if self.lock_ is None:  # (locked reads count from their due instant)
                    self._read_s.append(_monotonic() - t_start)
                return None
        c.failed_reads += 1
        self._last_was_frame_error = frame_only
        return reason

    async def run_polled(self) -> None:
        rt = self.rt
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not rt.opened:
                    why = await self.open()
                    if why is not None:
                        self._event(hm.OpenFailed(why))
                        await self._reprobe_wait()
                        continue
                # First read at once (a fresh open wants its proof of life); the grid after
                # it is pulled earlier by this sensor's phase offset, so a sample never
                # comes later than on an unshifted grid.
                if self.lock_ is not None:
                    await self._run_locked()
                    continue
                deadline = loop.time()
                shift = self.phase * 0.5 * min(self.period_s, 1.0)
                while self.lock_ is None:
                    period = self.period_s  # re-read: a reload may change the rate
                    delay = deadline - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    why = await self.read_once()
                    if why is None:
                        h = rt.health
                        if h.state != "ok" or h.consecutive_failures:  # else: no change
                            self._event(READ_OK)
                    elif self._event(hm.ReadFailed(why)):
                        await self._reprobe_wait()
                        break  # re-open, new grid
                    deadline += period - shift
                    shift = 0.0
                    now = loop.time()
                    if why is not None:
                        # back off, then rejoin the grid at the first deadline after it
                        not_before = now + self._backoff_s()
                        if deadline < not_before:
                            deadline += math.ceil((not_before - deadline) / period) * period
                    elif now - deadline >= period:
                        skipped = int((now - deadline) // period)
                        rt.counters.overruns += skipped
                        deadline += skipped * period
        finally:
            await self._close_quietly()

    async def _run_locked(self) -> None:
        """Polled reads on the phase lock's grid, until a read fails for good (returns to
        re-open) or the lock changes (returns to re-lock)."""
        last: tuple[PhaseLock, int] | None = None
        while True:
            lock = self.lock_
            assert lock is not None
            self._relock.clear()
            lead = self.lead_s
            k = lock.slot(_monotonic(), lead)
            if last is not None and last[0] is lock and k <= last[1]:
                # an early wake-up (uvloop fires timers up to 1 ms early) read before its
                # slot's instant: never read the same slot twice (the rate stays exact)
                k = last[1] + 1
            last = (lock, k)
            start = lock.start(k, lead)
            delay = start - _monotonic()
            if delay > 0:
                # woken early by a new lock: compute its grid
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._relock.wait()
                if self._relock.is_set():
                    continue
            why = await self.read_once()
            if why is None:
                # due instant -> stored: the read plus the timer's wake-up lateness
                self._read_s.append(_monotonic() - start)
                h = self.rt.health
                if h.state != "ok" or h.consecutive_failures:
                    self._event(READ_OK)
            else:
                if self._event(hm.ReadFailed(why)):
                    await self._reprobe_wait()
                    return
                await asyncio.sleep(self._backoff_s())

    # -- streamed ---------------------------------------------------------------------
    async def run_stream(self) -> None:
        rt = self.rt
        c = rt.counters
        try:
            while True:
                if not rt.opened:
                    why = await self.open()
                    if why is not None:
                        if self._event(hm.OpenFailed(why)):
                            await self._reprobe_wait()
                        continue
                it: AsyncIterator[Sequence[Reading]] = rt.sensor.frames()
                try:
                    while True:
                        # a frame's instant is its arrival, unless the driver polled
                        # for it (then the request's): no note may outlive its frame
                        begin_acquisition()
                        try:
                            async with asyncio.timeout(self.stall_s):
                                readings = await anext(it)
                        except FrameError as exc:
                            c.frame_errors += 1
                            self._log.debug("frame_error", error=str(exc))
                            await _aclose(it)
                            it = rt.sensor.frames()
                            continue
                        self.store(readings)
                        h = rt.health
                        if h.state != "ok" or h.consecutive_failures:
                            self._event(READ_OK)
                except asyncio.CancelledError:
                    await _aclose(it)  # finalise the driver's generator on shutdown
                    raise
                except BaseException as exc:
                    await _aclose(it)
                    if isinstance(exc, TimeoutError):
                        c.timeouts += 1
                        why = f"no frame for {self.stall_s:.1f} s"
                    elif isinstance(exc, StopAsyncIteration):
                        c.read_errors += 1
                        why = "stream ended"
                    elif isinstance(exc, DeviceError | OSError):
                        c.read_errors += 1
                        why = str(exc) or exc.__class__.__name__
                    elif isinstance(exc, Exception):
                        c.read_errors += 1
                        why = self._driver_bug(exc)
                    else:
                        raise
                    c.failed_reads += 1
                    self._last_was_frame_error = False
                    reprobe = self._event(hm.ReadFailed(why))
                    # The port is gone or silent: a fresh open is the only way back.
                    await self._close_quietly()
                    if reprobe:
                        await self._reprobe_wait()
                    else:
                        await asyncio.sleep(self._backoff_s())
        finally:
            await self._close_quietly()

    async def run(self) -> None:
        self.rt.started_mono = time.monotonic()
        if self.rt.mode == "stream":
            await self.run_stream()
        else:
            await self.run_polled()


async def _aclose(it: Any) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
