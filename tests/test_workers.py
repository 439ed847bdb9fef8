"""The daemon's default executor starts all its threads up front (edgerund/workers.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgerund import workers


def _named(prefix: str) -> int:
    return sum(t.name.startswith(prefix) for t in threading.enumerate())


def _burst(pool: ThreadPoolExecutor, jobs: int) -> None:
    """`jobs` overlapping jobs, as off-loop calls overlap once in a while on a daemon."""
    futures = [pool.submit(time.sleep, 0.05) for _ in range(jobs)]
    for f in futures:
        f.result(5.0)


def test_a_lazy_pool_grows_its_threads_when_jobs_overlap() -> None:
    """Why the module exists: asyncio's default executor (a plain ThreadPoolExecutor)
    starts one thread for a lone job and more only when jobs overlap."""
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lazy-probe") as pool:
        pool.submit(time.sleep, 0).result(5.0)
        assert _named("lazy-probe") == 1
        _burst(pool, 8)
        assert _named("lazy-probe") == 4


def test_a_prestarted_pool_has_all_its_threads_at_once_and_never_more() -> None:
    pool = workers.prestarted(4, name="pre-probe")
    try:
        assert _named("pre-probe") == 4  # before any job of ours ran
        _burst(pool, 12)
        assert _named("pre-probe") == 4
        assert pool.submit(lambda: 7).result(5.0) == 7  # the start-up jobs left no thread stuck
    finally:
        pool.shutdown(wait=True)
    assert _named("pre-probe") == 0


def test_install_makes_it_the_default_executor_for_to_thread() -> None:
    async def main() -> tuple[str, int]:
        workers.install(asyncio.get_running_loop(), 3)
        names = await asyncio.gather(
            *(asyncio.to_thread(lambda: threading.current_thread().name) for _ in range(9))
        )
        return names[0], len(set(names))

    name, distinct = asyncio.run(main())  # asyncio.run shuts the executor down
    assert name.startswith("edgerund-io") and distinct <= 3
    assert _named("edgerund-io") == 0


def test_sizes() -> None:
    assert 5 <= workers.default_workers() <= 32
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        workers.prestarted(0)
