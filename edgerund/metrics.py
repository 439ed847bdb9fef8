"""Cheap fixed-bucket histograms for latency figures (p50/p99/max without sorting).

Buckets are log-spaced from 1 µs to ~100 s (8 per octave), so recording is one log2 and an
increment and memory is constant however long the daemon runs. Percentiles are the upper
edge of the bucket holding the rank, i.e. at most ~9% high, never low.
"""

from __future__ import annotations

import math
from typing import Any

_PER_OCTAVE = 8
_MIN_S = 1e-6
_N_BUCKETS = _PER_OCTAVE * 27 + 2  # up to 2**27 µs ~ 134 s


class Histogram:
    __slots__ = ("_counts", "count", "max", "sum")

    def __init__(self) -> None:
        self._counts = [0] * _N_BUCKETS
        self.count = 0
        self.max = 0.0
        self.sum = 0.0

    def record(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds
        if seconds <= _MIN_S:
            i = 0
        else:
            i = min(_N_BUCKETS - 1, 1 + int(math.log2(seconds / _MIN_S) * _PER_OCTAVE))
        self._counts[i] += 1

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                upper = _MIN_S * 2 ** (i / _PER_OCTAVE) if i else _MIN_S
                return min(upper, self.max)
        return self.max

    def summary_ms(self) -> dict[str, float]:
        return {
            "p50": round(self.quantile(0.5) * 1e3, 3),
            "p99": round(self.quantile(0.99) * 1e3, 3),
            "max": round(self.max * 1e3, 3),
        }

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative (upper_edge_seconds, count) pairs for Prometheus exposition."""
        out: list[tuple[float, int]] = []
        seen = 0
        for i, c in enumerate(self._counts):
            seen += c
            if c:
                out.append((_MIN_S * 2 ** (i / _PER_OCTAVE) if i else _MIN_S, seen))
        return out

    def reset(self) -> None:
        self._counts = [0] * _N_BUCKETS
        self.count = 0
        self.max = 0.0
        self.sum = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, **self.summary_ms()}
