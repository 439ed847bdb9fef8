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

Phase lock (`lock(period_s, t0_s)`, asked for by a control loop whose input is `fresh`):
the polled grid moves onto the loop's, `P` the loop period divided by the whole number of
reads per tick nearest the configured rate (PhaseLock.under), slots `t0 + k*P` on
`time.monotonic()` (the loop's clock; uvloop's `loop.time()` is whole milliseconds), one
slot on each of the loop's deadlines. A deadline's slot is read when the loop asks
(`request_read`, from its tick or just ahead of it: edgerund/control/fresh.py): the read
starts at once and the request's future resolves when its sample is stored, so the tick
decides on a sample taken after its own deadline, not on whatever the grid last read.
The slots in between (a 200 Hz sensor under a 100 Hz loop: one) are read on the grid, as
before. A slot is never read twice (an early uvloop timer, a request that came after the
slot was read), and a deadline's slot that no request asked for half a slot after its
instant (a stalled or stopped loop) is read anyway and counted (`unrequested`), so the
sensor never stops. Why not time the read to land just before the tick, as this did at
first: measured per tick with 9 emulated sensors on a quiet 2-core machine, the read's
start wandered over 2 ms (uvloop's millisecond timers fire up to 1 ms early or late), a
read in flight when the loop's spin began stayed unstored until the tick was over (the
spin keeps the event loop; and the bus worker, woken while the loop thread spins, waits
0.6 ms at the median for a CPU), so the learned lead had to cover all of it: samples
1.9 ms old at the deadline at the median, and 4 % of ticks deciding on the read before
(5 ms older): sample-to-actuation p50 2.6 ms, p99 9.0 ms.

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


@dataclass(frozen=True, slots=True)
class PhaseLock:
    """A polled sensor's read grid under a loop: instants `t0_s + k * period_s`
    (time.monotonic), every `per_tick`-th of them one of the loop's deadlines (pure)."""

    period_s: float
    t0_s: float
    per_tick: int

    @classmethod
    def under(cls, loop_period_s: float, t0_s: float, sensor_period_s: float) -> PhaseLock:
        """The grid for a sensor configured at `1 / sensor_period_s` under a loop of
        `loop_period_s`: the whole number of reads per tick nearest the configured rate
        (at least one), evenly spaced, one on each deadline."""
        per_tick = max(1, round(loop_period_s / sensor_period_s))
        return cls(loop_period_s / per_tick, t0_s, per_tick)

    def at(self, k: int) -> float:
        return self.t0_s + k * self.period_s

    def tick_slot(self, t: float) -> int:
        """The deadline slot nearest `t`: the slot a loop's request at `t` serves (a loop
        asks for its read less than half a period before its deadline)."""
        n = self.per_tick
        return n * math.floor((t - self.t0_s) / (self.period_s * n) + 0.5)

    def next_slot(self, now: float, last_k: int | None) -> int:
        """The first slot whose instant is at or after `now` and that was not read yet."""
        k = math.ceil((now - self.t0_s) / self.period_s)
        return k if last_k is None or k > last_k else last_k + 1

    def is_tick(self, k: int) -> bool:
        return k % self.per_tick == 0

    def due(self, k: int) -> float:
        """When the acquisition task reads slot `k` by itself. An in-between slot: at its
        instant. A deadline's slot is read when the loop's tick asks (`request_read`);
        only when no request came half a slot after the deadline (a stalled or stopped
        loop) does the task read it anyway, so the sensor never stops being read."""
        t = self.at(k)
        return t + 0.5 * self.period_s if self.is_tick(k) else t


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
class LockCounters:
    """A phase-locked sensor's reads (see PhaseLock)."""

    requested: int = 0  # reads a loop's tick asked for
    unrequested: int = 0  # deadline slots read without a request (the loop did not ask)

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
        self._kick = asyncio.Event()  # a new lock, or a loop's request
        self._waiters: list[asyncio.Future[bool]] = []  # requests for the next read
        self.lock_counters = LockCounters()

    def lock(self, loop_period_s: float, t0_s: float) -> None:
        """Phase-lock the polled reads to a loop's ticks (see the module docstring)."""
        self.lock_ = PhaseLock.under(loop_period_s, t0_s, self.period_s)
        self._kick.set()

    def request_read(self) -> asyncio.Future[bool]:
        """A locked sensor, at a loop's tick: read now. The future turns True once a
        read that started after this call is stored, False when that read failed."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters and waiters[0].done():  # requests whose loop stopped waiting
            waiters[:] = [w for w in waiters if not w.done()]
        waiters.append(fut)
        self._kick.set()
        return fut

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
        re-open) or the lock changes (returns to re-lock): a loop's request is read at
        once, an in-between slot at its instant (see PhaseLock.due)."""
        lock = self.lock_
        assert lock is not None
        last_k: int | None = None  # the newest slot read (a slot is never read twice)
        c = self.lock_counters
        kick = self._kick
        while self.lock_ is lock:
            if self._waiters:
                waiters, self._waiters = self._waiters, []
                kick.clear()
                k = lock.tick_slot(_monotonic())
                last_k = k if last_k is None else max(last_k, k)
                c.requested += 1
                why = await self._locked_read()
                for w in waiters:  # before any backoff: the loop is waiting
                    if not w.done():
                        w.set_result(why is None)
                if why is not None and await self._locked_failed(why):
                    return
                continue
            kick.clear()
            now = _monotonic()
            k = lock.next_slot(now, last_k)
            delay = lock.due(k) - now
            if delay > 0:
                # woken early by a request or a new lock: serve that first
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await kick.wait()
                if kick.is_set():
                    continue
            last_k = k
            if lock.is_tick(k):
                c.unrequested += 1
            why = await self._locked_read()
            if why is not None and await self._locked_failed(why):
                return

    async def _locked_read(self) -> str | None:
        """One locked read: None when stored, else why it failed."""
        why = await self.read_once()
        if why is None:
            h = self.rt.health
            if h.state != "ok" or h.consecutive_failures:
                self._event(READ_OK)
        return why

    async def _locked_failed(self, why: str) -> bool:
        """After a failed locked read: True when the sensor is to be re-opened (after the
        re-probe wait), else False after the backoff."""
        if self._event(hm.ReadFailed(why)):
            await self._reprobe_wait()
            return True
        await asyncio.sleep(self._backoff_s())
        return False

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
