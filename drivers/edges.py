"""Debounced level, edge counter and frequency of a digital input (pure, no I/O).

Theory of operation
-------------------
A digital input on a gateway is a door contact, a flow meter's reed switch, a pulse
output of an energy meter (S0: 30..120 ms pulses) or an open-collector tachometer. The
kernel timestamps every edge it sees (libgpiod edge events, CLOCK_MONOTONIC ns), and
mechanical contacts bounce: one press is a burst of edges within a few milliseconds.

`EdgeTracker.feed(t, level)` takes each raw edge as (time, level after the edge) and
debounces by *stability*: a new level becomes the accepted level only once it has held
for `debounce_s` with no edge back (a burst of bounces settles to its final level, a
spike shorter than `debounce_s` is dropped). The check is lazy: the pending level is
accepted when the next edge comes later than `debounce_s` after it, or when `settle(now)`
is called (the driver does so at every read), so no timer is needed and the accepted
edge carries the instant the level really began to change (the first edge of the burst
that settled), not the instant someone looked. A spike that returns to the accepted
level starts a burst that a quiet `debounce_s` ends, so a later transition is dated from
its own first edge. `debounce_s = 0` accepts every edge.

Counting: accepted edges of the configured kind (`rising`, `falling` or `both`) add to
`count` (monotonic since start; a consumer takes differences). Frequency over a window:
with the counted edge instants of the last `window_s` seconds, f = (n - 1) / (t_last -
t_first), i.e. from whole periods and not from counts per window (which quantise badly at
the few-Hz rates of flow meters). When the input stops, the estimate decays instead of
holding: f is capped at 1 / (now - t_last) once the silence exceeds the measured period,
and is 0 with fewer than two edges in the window. With `both`, two edges make one cycle,
so f is halved.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

__all__ = ["CountEdge", "EdgeTracker"]

CountEdge = Literal["rising", "falling", "both"]


class EdgeTracker:
    def __init__(
        self,
        *,
        level: bool,
        debounce_s: float = 0.0,
        count_edge: CountEdge = "rising",
        window_s: float = 10.0,
    ) -> None:
        if debounce_s < 0 or window_s <= 0:
            raise ValueError("debounce_s must be >= 0 and window_s > 0")
        self.level = level
        self.debounce_s = debounce_s
        self.count_edge: CountEdge = count_edge
        self.window_s = window_s
        self.count = 0
        self.accepted = 0  # debounced transitions of either direction
        self.fed = 0  # raw edges seen
        self._pending: tuple[float, bool] | None = None  # (since, level) not yet stable
        self._burst: float | None = None  # first raw edge since the last accepted one
        self._last_t = float("-inf")
        self._times: deque[float] = deque()

    def _accept(self, t: float, level: bool) -> None:
        self.level = level
        self.accepted += 1
        if self.count_edge == "both" or (self.count_edge == "rising") == level:
            self.count += 1
            self._times.append(t)

    @property
    def rejected(self) -> int:
        """Raw edges that did not (or not yet) become an accepted transition."""
        return self.fed - self.accepted

    def settle(self, now: float) -> None:
        """Accept a pending level that has held for `debounce_s` by `now`."""
        p = self._pending
        if p is not None and now - p[0] >= self.debounce_s:
            since, level = p
            start = self._burst if self._burst is not None else since
            self._pending = None
            self._burst = None
            self._accept(start, level)

    def feed(self, t: float, level: bool) -> None:
        """One raw edge: the line is at `level` from instant `t` on."""
        self.settle(t)
        self.fed += 1
        quiet = self._pending is None and t - self._last_t >= self.debounce_s
        if self._burst is None or quiet:
            self._burst = t  # a new burst (an earlier spike has settled back)
        self._last_t = t
        if level == self.level:
            self._pending = None  # back to the accepted level before it settled
            return
        if self.debounce_s == 0:
            self._burst = None
            self._accept(t, level)
        else:
            self._pending = (t, level)

    def frequency(self, now: float) -> float:
        """Counted edges per second over the window (cycles per second for `both`)."""
        times = self._times
        while times and times[0] < now - self.window_s:
            times.popleft()
        if len(times) < 2:
            return 0.0
        span = times[-1] - times[0]
        if span <= 0:
            return 0.0
        f = (len(times) - 1) / span
        silence = now - times[-1]
        if silence > 1.0 / f:
            f = 1.0 / silence  # the input stopped: decay, do not hold the last rate
        return f / 2.0 if self.count_edge == "both" else f
