"""The fixed-bucket histogram: percentiles within the bucket resolution of the exact ones."""

from __future__ import annotations

import numpy as np
import pytest

from edgerund.control.histogram import SUB, Histogram


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "bimodal"])
def test_percentiles_match_numpy_within_bucket_width(dist: str) -> None:
    rng = np.random.default_rng(3)
    if dist == "uniform":
        v = rng.uniform(0.01, 5.0, 20_000)
    elif dist == "lognormal":
        v = rng.lognormal(-1.0, 1.0, 20_000)
    else:
        v = np.concatenate([rng.normal(0.2, 0.01, 19_000), rng.normal(7.0, 0.5, 1_000)])
        v = np.abs(v)
    h = Histogram(resolution=0.001)
    for x in v:
        h.record(float(x))
    assert h.count == len(v)
    for q in (50, 90, 99, 99.9):
        exact = float(np.percentile(v, q, method="inverted_cdf"))
        got = h.percentile(q)
        assert got is not None
        assert abs(got - exact) <= exact / SUB + 0.001, (q, got, exact)
    assert h.max == pytest.approx(float(v.max()))
    s = h.summary()
    assert set(s) == {"p50", "p99", "max"}


def test_empty_single_and_negative() -> None:
    h = Histogram()
    assert h.percentile(50) is None and h.summary() == {"p50": None, "p99": None, "max": None}
    h.record(3.0)
    assert h.percentile(50) == 3.0 and h.percentile(99) == 3.0  # clamped to [min, max]
    h.record(-0.5)  # early wake-up: counted as 0 in buckets, min keeps it
    assert h.min == -0.5 and h.count == 2
    assert h.percentile(1) is not None and h.percentile(1) <= 0.001  # type: ignore[operator]
    h.record(float("nan"))
    assert h.count == 2


def test_merge_and_reset() -> None:
    a, b = Histogram(), Histogram()
    for x in range(1, 101):
        a.record(float(x))
        b.record(float(x) + 100)
    a.merge(b)
    assert a.count == 200 and a.max == 200.0
    assert abs(a.percentile(50) - 100.0) <= 100.0 / SUB  # type: ignore[operator]
    a.reset()
    assert a.count == 0 and a.percentile(50) is None
