"""Jitter invariance of the shipped model: a busy gateway must not raise false alarms.

The plant (drivers/emulated/scenario.py, seed 42: the simulator's) is sampled here
independently of models/build.py, the way a heavily loaded gateway samples it: reads at
irregular instants (random gaps of 2-15 ms, or 200 Hz deadlines served up to 10 ms late
with overrun deadlines skipped), each returning the MPU-6050's newest 1 kHz sample (its
own clock phase), quantised at +-4 g as simulate.yaml configures it, and stamped with
the read's completion time like the hub's t_mono. Through the real ModelRunner with those
timestamps, normal windows must score below the manifest threshold and a worn bearing
above it. Taking the same samples as evenly spaced (no timestamps: what model 1.0.0 did)
must score normal windows clearly higher (with random gaps: as anomalous), so this test
can tell the difference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from drivers.emulated.scenario import Anomaly, Scenario
from edgerund.inference.runner import ModelRunner
from tests.inference.conftest import REF

N_WINDOWS = 24
LSB_PER_G = 8192.0  # +-4 g, as simulate.yaml configures the MPU-6050


def _gaps(rng: np.random.Generator) -> np.ndarray:
    """Read instants (s from the window's start): independent gaps uniform in 2-15 ms."""
    return np.cumsum(rng.uniform(2.0, 15.0, 256)) / 1000.0


def _late_polls(rng: np.random.Generator) -> np.ndarray:
    """200 Hz deadlines, each read up to 10 ms late; a read that ends a whole period or
    more behind skips the deadlines it overran (the hub's rule)."""
    out: list[float] = []
    prev = -1.0
    k = 0
    while len(out) < 256:
        deadline = k * 0.005
        k += 1
        if prev - deadline >= 0.005:
            continue  # overrun: skipped
        prev = max(deadline + rng.uniform(0.0, 0.010), prev + 0.0002)
        out.append(prev)
    return np.asarray(out)


def _windows(
    anomalies: list[Anomaly], schedule: Callable[[np.random.Generator], np.ndarray], seed: int
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    sc = Scenario(42, anomalies)
    rng = np.random.default_rng(seed)
    out = []
    for t0 in np.sort(rng.uniform(1000.0, 80000.0, N_WINDOWS)):
        reads = t0 + schedule(rng)
        phase = rng.uniform(0.0, 0.001)  # the MPU-6050's own 1 kHz sample clock
        sampled = np.floor((reads - phase) * 1000.0) / 1000.0 + phase  # newest sample
        g = sc.vibration_g(sampled)
        accel = (np.clip(np.rint(g * LSB_PER_G), -32768, 32767) / LSB_PER_G).astype(np.float32)
        stamps = reads + rng.uniform(0.00005, 0.0005, reads.size)  # read completion
        for i in range(1, stamps.size):  # reads are stored one after the other
            stamps[i] = max(stamps[i], stamps[i - 1] + 0.00005)
        t_end = float(reads[-1])
        inputs = {
            "accel_g": accel,
            "temp_c": np.array([sc.cabinet_temp_c(t_end)[0]], np.float32),
            "current_a": np.array([sc.motor_current_a(t_end)[0]], np.float32),
        }
        out.append((inputs, {"accel_g": stamps + 7.0e5}))  # t_mono of a gateway up 8 days
    return out


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.load(REF, warmup_runs=5)


@pytest.mark.parametrize("schedule", [_gaps, _late_polls], ids=["gaps_2_15ms", "late_0_10ms"])
def test_heavy_timing_jitter_keeps_normal_below_and_bearing_wear_above(
    runner: ModelRunner, schedule: Callable[[np.random.Generator], np.ndarray]
) -> None:
    thr = runner.threshold
    normal = [runner.infer(x, t) for x, t in _windows([], schedule, seed=1)]
    worn = [
        runner.infer(x, t)
        for x, t in _windows([Anomaly("bearing_wear", 0.0, 1e9)], schedule, seed=2)
    ]
    assert all(r.ok for r in normal + worn), [r.fault for r in normal + worn if not r.ok]
    s_normal = np.array([r.score for r in normal])
    s_worn = np.array([r.score for r in worn])
    assert s_normal.max() < thr, f"false alarms: {np.sort(s_normal)[-5:]} vs threshold {thr}"
    assert s_worn.min() > thr, f"missed: {np.sort(s_worn)[:5]} vs threshold {thr}"
    # the margin: normal stays well inside, a worn bearing well outside
    assert np.median(s_normal) < 0.6 * thr and np.median(s_worn) > 2 * thr

    # the same samples taken as evenly spaced (no timestamps): the jitter's phase noise
    # pushes normal windows up (with random 2-15 ms gaps far over the threshold: the
    # false alarm this fixes), so the timestamps are what keeps them normal
    before = runner.untimed
    untimed = np.array([runner.infer(x).score for x, _t in _windows([], schedule, seed=1)])
    assert runner.untimed == before + N_WINDOWS
    assert np.median(untimed) > 1.4 * np.median(s_normal), np.sort(untimed)
    if schedule is _gaps:
        assert np.median(untimed) > thr, f"untimed normal scores {np.sort(untimed)}"
