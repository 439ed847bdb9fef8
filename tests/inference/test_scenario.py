"""The shared plant generator: deterministic, call-pattern independent, anomalies local."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.emulated.scenario import AFFECTS, ANOMALY_KINDS, Anomaly, Scenario

SIGNALS = (
    "vibration_g",
    "angular_rate_dps",
    "motor_current_a",
    "cabinet_temp_c",
    "humidity_pct",
    "pressure_pa",
    "battery_v",
    "battery_a",
)

T = np.concatenate([np.arange(0, 5, 0.005), np.arange(3600, 3700, 0.37)])


def _all(s: Scenario, t: np.ndarray) -> dict[str, np.ndarray]:
    return {name: getattr(s, name)(t) for name in SIGNALS}


def test_same_seed_same_signals_other_seed_differs() -> None:
    a, b, c = _all(Scenario(7), T), _all(Scenario(7), T), _all(Scenario(8), T)
    for name in SIGNALS:
        assert np.array_equal(a[name], b[name]), name
        assert not np.array_equal(a[name], c[name]), name
    assert Scenario(7).gps(12.5) == Scenario(7).gps(12.5)
    assert Scenario(7).gps(12.5) != Scenario(8).gps(12.5)


def test_one_read_at_a_time_equals_one_vectorised_call() -> None:
    """The emulators read single samples at 200 Hz; the build reads whole windows."""
    s = Scenario(3)
    t = 100.0 + np.arange(64) / 200.0
    batch = _all(s, t)
    for name in SIGNALS:
        single = np.stack([getattr(s, name)(np.array([x]))[0] for x in t])
        assert np.array_equal(batch[name], single), name
    # Scalars are accepted too.
    assert np.array_equal(s.cabinet_temp_c(float(t[5])), batch["cabinet_temp_c"][5:6])


def test_shapes_units_and_plausible_ranges() -> None:
    s = Scenario(1)
    t = np.arange(0, 60, 0.005)
    v = s.vibration_g(t)
    assert v.shape == (t.size, 3)
    assert abs(v[:, 2].mean() - 1.0) < 0.01  # gravity on z
    assert 0.01 < v[:, 0].std() < 0.1
    assert s.angular_rate_dps(t).shape == (t.size, 3)
    day = np.arange(0, 86400, 60.0)
    temp = s.cabinet_temp_c(day)
    assert 18 < temp.min() < temp.max() < 40
    assert temp.max() - temp.min() > 6  # a daily swing
    assert ((s.humidity_pct(day) > 0) & (s.humidity_pct(day) < 100)).all()
    assert 99_000 < s.pressure_pa(day).mean() < 103_500
    assert 12.0 < s.battery_v(day).min() < s.battery_v(day).max() < 13.6
    current = s.battery_a(np.arange(0, 600, 1.0))
    assert len(np.unique(np.round(current))) >= 3  # load steps
    assert (s.motor_current_a(t) > 1.0).all()
    fix = s.gps(30.0)
    assert abs(fix.lat_deg - 52.52) < 0.01 and fix.fix_quality == 1 and 0 <= fix.course_deg < 360
    with pytest.raises(ValueError, match="1-D"):
        s.vibration_g(np.zeros((2, 2)))


def test_shaft_and_bearing_tones() -> None:
    """Healthy: 1x and 2x dominate. Worn: BPFO/BPFI tones appear and the floor rises."""
    fs, n = 200.0, 4096
    t = 50.0 + np.arange(n) / fs
    healthy = Scenario(5)
    worn = Scenario(5, [Anomaly("bearing_wear", 0.0, 1000.0)])
    shaft = float(healthy.shaft_hz(t).mean())
    freqs = np.fft.rfftfreq(n, 1 / fs)

    def spec(s: Scenario) -> np.ndarray:
        x = s.vibration_g(t)[:, 0]
        return np.abs(np.fft.rfft((x - x.mean()) * np.hanning(n)))

    h, w = spec(healthy), spec(worn)

    def peak(sp: np.ndarray, f: float) -> float:
        band = np.abs(freqs - f) < 0.6
        return float(sp[band].max())

    floor_h = float(np.median(h))
    assert peak(h, shaft) > 50 * floor_h and peak(h, 2 * shaft) > 10 * floor_h
    for mult in (3.57, 5.43):  # BPFO, BPFI
        assert peak(w, mult * shaft) > 10 * peak(h, mult * shaft)
    assert np.median(w) > 2 * floor_h  # raised broadband noise
    # Severity scales the defect.
    mild = Scenario(5, [Anomaly("bearing_wear", 0.0, 1000.0, severity=0.3)])
    assert peak(h, 3.57 * shaft) < peak(spec(mild), 3.57 * shaft) < peak(w, 3.57 * shaft)


@pytest.mark.parametrize("kind", [k for k in ANOMALY_KINDS if k != "dropout"])
def test_anomaly_changes_only_its_signals_only_while_active(kind: str) -> None:
    base = Scenario(11)
    a = Anomaly(kind, start_s=1.0, duration_s=2.0)  # type: ignore[arg-type]
    hurt = Scenario(11, [a])
    ref, got = _all(base, T), _all(hurt, T)
    inside = (T >= 1.0) & (T < 3.0)
    for name in SIGNALS:
        same = np.array_equal(ref[name], got[name])
        if name in AFFECTS[kind]:
            assert not same, f"{kind} must change {name}"
            assert np.array_equal(ref[name][~inside], got[name][~inside]), name
        else:
            assert same, f"{kind} must not change {name}"
    assert base.gps(2.0) == hurt.gps(2.0)


def test_overheat_ramps_up_to_severity_and_back() -> None:
    s0 = Scenario(2)
    s = Scenario(2, [Anomaly("overheat", start_s=100.0, duration_s=2000.0, severity=0.5)])
    t = np.array([50.0, 100.0, 250.0, 1000.0, 2050.0, 2099.0, 2200.0])
    d = s.cabinet_temp_c(t) - s0.cabinet_temp_c(t)
    assert d[0] == 0 and d[-1] == 0
    assert d[1] < 0.1 < d[2] < d[3]
    assert d[3] == pytest.approx(7.5, abs=1e-9)  # 15 degC x 0.5 on the plateau
    assert d[5] < d[4] < d[3]
    assert (s.humidity_pct(t[3:4]) < s0.humidity_pct(t[3:4])).all()


def test_voltage_sag_lowers_voltage() -> None:
    s0, s = Scenario(4), Scenario(4, [Anomaly("voltage_sag", 10.0, 30.0, severity=1.0)])
    t = np.arange(10.0, 40.0, 0.5)
    drop = s0.battery_v(t) - s.battery_v(t)
    assert (drop >= 1.0).all() and (drop < 2.0).all()


def test_dropout_and_runtime_injection() -> None:
    s = Scenario(9)
    assert not s.is_dropout("imu", 5.0) and s.active_anomalies(5.0) == []
    before = s.vibration_g(T)
    s.add_anomaly(Anomaly("dropout", start_s=4.0, duration_s=2.0, sensor="imu"))
    assert s.is_dropout("imu", 5.0) and not s.is_dropout("imu", 6.0)
    assert not s.is_dropout("env", 5.0)
    assert [a.kind for a in s.active_anomalies(5.0)] == ["dropout"]
    assert np.array_equal(before, s.vibration_g(T))  # signals unchanged: the device is silent
    s.add_anomaly(Anomaly("dropout", start_s=10.0, duration_s=1.0))  # every device
    assert s.is_dropout("env", 10.5) and s.is_dropout("gps", 10.5)
    s.add_anomaly(Anomaly("bearing_wear", start_s=0.0, duration_s=100.0))
    assert not np.array_equal(before, s.vibration_g(T))


def test_invalid_anomalies_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        Anomaly("melting", 0.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duration_s"):
        Anomaly("overheat", 0.0, 0.0)
    with pytest.raises(ValueError, match="severity"):
        Anomaly("overheat", 0.0, 1.0, severity=-1.0)
