"""The daemon's default executor: a fixed pool of worker threads, all started up front.

Theory of operation
-------------------
Blocking work that has no thread of its own (file reads and atomic writes, SQLite opens,
bundle staging, the twin's fetches) goes through `asyncio.to_thread`, i.e. the event
loop's default executor. asyncio's own default executor starts its threads lazily: a new
one each time a job arrives while every existing thread is busy, up to
min(32, CPUs + 4). On a daemon those overlaps are rare, so the thread count climbs in
steps over its first tens of minutes (the soak measured 7 -> 12 threads within 15 minutes
of each start), and each new thread brings its stack pages and its share of malloc's
arenas: RSS climbs with it, and a slope fitted over a process's life cannot tell that
warm-up from a leak.

`install` replaces the default executor with one of the same size whose threads are all
started at once, before the components are entered: each of the `workers` start-up jobs
waits at a barrier until all of them have arrived, so no job finishes (which would leave an
idle thread for the next one to reuse) before the last thread exists. The event loop does
not wait for them. From READY on, the thread count is constant; growth after start-up is
growth, not warm-up.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

PRESTART_TIMEOUT_S = 10.0  # a barrier that never fills (cannot happen) must not keep a thread


def default_workers() -> int:
    """asyncio's own default size: min(32, CPUs + 4)."""
    return min(32, (os.cpu_count() or 1) + 4)


def prestarted(workers: int, name: str = "edgerund-io") -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose `workers` threads are all started when it returns."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers)

    def arrive() -> None:
        try:
            barrier.wait(PRESTART_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass

    for _ in range(workers):
        pool.submit(arrive)  # each submit starts a thread: none is idle yet
    return pool


def install(loop: asyncio.AbstractEventLoop, workers: int | None = None) -> ThreadPoolExecutor:
    """Make a prestarted pool the loop's default executor (asyncio.Runner shuts it down)."""
    pool = prestarted(default_workers() if workers is None else workers)
    loop.set_default_executor(pool)
    return pool
