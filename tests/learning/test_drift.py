"""The drift monitor tells drift, anomaly and sensor fault apart, with few false alarms."""

from __future__ import annotations

import numpy as np
import pytest

from edgerund.inference.drift import (
    DriftConfig,
    DriftMonitor,
    arl0_blocks,
    feature_channels,
    psi,
)
from edgerund.inference.profile import ReferenceProfile

N = 50
LEVELS = (0.5, 0.9, 0.95, 0.99, 0.999)


def scores_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.lognormal(0.0, 0.3, n)


def make_profile() -> ReferenceProfile:
    s = scores_normal(np.random.default_rng(0), 200_000)
    return ReferenceProfile(
        samples=1000,
        mean=(0.0,) * N,
        std=(1.0,) * N,
        quantiles={},
        score_mean=float(s.mean()),
        score_std=float(s.std()),
        score_quantiles={q: float(np.quantile(s, q)) for q in LEVELS},
    )


def monitor(**kw: object) -> DriftMonitor:
    names, channels = feature_channels(N, 3, 16, "accel_g", ("temp_c", "current_a"))
    return DriftMonitor(
        make_profile(),
        threshold=4.0,
        names=names,
        channels=channels,
        vibration_channels=("accel_g.x", "accel_g.y", "accel_g.z"),
        config=DriftConfig(**kw),  # type: ignore[arg-type]
    )


def block(rng: np.random.Generator, n: int = 100, shift: np.ndarray | None = None) -> tuple:
    # rows of N(0, 1) with a block-common component so block means have unit-ish variance
    common = rng.normal(0.0, 1.0, N)
    xs = common + rng.normal(0.0, 0.3, (n, N))
    if shift is not None:
        xs = xs + shift
    return xs, scores_normal(rng, n)


def test_no_false_drift_on_in_control_data() -> None:
    """8,000 blocks whose means are N(0, 1) per feature: the quorum CUSUM never alarms
    (per feature and side the ARL0 with k=0.5, h=8 is ~1.9e4 blocks; the quorum of 4
    features needs several at once)."""
    assert arl0_blocks(0.5, 8.0) > 1.5e4
    m = monitor()
    rng = np.random.default_rng(1)
    states = set()
    for i in range(8_000):
        xs, s = block(rng, n=4)
        states.add(m.feed_block(xs, s, float(i)).state)
    assert states == {"ok"}


def test_arl_formula_matches_simulation_for_a_sensitive_cusum() -> None:
    """With k=0.5, h=3 the formula says ~ 117 blocks; a simulated run length agrees."""
    rng = np.random.default_rng(2)
    runs = []
    for _ in range(300):
        s, n = 0.0, 0
        while s <= 3.0:
            s = max(0.0, s + rng.normal() - 0.5)
            n += 1
        runs.append(n)
    want = arl0_blocks(0.5, 3.0)
    assert 0.7 * want < np.mean(runs) < 1.3 * want


def test_step_drift_detected_named_and_cleared() -> None:
    m = monitor()
    rng = np.random.default_rng(3)
    shift = np.zeros(N)
    shift[[0, 5, 17, 33, 40]] = 3.0  # five features move by 3 sd
    t_drift = None
    for i in range(40):
        rep = m.feed_block(*block(rng, shift=shift), float(i))
        if rep.state == "drift" and t_drift is None:
            t_drift = i
    assert t_drift is not None and t_drift < 20
    moved = {d["feature"] for d in m.report().moved}
    assert {"accel_g.x.band0", "accel_g.x.band5", "accel_g.y.band1"} <= moved
    assert all(d["shift_sd"] > 1.5 for d in m.report().moved)
    for i in range(40, 120):  # back to the profile: the capped CUSUM lets it clear
        rep = m.feed_block(*block(rng), float(i))
    assert rep.state == "ok"


def test_one_moving_feature_is_not_drift() -> None:
    """The daily temperature cycle moves one feature for hours: below the quorum."""
    m = monitor()
    rng = np.random.default_rng(4)
    shift = np.zeros(N)
    shift[48] = 4.0
    states = {m.feed_block(*block(rng, shift=shift), float(i)).state for i in range(200)}
    assert states == {"ok"}
    assert m.report().n_moved == 1


def test_score_distribution_shift_is_drift() -> None:
    m = monitor()
    rng = np.random.default_rng(5)
    states = []
    for i in range(60):
        xs, s = block(rng)
        states.append(m.feed_block(xs, s * 1.8, float(i)).state)
    assert states[-1] == "drift"
    assert "PSI" in m.report().reason


def test_anomaly_blocks_are_anomaly_and_not_learned() -> None:
    m = monitor()
    rng = np.random.default_rng(6)
    for i in range(5):
        m.feed_block(*block(rng), float(i))
    count = m.count
    xs, _ = block(rng)
    rep = m.feed_block(xs, np.full(100, 9.0), 5.0)
    assert rep.state == "anomaly" and m.count == count  # kept out of the statistics
    for i in range(6, 60):  # sustained, but the features are where the profile says
        rep = m.feed_block(block(rng)[0], np.full(100, 9.0), float(i))
    assert rep.state == "anomaly" and m.count == count


def test_sustained_broad_shift_with_trips_becomes_drift_after_the_anomaly_window() -> None:
    m = monitor(anomaly_max_blocks=10)
    rng = np.random.default_rng(8)
    states = []
    for i in range(30):  # a gain step: every band up 3 sd and the model trips
        xs, _ = block(rng, shift=np.r_[np.full(48, 3.0), 0.0, 0.0])
        states.append(m.feed_block(xs, np.full(100, 9.0), float(i)).state)
    assert states[:10] == ["anomaly"] * 10
    assert states[-1] == "drift" and "above the threshold" in m.report().reason


@pytest.mark.parametrize("kind", ["stuck", "flat", "out_of_range"])
def test_sensor_fault_names_the_channel(kind: str) -> None:
    m = monitor()
    rng = np.random.default_rng(7)
    xs, s = block(rng)
    if kind == "stuck":
        xs[:, 16:32] = -25.0 + rng.normal(0, 0.1, (100, 16))  # y axis at the log floor
        want = "accel_g.y"
    elif kind == "flat":
        xs[:, 32:48] = xs[0, 32:48]
        want = "accel_g.z"
    else:
        xs[:, 48] = 40.0
        want = "temp_c"
    rep = m.feed_block(xs, s, 1.0)
    assert rep.state == "sensor_fault" and rep.channel == want, rep.to_json()
    assert m.count == 0


def test_psi_zero_for_expected_and_large_for_shift() -> None:
    assert psi([50, 40, 5, 4, 1], [0.5, 0.4, 0.05, 0.04, 0.01]) < 1e-3
    assert psi([0, 10, 10, 40, 40], [0.5, 0.4, 0.05, 0.04, 0.01]) > 1.0
