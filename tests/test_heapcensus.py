"""The leak-hunt census behind the `test-heap` hook: it must name what accumulates."""

from __future__ import annotations

import tracemalloc

from edgerund.heapcensus import HeapCensus


class _Leaked:
    pass


def test_counts_objects_by_type_without_tracemalloc() -> None:
    kept = [_Leaked() for _ in range(500)]
    out = HeapCensus().take(top=10_000)
    assert out["tracing"] is False and "grown_since_first" not in out
    assert out["by_type"]["_Leaked"] >= 500
    assert out["objects"] >= sum(out["by_type"].values())
    del kept


def test_names_the_line_that_grew_between_two_censuses() -> None:
    tracemalloc.start(1)
    try:
        census = HeapCensus()
        first = census.take()
        assert first["tracing"] and "grown_since_first" not in first
        kept = [bytearray(1024) for _ in range(2000)]  # ~2 MB from this line
        second = census.take()
        top = second["grown_since_first"][0]
        assert top["where"].endswith(f"test_heapcensus.py:{_line_of('bytearray(1024)')}")
        assert top["kib"] >= 2000 and top["count"] >= 2000
        del kept
    finally:
        tracemalloc.stop()


def _line_of(text: str) -> int:
    with open(__file__) as f:
        for n, line in enumerate(f, 1):
            if text in line and "kept =" in line:
                return n
    raise AssertionError(text)
