"""The pure scheduling of fresh reads: the hub's read grid (PhaseLock), where the loop
asks for its read (FreshPolicy) and the scheduler's hook ahead of each deadline."""

from __future__ import annotations

import random

import pytest

from edgerund.control import fresh
from edgerund.control.fresh import FreshPolicy
from edgerund.control.scheduler import Schedule, run_schedule
from edgerund.hub.acquire import PhaseLock
from tests.control.test_scheduler import FakeClock, JitterySleep

# -- PhaseLock ---------------------------------------------------------------------------


def test_grid_has_a_whole_number_of_reads_per_tick_one_on_each_deadline() -> None:
    lock = PhaseLock.under(0.010, 100.0, 1 / 200)  # 200 Hz under a 100 Hz loop
    assert lock.per_tick == 2 and lock.period_s == pytest.approx(0.005)
    assert [lock.is_tick(k) for k in range(4)] == [True, False, True, False]
    assert lock.at(2) == pytest.approx(100.010)  # a deadline
    assert PhaseLock.under(0.010, 0.0, 1 / 130).per_tick == 1  # nearest whole number
    assert PhaseLock.under(0.010, 0.0, 1 / 10).per_tick == 1  # slower than the loop: 1


def test_a_request_serves_the_deadline_it_precedes_or_follows() -> None:
    lock = PhaseLock.under(0.010, 100.0, 1 / 200)
    # at the tick (just after deadline 100.020), or up to half a period ahead of it
    for t in (100.0201, 100.0230, 100.0160, 100.0151):
        assert lock.tick_slot(t) == 4, t


def test_a_slot_is_never_read_twice() -> None:
    lock = PhaseLock.under(0.010, 100.0, 1 / 200)
    # an early timer (uvloop fires up to 1 ms early) read slot 3 at 100.0142
    assert lock.next_slot(100.0142, last_k=None) == 3
    assert lock.next_slot(100.0142, last_k=3) == 4
    # a request served slot 4 (the deadline 100.020) before its instant
    assert lock.next_slot(100.0180, last_k=4) == 5


def test_a_deadline_slot_is_read_without_request_only_half_a_slot_late() -> None:
    lock = PhaseLock.under(0.010, 100.0, 1 / 200)
    assert lock.due(3) == pytest.approx(lock.at(3))  # in between: on its instant
    assert lock.due(4) == pytest.approx(lock.at(4) + 0.0025)  # a deadline: the loop's turn


# -- FreshPolicy -------------------------------------------------------------------------


def test_quick_reads_stay_at_the_tick() -> None:
    p = FreshPolicy(period_s=0.010, spin_s=0.0008)
    assert p.at_tick and p.lead_s == 0.0 and p.wait_s == pytest.approx(0.0025)
    rng = random.Random(1)
    for _ in range(1000):
        # mostly quick, a few slow ones (fewer than SLOW_MAX per window)
        p.waited(0.0022 if rng.random() < 0.05 else 0.0003)
        p.ticked()
    assert p.at_tick and p.switches == 0


def test_slow_waits_send_the_reads_ahead_with_a_learned_lead() -> None:
    p = FreshPolicy(period_s=0.010, spin_s=0.0008)
    for _ in range(fresh.SLOW_MAX):
        p.waited(0.0022)
        assert p.at_tick  # not yet: at most SLOW_MAX slow waits per window
    p.waited(0.0022)
    assert not p.at_tick and p.switches == 1
    assert p.lead_s == pytest.approx(0.0045)  # nothing measured ahead yet: the most
    p.waited(0.0022)  # ignored ahead of the tick
    for _ in range(50):
        p.stored(0.0005)
    # the spin + the reads' quantile + the margin
    assert p.lead_s == pytest.approx(0.0008 + 0.0005 + fresh.LEAD_MARGIN_S)
    for _ in range(50):
        p.stored(0.009)  # very slow reads: the lead stays under half a period
    assert p.lead_s == pytest.approx(0.0045)


def test_waits_that_reach_their_bound_send_the_reads_ahead_sooner() -> None:
    p = FreshPolicy(period_s=0.010, spin_s=0.0)
    p.waited(p.wait_s)  # the tick gave up waiting
    assert p.at_tick
    p.waited(p.wait_s + 0.001)
    assert not p.at_tick  # two of them: more than SLOW_MAX slow waits' worth


