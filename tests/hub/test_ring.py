"""Ring buffers: windows are the newest samples, oldest first, copies, across wrap-around."""

from __future__ import annotations

import numpy as np
import pytest

from edgerund.hub.ring import Ring


@pytest.mark.parametrize("pushed", [0, 1, 5, 7, 8, 9, 23, 64])
@pytest.mark.parametrize("n", [1, 3, 8, 100])
def test_window_matches_reference(pushed: int, n: int) -> None:
    r = Ring(8)
    ref: list[tuple[float, float]] = []
    for i in range(pushed):
        r.push(float(i), float(i) * 10.0)
        ref.append((float(i), float(i) * 10.0))
    t, v = r.window(n)
    want = ref[-n:] if ref else []
    assert t.tolist() == [a for a, _ in want][-min(n, 8) :]
    assert v.tolist() == [b for _, b in want][-min(n, 8) :]
    assert len(r) == min(pushed, 8)


def test_window_is_a_copy() -> None:
    r = Ring(4)
    for i in range(4):
        r.push(float(i), float(i))
    _t, v = r.window(4)
    r.push(9.0, 9.0)
    assert v.tolist() == [0.0, 1.0, 2.0, 3.0]
    v[0] = 42.0
    assert r.window(4)[1].tolist() == [1.0, 2.0, 3.0, 9.0]


def test_times_since_counts_recent() -> None:
    r = Ring(16)
    for i in range(40):
        r.push(float(i), 0.0)
    assert sorted(r.times_since(35.5).tolist()) == [36.0, 37.0, 38.0, 39.0]
    assert r.times_since(100.0).size == 0


def test_push_allocates_nothing() -> None:
    r = Ring(1024)
    t_before = r._t
    for i in range(5000):
        r.push(float(i), float(i))
    assert r._t is t_before and r._t.dtype == np.float64
    assert r.count == 5000


def test_zero_capacity_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Ring(0)


def test_between_selects_by_time_across_wrap_around() -> None:
    r = Ring(5)
    for i in range(8):  # keeps 3..7
        r.push(1000.0 * i, float(i))
    t, v = r.between(2000.0, 6000.0)
    assert t.tolist() == [3000.0, 4000.0, 5000.0, 6000.0] and v.tolist() == [3.0, 4.0, 5.0, 6.0]
    assert r.between(8000.0, 9000.0)[0].size == 0
    t[0] = -1.0  # a copy: the ring is unchanged
    assert r.between(3000.0, 3000.0)[0].tolist() == [3000.0]
