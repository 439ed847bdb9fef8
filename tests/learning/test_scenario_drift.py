"""The simulator's drift kinds: what each changes, seeded and reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.emulated.scenario import DRIFT_KINDS, Anomaly, Scenario

T = np.arange(0.0, 4000.0, 0.5)


def test_gain_drift_scales_every_axis_by_the_gain() -> None:
    base = Scenario(3)
    s = Scenario(3, [Anomaly("gain_drift", 100.0, 1e6, severity=0.5)])
    t = np.array([50.0, 200.0, 300.5])
    ratio = s.vibration_g(t) / base.vibration_g(t)
    np.testing.assert_allclose(ratio[0], 1.0)
    np.testing.assert_allclose(ratio[1:], 1.2)  # 1 + 0.4 x 0.5


def test_ambient_rise_ramps_in_and_holds() -> None:
    base = Scenario(3)
    s = Scenario(3, [Anomaly("ambient_rise", 0.0, 1e6, severity=1.0)])
    d = s.cabinet_temp_c(np.array([0.0, 900.0, 1800.0, 3600.0])) - base.cabinet_temp_c(
        np.array([0.0, 900.0, 1800.0, 3600.0])
    )
    np.testing.assert_allclose(d, [0.0, 4.0, 8.0, 8.0], atol=1e-9)


def test_slow_bearing_severity_ramps_over_thirty_minutes() -> None:
    """The defect tone grows with time: at 5 min a sixth of the 30-min amplitude."""
    s = Scenario(4, [Anomaly("slow_bearing", 0.0, 1e6, severity=1.0)])
    full = Scenario(4, [Anomaly("bearing_wear", 0.0, 1e6, severity=1.0)])
    base = Scenario(4)
    t5 = 300.0 + np.arange(2000) / 1000.0
    t30 = 1800.0 + np.arange(2000) / 1000.0
    e5 = s.vibration_g(t5) - base.vibration_g(t5)
    e30 = s.vibration_g(t30) - base.vibration_g(t30)
    np.testing.assert_allclose(e30, full.vibration_g(t30) - base.vibration_g(t30), atol=1e-12)
    assert 0.1 < np.abs(e5).mean() / np.abs(e30).mean() < 0.25


def test_resonance_shift_moves_energy_from_1x_to_2x() -> None:
    base = Scenario(6)
    s = Scenario(6, [Anomaly("resonance_shift", 0.0, 1e6, severity=1.0)])
    t = np.arange(8192) / 1000.0
    shaft = float(base.shaft_hz(t).mean())
    freqs = np.fft.rfftfreq(t.size, 1e-3)

    def peak(sc: Scenario, f: float) -> float:
        spec = np.abs(np.fft.rfft(sc.vibration_g(t)[:, 0] * np.hanning(t.size)))
        return float(spec[np.abs(freqs - f) < 0.5].max())

    assert peak(s, shaft) < 0.8 * peak(base, shaft)
    assert peak(s, 2 * shaft) > 2.0 * peak(base, 2 * shaft)


def test_load_profile_raises_current_and_keeps_the_shaft_speed() -> None:
    base = Scenario(8)
    s = Scenario(8, [Anomaly("load_profile", 0.0, 1e6, severity=1.0)])
    np.testing.assert_allclose(s.motor_current_a(T) - base.motor_current_a(T), 0.36, atol=0.2)
    np.testing.assert_allclose(s.shaft_hz(T), base.shaft_hz(T), atol=1e-9)


@pytest.mark.parametrize("kind", DRIFT_KINDS)
def test_drifts_are_reproducible(kind: str) -> None:
    a = Scenario(9, [Anomaly(kind, 10.0, 100.0)])  # type: ignore[arg-type]
    b = Scenario(9, [Anomaly(kind, 10.0, 100.0)])  # type: ignore[arg-type]
    t = np.linspace(0.0, 200.0, 5000)
    for name in ("vibration_g", "cabinet_temp_c", "motor_current_a"):
        assert np.array_equal(getattr(a, name)(t), getattr(b, name)(t))