def test_slow_waits_leave_the_window_as_it_slides() -> None:
    p = FreshPolicy(period_s=0.010, spin_s=0.0)
    for i in range(10 * fresh.WINDOW):
        # exactly SLOW_MAX slow waits in every window: never ahead
        p.waited(0.0022 if i % fresh.WINDOW < fresh.SLOW_MAX else 0.0002)
        p.ticked()
    assert p.at_tick and p.switches == 0


def test_ahead_holds_then_tries_the_tick_again_with_a_doubling_hold() -> None:
    p = FreshPolicy(period_s=0.010, spin_s=0.0)

    def go_ahead() -> None:  # slow waits until the reads go ahead (the hold counts after)
        while p.at_tick:
            p.waited(0.0022)
            if p.at_tick:
                p.ticked()

    go_ahead()
    for _ in range(fresh.HOLD_TICKS - 1):
        p.ticked()
    assert not p.at_tick
    p.ticked()
    assert p.at_tick  # back at the tick after the hold
    go_ahead()  # slow again: twice as long ahead
    for _ in range(2 * fresh.HOLD_TICKS - 1):
        p.ticked()
    assert not p.at_tick
    p.ticked()
    assert p.at_tick
    for _ in range(fresh.WINDOW):  # a quiet window at the tick resets the hold
        p.waited(0.0002)
        p.ticked()
    go_ahead()
    for _ in range(fresh.HOLD_TICKS):
        p.ticked()
    assert p.at_tick


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FreshPolicy(period_s=0.0, spin_s=0.0)
    with pytest.raises(ValueError):
        FreshPolicy(period_s=0.01, spin_s=-1.0)


# -- the scheduler's hook ahead of each deadline --------------------------------------------


class _Ahead:
    def __init__(self, clock: FakeClock, lead_s: float) -> None:
        self.clock = clock
        self.lead_s = lead_s
        self.calls: list[tuple[float, float]] = []  # (deadline, when)

    async def ahead(self, deadline: float) -> None:
        self.calls.append((deadline, self.clock()))


async def test_prepare_runs_its_lead_before_each_deadline_and_not_at_lead_zero() -> None:
    clock = FakeClock()
    sleep = JitterySleep(clock, random.Random(3), early_s=0.0009, late_s=0.0)
    period = 0.010
    sched = Schedule(clock() + period, period)
    ahead = _Ahead(clock, 0.002)
    ticks: list[tuple[float, float]] = []

    async def tick(deadline: float, woke: float) -> None:
        ticks.append((deadline, woke))
        ahead.lead_s = 0.0 if len(ticks) >= 50 else 0.002  # the policy went back to the tick
        clock.t += 0.0005

    await run_schedule(
        sched, tick, spin_s=0.001, clock=clock, sleep=sleep, max_ticks=100, prepare=ahead
    )
    assert len(ticks) == 100 and sched.missed == 0
    assert len(ahead.calls) == 50  # the first 50 ticks, none after the lead went to 0
    for (deadline, when), (tick_deadline, woke) in zip(ahead.calls, ticks, strict=False):
        assert deadline == tick_deadline
        assert deadline - 0.002 <= when < deadline  # on its lead, before the deadline
        assert woke >= deadline  # and the tick still lands on the deadline


def test_the_lead_is_the_quantile_of_the_last_window_of_durations() -> None:
    """The policy keeps its durations sorted as they come and go (no sort per read): the
    lead equals the quantile of the last WINDOW durations, sorted afresh, at every step."""
    rng = random.Random(7)
    pol = FreshPolicy(period_s=0.010, spin_s=0.0005)
    for _ in range(fresh.TIMEOUT_WEIGHT):
        pol.waited(pol.wait_s)
    assert not pol.at_tick
    seen: list[float] = []
    for i in range(3 * fresh.WINDOW):
        d = rng.choice([rng.uniform(0.0001, 0.003), 0.001])  # with repeats
        pol.stored(d)
        seen.append(d)
        last = sorted(seen[-fresh.WINDOW :])
        q = fresh.quantile(last, fresh.AHEAD_QUANTILE)
        want = max(1e-6, min(pol.lead_max_s, pol.spin_s + q + fresh.LEAD_MARGIN_S))
        assert pol.lead_s == want, i
