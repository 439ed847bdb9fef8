"""Scheduler: absolute deadlines keep zero cumulative drift; overruns skip and are counted."""

from __future__ import annotations

import random

import pytest

from edgerund.control.scheduler import Schedule, effective_spin_s, run_schedule, sleep_until


class FakeClock:
    """A controllable monotonic clock. Every read advances it by `read_cost_s` (so a
    busy-wait on it terminates, as on a real clock)."""

    def __init__(self, t: float = 12345.678, read_cost_s: float = 5e-6) -> None:
        self.t = t
        self.read_cost_s = read_cost_s

    def __call__(self) -> float:
        self.t += self.read_cost_s
        return self.t


class JitterySleep:
    """Emulates event-loop timers: uvloop wakes up to ~0.9 ms early, asyncio ~1.2 ms late."""

    def __init__(self, clock: FakeClock, rng: random.Random, early_s: float, late_s: float) -> None:
        self.clock, self.rng, self.early_s, self.late_s = clock, rng, early_s, late_s
        self.calls = 0

    async def __call__(self, d: float) -> None:
        self.calls += 1
        self.clock.t += max(0.0, d + self.rng.uniform(-self.early_s, self.late_s))


@pytest.mark.parametrize("early_s,late_s", [(0.0009, 0.0), (0.0, 0.0012), (0.0009, 0.0012)])
async def test_zero_cumulative_drift_over_10000_ticks(early_s: float, late_s: float) -> None:
    clock = FakeClock()
    rng = random.Random(7)
    sleep = JitterySleep(clock, rng, early_s, late_s)
    period = 0.01
    t0 = clock() + period
    sched = Schedule(t0, period)
    deadlines: list[float] = []
    lateness: list[float] = []

    async def tick(deadline: float, woke: float) -> None:
        deadlines.append(deadline)
        lateness.append(woke - deadline)
        clock.t += rng.uniform(0.0001, 0.004)  # the tick's work: 0.1..4 ms

    await run_schedule(sched, tick, spin_s=0.0015, clock=clock, sleep=sleep, max_ticks=10_000)

    assert len(deadlines) == 10_000
    assert sched.missed == 0
    # every tick ran at exactly its grid point: t0 + k*T, k = 0..9999
    for k in (0, 1, 4999, 9999):
        assert deadlines[k] == t0 + k * period
    # cumulative drift: the 10,000th deadline is where the grid says, to float precision
    assert abs(deadlines[-1] - (t0 + 9_999 * period)) < 1e-9
    assert sched.deadline == t0 + 10_000 * period
    # never early, and the spin lands within a few clock reads of each deadline when the
    # timer does not wake us later than the spin lead
    assert min(lateness) >= 0.0
    if late_s < 0.0015:
        assert max(lateness) < 50e-6


async def test_naive_sleep_period_drifts_on_the_same_clock() -> None:
    """Control: the same clock and jitter with `sleep(T)` after the work drifts by the work
    time every tick (what the absolute schedule prevents)."""
    clock = FakeClock()
    rng = random.Random(7)
    sleep = JitterySleep(clock, rng, 0.0009, 0.0012)
    period = 0.01
    start = clock()
    for _ in range(1000):
        clock.t += rng.uniform(0.0001, 0.004)
        await sleep(period)
    drift = clock() - (start + 1000 * period)
    assert drift > 1.0  # seconds, after only 1000 ticks


async def test_overrun_skips_to_next_deadline_and_counts_missed() -> None:
    clock = FakeClock(read_cost_s=1e-6)
    sleep = JitterySleep(clock, random.Random(1), 0.0, 0.0)
    period = 0.01
    t0 = clock() + period
    sched = Schedule(t0, period)
    seen: list[float] = []

    async def tick(deadline: float, woke: float) -> None:
        seen.append(deadline)
        if len(seen) == 5:
            clock.t += 0.035  # overruns the next 3 deadlines (k=5,6,7)

    await run_schedule(sched, tick, spin_s=0.0, clock=clock, sleep=sleep, max_ticks=10)
    ks = [round((d - t0) / period) for d in seen]
    assert ks == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]
    assert sched.missed == 3 and sched.overruns == 1  # one tick overran three deadlines
    # phase kept: still on the grid after the skip
    assert all(d == t0 + k * period for d, k in zip(seen, ks, strict=True))


def test_schedule_advance_boundaries() -> None:
    s = Schedule(100.0, 0.5)
    assert s.advance(100.2) == 0 and s.deadline == 100.5
    assert s.advance(100.5) == 0 and s.deadline == 101.0  # exactly on time is not missed
    assert s.advance(102.25) == 2 and s.deadline == 102.5  # 101.5, 102.0 skipped
    assert s.missed == 2 and s.overruns == 1
    with pytest.raises(ValueError):
        Schedule(0.0, 0.0)


def test_spin_capped_at_quarter_period() -> None:
    assert effective_spin_s(0.001, 0.010) == 0.001
    assert effective_spin_s(0.001, 0.001) == 0.00025
    assert effective_spin_s(0.0, 0.010) == 0.0


async def test_sleep_until_real_clock_not_early() -> None:
    """On the real event loop (uvloop or asyncio) the wait never returns before the
    deadline, spin or no spin."""
    import asyncio
    import time

    for spin in (0.0, 0.0005):
        for _ in range(20):
            deadline = time.monotonic() + 0.002
            woke = await sleep_until(deadline, spin_s=spin)
            assert woke >= deadline
        await asyncio.sleep(0)


def test_phase_aligned_first_deadline() -> None:
    import msgspec

    from edgerund.config.schema import Config
    from edgerund.control.loop import ControlLoop

    cfg = msgspec.convert(
        {
            "gateway": {"id": "g"},
            "loops": [
                {
                    "id": "a",
                    "period_ms": 10,
                    "phase_us": 600,
                    "fallback": [{"sensor": "s", "channel": "c", "above": 1}],
                }
            ],
        },
        Config,
    ).loops[0]
    loop = ControlLoop(
        cfg,
        hub=None,
        models=None,
        publish=print,
        actuator=None,  # type: ignore[arg-type]
        input_stale_s={},
        rule_stale_s=[1.0],
    )
    t0 = loop.first_deadline(1000.0123)
    assert t0 == pytest.approx(1000.0206) and t0 > 1000.0123
    assert loop.first_deadline(1000.0206) == pytest.approx(1000.0306)  # strictly after now
