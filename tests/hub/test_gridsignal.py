"""The simulated plant's signal cache (drivers/emulated/simulated.py `GridSignal`).

The cache evaluates the scenario in blocks on its 1 kHz grid, as Python lists, a whole
block for a signal read often and a few grid points for one read rarely. Whatever path
served it, a value must be the scenario's own grid values interpolated, and an injected
anomaly must show from the next read.
"""

from __future__ import annotations

import numpy as np
import pytest

from drivers.emulated.scenario import Anomaly, Scenario
from drivers.emulated.simulated import GridSignal


def _expected(fn: object, t: float) -> np.ndarray:
    """The scenario at the grid points around t, interpolated linearly."""
    k = np.floor(t * 1000.0)
    grid = np.asarray(fn((k + np.arange(2.0)) / 1000.0), dtype=np.float64)  # type: ignore[operator]
    frac = t * 1000.0 - k
    return grid[0] + (grid[1] - grid[0]) * frac


@pytest.mark.parametrize("gap_s", [0.005, 0.2, 1.0])  # 200 Hz (blocks), 5 Hz and 1 Hz (few)
def test_values_are_the_scenarios_grid_interpolated(gap_s: float) -> None:
    sc = Scenario(seed=7)
    vib = GridSignal(sc.vibration_g, sc).vec3()
    temp = GridSignal(sc.cabinet_temp_c, sc).scalar()
    for i in range(40):
        t = 3.0 + i * gap_s + 0.00037  # between grid points
        np.testing.assert_allclose(vib(t), _expected(sc.vibration_g, t), rtol=0, atol=1e-9)
        assert temp(t) == pytest.approx(float(_expected(sc.cabinet_temp_c, t)), abs=1e-9)


def test_an_injected_anomaly_shows_from_the_next_read() -> None:
    sc = Scenario(seed=7)
    vib = GridSignal(sc.vibration_g, sc).vec3()
    before = [vib(2.0 + i * 0.005) for i in range(10)]  # a block is cached past 2.05 s
    sc.add_anomaly(Anomaly(kind="bearing_wear", start_s=0.0, duration_s=100.0, severity=2.0))
    t = 2.0 + 10 * 0.005
    after = vib(t)
    np.testing.assert_allclose(after, _expected(sc.vibration_g, t), rtol=0, atol=1e-9)
    # and the anomaly did change the signal (the check above is not vacuous)
    clean = Scenario(seed=7)
    assert np.max(np.abs(np.subtract(after, _expected(clean.vibration_g, t)))) > 1e-3
    assert len(before) == 10
