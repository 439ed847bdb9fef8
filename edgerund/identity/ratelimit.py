"""Per-client token buckets for the socket `attest` command (pure; clock injected).

A quote costs several TPM commands (quote, PCR reads, two certifications) and the TPM is
shared with telemetry signing and the update counter, so one local client must not be
able to monopolise it. Each client uid gets a bucket of `burst` tokens refilled at
`rate_per_s`; a request without a token is refused at once (`rate_limited`, with the wait).
Buckets idle long enough to be full again are forgotten, so memory stays bounded by the
number of clients active within one refill period.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PerKeyBuckets:
    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # key -> (tokens, t)
        self.refused = 0

    def take(self, key: int) -> float:
        """0.0 when allowed, else the seconds until the next token."""
        now = self._clock()
        tokens, t = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - t) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._forget_full(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        self.refused += 1
        return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        if len(self._buckets) < 64:
            return
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
