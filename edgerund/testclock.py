"""Test-only wall-clock offset: NTP steps for the soak harness, without CAP_SYS_TIME.

The daemon's `test-clock-step` command (registered only when the environment says
EDGERUND_TEST_HOOKS=1, never by a config key) calls `step(offset_s)`: from then on
`time.time()` and `time.time_ns()` in this process answer the real wall clock plus the
accumulated offset, as if an NTP correction had stepped the system clock. The monotonic
clock (deadlines, timeouts, loop scheduling) is untouched, exactly as with a real step.

Limits: code that captured `time.time` before the step (`from time import time`) and
C-level clocks (`datetime.now()`, SQLite's `now`) keep the real wall clock. A time
namespace cannot do better (it offsets CLOCK_MONOTONIC/BOOTTIME only, never REALTIME),
and libfaketime is not a dependency of the test suite.
"""

from __future__ import annotations

import time

_real_time = time.time
_real_time_ns = time.time_ns
_offset_ns = 0


def _time() -> float:
    return _real_time() + _offset_ns / 1e9


def _time_ns() -> int:
    return _real_time_ns() + _offset_ns


def step(offset_s: float) -> float:
    """Add `offset_s` to this process's wall clock; returns the total offset in seconds."""
    global _offset_ns
    _offset_ns += int(offset_s * 1e9)
    time.time = _time
    time.time_ns = _time_ns
    return _offset_ns / 1e9
