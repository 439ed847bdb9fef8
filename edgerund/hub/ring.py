"""Per-channel ring buffers: the latest sample and a fixed window of (t_mono, value).

Two preallocated float64 arrays per channel; `push` writes one slot and advances an index,
so acquisition allocates nothing per sample besides the `Sample` object consumers see.
`window(n)` returns copies in time order (newest last) so a control loop can keep them
across awaits while acquisition keeps writing; `between(t_lo, t_hi)` selects by time
instead of count. The time base is the caller's: the hub pushes `t_mono` seconds,
telemetry pushes wall-clock milliseconds (integers, exact in a float64 up to 2**53).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


class Ring:
    __slots__ = ("_i", "_t", "_v", "capacity", "count")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._t: F64 = np.zeros(capacity, dtype=np.float64)
        self._v: F64 = np.zeros(capacity, dtype=np.float64)
        self._i = 0  # next slot to write
        self.count = 0  # samples ever pushed

    def push(self, t: float, v: float) -> None:
        i = self._i
        self._t[i] = t
        self._v[i] = v
        i += 1
        self._i = 0 if i == self.capacity else i
        self.count += 1

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def window(self, n: int) -> tuple[F64, F64]:
        """The newest min(n, len) samples, oldest first, as fresh arrays."""
        k = min(max(n, 0), len(self))
        if k == 0:
            return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
        start = self._i - k
        if start >= 0:
            return self._t[start : self._i].copy(), self._v[start : self._i].copy()
        # wrapped: the tail of the arrays, then the head
        return (
            np.concatenate((self._t[start:], self._t[: self._i])),
            np.concatenate((self._v[start:], self._v[: self._i])),
        )

    def between(self, t_lo: float, t_hi: float) -> tuple[F64, F64]:
        """The stored samples with t_lo <= t <= t_hi, in push order, as fresh arrays."""
        t, v = self.window(self.capacity)
        m = (t >= t_lo) & (t <= t_hi)
        return t[m], v[m]

    def times_since(self, t_from: float) -> F64:
        """Timestamps of the stored samples newer than `t_from` (unordered use: counting)."""
        n = len(self)
        t = self._t[:n] if n < self.capacity else self._t
        return t[t > t_from]
