"""The event loop's own lag, and the systemd watchdog fed only while it is small.

Theory of operation
-------------------
A task wakes every `loop_lag_interval_ms` on absolute deadlines and measures how late it
woke: that lateness is what any callback queued behind the running one waits (a blocking
call on the loop, a long callback, the GIL held by a thread, or a CPU the kernel gave to
someone else). Its histogram is in `status` (`loop_lag_ms`, `loop_lag`).

The same task sends WATCHDOG=1 (at most once a second, or at the interval systemd asks
for) and only while the lag is under `watchdog_lag_limit_ms`: a blocked or starved loop
stops the pings, and systemd restarts the service after `WatchdogSec`. A wake that finds
itself several intervals late skips to the next deadline instead of bursting.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from edgerund.control.histogram import Histogram
from edgerund.sdnotify import Notifier, watchdog_interval_s

log = structlog.get_logger("edgerund")


class LoopLagMonitor:
    """Measures the event loop's wake-up lag and feeds the systemd watchdog."""

    def __init__(self, interval_s: float, limit_s: float, notifier: Notifier) -> None:
        self.interval_s = interval_s
        self.limit_s = limit_s
        self.notifier = notifier
        self.last_s = 0.0
        self.max_s = 0.0
        self.hist = Histogram()
        self.pings = 0
        self.withheld = 0
        self._wd_every = watchdog_interval_s()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_ping = 0.0
        deadline = loop.time() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            now = loop.time()
            lag = max(0.0, now - deadline)
            self.last_s = lag
            self.max_s = max(self.max_s, lag)
            self.hist.record(lag * 1e3)
            deadline += self.interval_s
            if deadline < now:  # we were blocked for several intervals: skip, don't burst
                deadline = now + self.interval_s
            if self._wd_every is not None and now - last_ping >= min(self._wd_every, 1.0):
                if lag < self.limit_s:
                    self.notifier.notify(WATCHDOG=1)
                    self.pings += 1
                    last_ping = now
                else:
                    self.withheld += 1
                    log.warning("watchdog_withheld", loop_lag_ms=round(lag * 1e3, 1))

    def status(self) -> dict[str, Any]:
        return {
            "loop_lag_ms": round(self.last_s * 1e3, 3),
            "loop_lag": {**self.hist.summary(), "samples": self.hist.count},
        }
