"""A census of the process's heap for leak hunts (the soak's `test-heap` hook, enabled only
by EDGERUND_TEST_HOOKS=1): live objects counted by type, and, when the process runs under
tracemalloc (PYTHONTRACEMALLOC=N), the allocation sites that grew since the first census.

Objects are those the garbage collector tracks outside the permanent generation: in the
daemon, what was created after start-up's `gc.freeze()`, which is where a leak piles up.
Called twice minutes apart on a running daemon, the difference names what accumulates:
a type whose count only rises, or a line whose allocations only grow. It sees Python
objects and what numpy reports to tracemalloc, not C libraries' own heaps (SQLite's page
cache, onnxruntime's arena): those show only in RSS.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter
from typing import Any


class HeapCensus:
    def __init__(self) -> None:
        self._first: tracemalloc.Snapshot | None = None

    def take(self, top: int = 30) -> dict[str, Any]:
        counts = Counter(type(o).__qualname__ for o in gc.get_objects())
        out: dict[str, Any] = {
            "objects": sum(counts.values()),
            "by_type": dict(counts.most_common(top)),
            "tracing": tracemalloc.is_tracing(),
        }
        if not tracemalloc.is_tracing():
            return out
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        out["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
        if self._first is None:
            self._first = snap
            return out
        out["grown_since_first"] = [
            {
                "where": str(s.traceback[0]),
                "kib": round(s.size_diff / 1024, 1),
                "count": s.count_diff,
            }
            for s in snap.compare_to(self._first, "lineno")[:top]
        ]
        return out
