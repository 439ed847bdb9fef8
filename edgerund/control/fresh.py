"""When a loop reads its fresh inputs: at the tick, or ahead of it (pure).

Theory of operation
-------------------
A loop input marked `fresh` has its sensor read for every tick (the hub's phase lock,
edgerund/hub/acquire.py): the loop asks for the read (`SampleSource.request_read`) at
one of two places, which this policy chooses from what it measures.

* **At the tick** (the default; `lead_s == 0`): the tick, woken on its deadline, asks for
  the read and waits for it (at most `wait_s`) before it gathers its inputs. The sample
  is taken a few tens of microseconds after the deadline and the decision uses it a few
  hundred microseconds later. While the tick waits, the event-loop thread blocks in the
  poller, so the bus worker gets the CPU and the GIL at once. Before the deadline it
  could not: the loop's spin keeps the CPU (a spinning thread delays a woken worker by
  0.6 ms at the median on a 2-core machine), nothing is stored while it spins, and
  uvloop cannot time a sub-millisecond wait (its timers are whole milliseconds).
* **Ahead of the tick** (`lead_s > 0`): waiting inside the tick hands the event loop to
  whatever else is queued. On a loaded daemon (callbacks queued most of the time, the
  worker waiting for a CPU) the tick then finishes late and misses deadlines. When more
  than SLOW_MAX of the last WINDOW waits took over SLOW_S, the loop asks for the read
  `lead_s` before the deadline instead (the spin + the AHEAD_QUANTILE of the reads'
  request-to-stored durations + LEAD_MARGIN_S, at most 45 % of the period) and does not wait:
  the read is stored before the spin starts and the tick uses the newest sample there is.
  A wait that ran into its bound (`wait_s`) counts as TIMEOUT_WEIGHT slow waits, so a
  daemon that starts loaded goes ahead after two of them rather than after eleven.
  After `hold_ticks` ahead the loop tries the tick again; each time it has to come back
  ahead the hold doubles (up to HOLD_MAX_TICKS), and a full quiet window at the tick
  resets it.
"""

from __future__ import annotations

import bisect
from collections import deque

WINDOW = 100  # waits (at the tick) and durations (ahead) the choice is made from
SLOW_S = 0.002  # a wait at the tick over this is slow ...
SLOW_MAX = 10  # ... and more than this many slow waits in WINDOW send the reads ahead
TIMEOUT_WEIGHT = 6  # a wait that reached `wait_s` counts as this many slow ones
AHEAD_QUANTILE = 0.8  # ahead: the share of reads stored before the spin starts
LEAD_MARGIN_S = 0.0002  # ahead: on top of the quantile (the timer's and the hop's error)
HOLD_TICKS = 500  # ahead for this many ticks before trying the tick again (5 s at 100 Hz)
HOLD_MAX_TICKS = 6000


def quantile(ordered: list[float], q: float) -> float:
    """The `q` quantile of a sorted, non-empty list (the nearest rank above)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class FreshPolicy:
    """Where a loop's fresh reads go: at the tick or ahead of it (see the module doc)."""

    __slots__ = (
        "_ahead_left",
        "_durations",
        "_ordered",
        "_slow",
        "_waits",
        "hold_ticks",
        "lead_max_s",
        "lead_s",
        "spin_s",
        "switches",
        "wait_s",
    )

    def __init__(self, *, period_s: float, spin_s: float) -> None:
        if not period_s > 0 or spin_s < 0:
            raise ValueError(f"period must be > 0 and spin >= 0, got {period_s}, {spin_s}")
        self.spin_s = spin_s
        # under half a period: a request must fall nearer its own deadline than the one
        # before (the hub serves the deadline slot nearest the request)
        self.lead_max_s = 0.45 * period_s
        # the most a tick waits for its read (then it decides without, and the read serves
        # the next tick): a quarter of the period, the rest is the decision's
        self.wait_s = 0.25 * period_s
        self._waits: deque[int] = deque(maxlen=WINDOW)  # at the tick: slow-wait weights
        self._slow = 0  # slow waits in _waits
        self._durations: deque[float] = deque(maxlen=WINDOW)  # ahead: request -> stored
        self._ordered: list[float] = []  # the same durations, sorted (kept, not re-sorted)
        self.lead_s = 0.0
        self.hold_ticks = HOLD_TICKS
        self._ahead_left = 0
        self.switches = 0  # times the reads went ahead of the tick

    @property
    def at_tick(self) -> bool:
        return self.lead_s == 0.0

    def waited(self, wait_s: float) -> None:
        """At the tick: how long the tick waited for its reads (request to resumed)."""
        if not self.at_tick:
            return
        waits = self._waits
        if len(waits) == waits.maxlen:
            self._slow -= waits[0]
        weight = TIMEOUT_WEIGHT if wait_s >= self.wait_s else int(wait_s > SLOW_S)
        waits.append(weight)
        self._slow += weight
        if self._slow > SLOW_MAX:
            self._go_ahead()
        elif len(waits) == waits.maxlen and self._slow == 0:
            self.hold_ticks = HOLD_TICKS  # a quiet window: the next fallback holds short

    def _go_ahead(self) -> None:
        self.switches += 1
        self._ahead_left = self.hold_ticks
        self.hold_ticks = min(HOLD_MAX_TICKS, 2 * self.hold_ticks)
        self._waits.clear()
        self._slow = 0
        self._lead()

    def stored(self, duration_s: float) -> None:
        """Ahead: one read's duration from its request to its sample being stored."""
        if self.at_tick:
            return
        durations, ordered = self._durations, self._ordered
        if len(durations) == durations.maxlen:
            del ordered[bisect.bisect_left(ordered, durations[0])]
        durations.append(duration_s)
        bisect.insort(ordered, duration_s)
        self._lead()

    def _lead(self) -> None:
        d = self._ordered
        q = quantile(d, AHEAD_QUANTILE) if d else self.lead_max_s
        self.lead_s = max(1e-6, min(self.lead_max_s, self.spin_s + q + LEAD_MARGIN_S))

    def ticked(self) -> None:
        """Once per tick: counts the hold down while ahead, then back to the tick."""
        if self._ahead_left > 0:
            self._ahead_left -= 1
            if self._ahead_left == 0:
                self.lead_s = 0.0
