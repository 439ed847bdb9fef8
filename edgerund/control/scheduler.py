"""Deadline scheduling for control loops: absolute deadlines, skip on overrun, spin to land.

Theory of operation
-------------------
A loop of period T started at t0 runs tick k at the *absolute* deadline `t0 + k*T`,
computed from k by one multiplication each time, never by adding T to the previous
deadline (which accumulates rounding) and never by `sleep(T)` after the work (which adds
the work time and the wake-up error to every period: +543 ms in 10 s measured here, see
docs/control.md). The error of one wake-up therefore never carries into the next: zero
cumulative drift.

Overrun: when a tick finishes after the next deadline has already passed (a GC pause, a
slow actuator, a starved CPU), that deadline is *skipped*, not run late and back to back:
`Schedule.advance()` jumps to the first deadline strictly in the future and returns how
many were skipped, which the loop counts as missed ticks.

Landing on the deadline: the event loop's timers are coarse. asyncio's selector rounds the
timeout up to whole milliseconds (a wake-up ~0.2-1.2 ms late); uvloop/libuv keeps its
clock in whole milliseconds and fires timers up to ~1 ms *early*. `sleep_until()` handles
both: it sleeps on the event loop until `spin_s` before the deadline, re-reads a
precise clock after every wake-up (an early uvloop wake-up just sleeps again, or falls into
the spin), then busy-waits the last stretch on the clock without yielding. The spin costs
CPU (at most `spin_s` per tick, e.g. 1 ms of every 10 ms = 10 % of a core at 100 Hz), and
is capped at a quarter of the period so fast loops do not spin all the time.

The clock is `time.monotonic()` by default (the same clock the hub stamps samples with,
and, unlike uvloop's millisecond `loop.time()`, precise to the microsecond). Both the clock
and the sleep function are injectable so the tests can drive 10,000 ticks on a
controllable clock in milliseconds of real time.

Everything here is pure except `sleep_until`, whose only effect is awaiting `sleep`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class Schedule:
    """Absolute deadlines `t0 + k*period`; `k` only ever increases."""

    t0: float
    period_s: float
    k: int = 0
    missed: int = 0  # deadlines skipped because a tick overran them
    overruns: int = 0  # ticks that ran past the next deadline (each skipped >= 1)

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise ValueError(f"period must be > 0 s, got {self.period_s}")

    @property
    def deadline(self) -> float:
        return self.t0 + self.k * self.period_s

    def advance(self, now: float) -> int:
        """Move to the next deadline after the tick for `self.k` finished at `now`.

        Returns the number of deadlines skipped (0 normally). A deadline equal to `now` is
        still in time (the wait returns at once); only deadlines strictly in the past are
        skipped.
        """
        k_next = self.k + 1
        if self.t0 + k_next * self.period_s >= now:
            self.k = k_next
            return 0
        # first k with t0 + k*T >= now
        k_new = math.ceil((now - self.t0) / self.period_s)
        if self.t0 + k_new * self.period_s < now:  # float rounding at the boundary
            k_new += 1
        skipped = k_new - k_next
        self.k = k_new
        self.missed += skipped
        self.overruns += 1
        return skipped


def effective_spin_s(spin_s: float, period_s: float) -> float:
    """The spin lead actually used: at most a quarter of the period (CPU cost bound)."""
    return max(0.0, min(spin_s, period_s / 4.0))


async def sleep_until(
    deadline: float,
    *,
    spin_s: float,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> float:
    """Wait until `clock() >= deadline`; return the clock reading at the wake-up.

    Sleeps on the event loop until `spin_s` before the deadline (again after an early
    wake-up), then busy-waits without yielding. With `spin_s == 0` this is a plain
    sleep-until with early-wake correction: the returned time may be late by the event
    loop's timer granularity.
    """
    while True:
        now = clock()
        remaining = deadline - now
        if remaining <= 0:
            return now
        if remaining <= spin_s:
            break
        if spin_s > 0:
            await sleep(remaining - spin_s)
        else:
            await sleep(remaining)
            now = clock()
            if now >= deadline:
                return now
            # early (uvloop): if less than 50 us is left, spin instead of another
            # full timer round trip that would land ~1 ms late
            if deadline - now < 50e-6:
                break
    while True:  # the spin: no await, so nothing else runs on the loop meanwhile
        now = clock()
        if now >= deadline:
            return now


Tick = Callable[[float, float], Awaitable[None]]


class Prepare(Protocol):
    """Work done `lead_s` before each deadline, on the event loop (a loop's fresh reads)."""

    @property
    def lead_s(self) -> float: ...

    async def ahead(self, deadline: float) -> None:
        """Run `lead_s` before `deadline`; return by it (the spin to it follows)."""
        ...


async def run_schedule(
    schedule: Schedule,
    tick: Tick,
    *,
    spin_s: float,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    max_ticks: int | None = None,
    prepare: Prepare | None = None,
) -> None:
    """Run `tick(deadline, woke)` at each deadline of `schedule` (forever by default).

    With `prepare`, `prepare.ahead(deadline)` runs `prepare.lead_s` before each deadline when
    that lead is positive (reached without a spin: the event loop keeps serving callbacks meanwhile, and uvloop
    lands within one loop iteration, see `sleep_until`); the spin to the deadline follows
    it. After each tick the schedule skips deadlines the tick overran (`schedule.missed`).
    """
    n = 0
    while max_ticks is None or n < max_ticks:
        deadline = schedule.deadline
        if prepare is not None and (lead := prepare.lead_s) > 0:
            await sleep_until(deadline - lead, spin_s=0.0, clock=clock, sleep=sleep)
            await prepare.ahead(deadline)
        woke = await sleep_until(deadline, spin_s=spin_s, clock=clock, sleep=sleep)
        await tick(deadline, woke)
        schedule.advance(clock())
        n += 1
