"""A cheap fixed-bucket histogram for timing figures (p50/p99/max).

Theory of operation
-------------------
Control loops record four figures on every tick (tick lateness, sample age at decision,
decision-to-actuation, inference time) for as long as the daemon runs. Keeping raw samples
would grow memory and, worse, grow *tracked containers* that make the garbage collector's
generation-2 passes longer (see docs/control.md). So each figure goes into a histogram of
fixed size allocated once: recording is a `math.frexp`, two integer operations and one list
increment, with no allocation.

Buckets are log-linear, like HdrHistogram with 4 significant bits: each power of two
between `resolution` and `resolution * 2**40` is split into `SUB` (16) equal buckets, so a
percentile is exact to within 1/16 of its power of two (<= 6.25 % relative error, +-3 %
when reported at the bucket middle). Values below `resolution` go to bucket 0. The exact
minimum, maximum, count and sum are kept on the side, and a reported percentile is clamped
into [min, max] so a histogram with one value reports that value.

Negative values are counted as 0 in the buckets (an early wake-up is "not late"), but
`min` keeps the true negative value so early wake-ups stay visible.
"""

from __future__ import annotations

import math
from typing import Any

SUB = 16  # sub-buckets per power of two (4 significant bits)
OCTAVES = 40  # resolution * 2**40: 1 us resolution reaches ~12.7 days


class Histogram:
    """Fixed-size log-linear histogram. Values are in the caller's unit (ms or us)."""

    __slots__ = ("_counts", "_inv_res", "count", "max", "min", "resolution", "total")

    def __init__(self, resolution: float = 0.001) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {resolution}")
        self.resolution = resolution
        self._inv_res = 1.0 / resolution
        self._counts: list[int] = [0] * (SUB * (OCTAVES + 1) + 1)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float) -> None:
        if value != value:  # NaN: a figure we could not measure is not a zero
            return
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self._counts[self._index(value)] += 1

    def _index(self, value: float) -> int:
        scaled = value * self._inv_res
        if scaled < 1.0:
            return 0
        mant, exp = math.frexp(scaled)  # scaled = mant * 2**exp, mant in [0.5, 1)
        # exp >= 1 here; octave exp-1 holds [2**(exp-1), 2**exp)
        idx = 1 + (exp - 1) * SUB + int((mant - 0.5) * 2 * SUB)
        last = len(self._counts) - 1
        return idx if idx < last else last

    def _bucket_mid(self, idx: int) -> float:
        if idx == 0:
            return 0.5 * self.resolution
        octave, sub = divmod(idx - 1, SUB)
        lo = (2.0**octave) * (1.0 + sub / SUB)
        hi = (2.0**octave) * (1.0 + (sub + 1) / SUB)
        return 0.5 * (lo + hi) * self.resolution

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100), or None when nothing was recorded."""
        return self.percentiles((q,))[0]

    def percentiles(self, qs: tuple[float, ...]) -> list[float | None]:
        """Several percentiles (ascending q) in one pass over the buckets."""
        if self.count == 0:
            return [None] * len(qs)
        ranks = [max(1, math.ceil(self.count * q / 100.0)) for q in qs]
        out: list[float | None] = []
        lo, hi = max(self.min, 0.0), self.max
        seen = 0
        j = 0
        for idx, c in enumerate(self._counts):
            if not c:
                continue
            seen += c
            while j < len(ranks) and seen >= ranks[j]:
                out.append(min(max(self._bucket_mid(idx), lo), hi))
                j += 1
            if j == len(ranks):
                break
        while len(out) < len(qs):
            out.append(self.max)
        return out

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def reset(self) -> None:
        for i in range(len(self._counts)):
            self._counts[i] = 0
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def merge(self, other: Histogram) -> None:
        if other.resolution != self.resolution:
            raise ValueError("cannot merge histograms with different resolutions")
        for i, c in enumerate(other._counts):
            self._counts[i] += c
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def summary(self, digits: int = 3) -> dict[str, Any]:
        """`{p50, p99, max}` (None when empty), rounded for status output."""

        def r(v: float | None) -> float | None:
            return None if v is None else round(v, digits)

        p50, p99 = self.percentiles((50.0, 99.0))
        return {"p50": r(p50), "p99": r(p99), "max": r(self.max if self.count else None)}
