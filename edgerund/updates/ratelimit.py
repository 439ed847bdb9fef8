"""Token buckets in front of the update sources (pure; the clock is injected).

Why: every bundle offered costs work before it can be refused (opening it, reading its
head, a signature check, for MQTT the transfer itself), and the job runner handles one
job at a time. Without a bound, one source (a local client looping on `update`, a broker
replaying `cmd/update`, a stick with thousands of files) could keep the runner busy and
starve the others. So each SOURCE has a bucket of `burst` bundles refilled at
`per_min` bundles a minute; a bundle offered without a token is refused at once, before
its file is opened (`rate_limited`, with the wait in the message).

A source is what offered the bundle: `socket:<uid>` (each local user has their own
bucket), `inbox` (the whole directory: one stick) and `mqtt` (the backend). Keyring
documents count like bundles. Buckets that are full again are forgotten, so memory is
bounded by the number of sources active within one refill period. `per_min <= 0` turns
the limit off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_BUCKETS = 64


def source_of(job_source: str) -> str:
    """The bucket of a job source ("socket:1000", "inbox:NAME", "mqtt:ID")."""
    kind = job_source.partition(":")[0]
    return job_source if kind == "socket" else kind


class SourceLimiter:
    def __init__(
        self, per_min: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_min / 60.0
        self.burst = float(max(1, burst))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, t)
        self.refused: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, source: str) -> float:
        """0.0 when a bundle from `source` may go ahead, else the seconds to wait."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, t = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - t) * self.rate)
        if tokens >= 1.0:
            self._buckets[source] = (tokens - 1.0, now)
            self._forget_full(now)
            return 0.0
        self._buckets[source] = (tokens, now)
        self.refused[source] = self.refused.get(source, 0) + 1
        return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        if len(self._buckets) < MAX_BUCKETS:
            return
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}

    def status(self) -> dict[str, object]:
        return {
            "per_min": self.rate * 60.0,
            "burst": int(self.burst),
            "refused": dict(self.refused),
        }
