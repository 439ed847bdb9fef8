"""The declared preprocessing: tones land in the right band, gravity is ignored, the
normalisation uses the manifest's statistics, bad parameters are refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgerund.inference.features import FeatureError, FeatureSpec, Preprocessor, band_energies

EDGES = tuple(1 + 8 * i for i in range(17))
N = 3 * 16 + 2


def _spec(**kw: object) -> FeatureSpec:
    base = FeatureSpec(
        vibration_input="accel_g",
        window=256,
        axes=3,
        sample_rate_hz=200.0,
        band_edges_bin=EDGES,
        log_floor=1e-10,
        scalars=("temp_c", "current_a"),
        mean=(0.0,) * N,
        std=(1.0,) * N,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _tone(f_hz: float, amp: float = 0.05, axis: int = 0) -> np.ndarray:
    t = np.arange(256) / 200.0
    x = np.zeros((256, 3), np.float32)
    x[:, axis] = amp * np.sin(2 * np.pi * f_hz * t)
    x[:, 2] += 1.0  # gravity
    return x


@pytest.mark.parametrize(("f_hz", "band"), [(16.4, 2), (32.8, 5), (58.6, 9), (89.1, 14)])
def test_tone_lands_in_its_band(f_hz: float, band: int) -> None:
    spec = _spec()
    assert spec.band_edges_hz()[band][0] <= f_hz < spec.band_edges_hz()[band][1]
    e = band_energies(_tone(f_hz), EDGES, 1e-10).reshape(3, 16)
    assert int(np.argmax(e[0])) == band
    assert e[0, band] > e[0].max(initial=-99, where=np.arange(16) != band) + 1.0  # 10x more
    # The other axes carry no signal (z only gravity, removed with the mean).
    assert np.allclose(e[1], -10.0) and e[2].max() < -9.0


def test_offset_does_not_change_features_and_amplitude_does() -> None:
    x = _tone(40.0)
    a = band_energies(x, EDGES, 1e-10)
    b = band_energies(x + np.float32(0.25), EDGES, 1e-10)
    assert np.allclose(a, b, atol=1e-4)
    c = band_energies(_tone(40.0, amp=0.1), EDGES, 1e-10)
    band = (int(40.0 / 200 * 256) - 1) // 8
    assert c[band] - a[band] == pytest.approx(np.log10(4.0), abs=1e-6)  # energy ~ amp^2


def test_preprocessor_normalises_with_manifest_stats() -> None:
    rng = np.random.default_rng(1)
    mean = rng.normal(size=N)
    std = rng.uniform(0.5, 2.0, size=N)
    pre = Preprocessor(_spec(mean=tuple(mean), std=tuple(std)))
    x = _tone(58.6) + rng.normal(0, 0.01, (256, 3)).astype(np.float32)
    inputs = {"accel_g": x, "temp_c": np.array([31.5]), "current_a": np.array([3.9, 4.2])}
    out = pre(inputs)
    assert out.shape == (1, N) and out.dtype == np.float32
    raw = np.r_[band_energies(x, EDGES, 1e-10), 31.5, 4.2]  # the newest scalar value
    assert np.allclose(out[0], (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert np.allclose(pre.raw_features(inputs), raw)
    # Same input, same output: the buffer is reused, not accumulated into.
    assert np.array_equal(pre(inputs).copy(), pre(inputs))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"std": (0.0,) * N}, "std: every value must be > 0"),
        ({"band_edges_bin": (1, 9, 9, 20)}, "strictly increasing"),
        ({"band_edges_bin": (1, 100, 200)}, "within [0, 129]"),
        ({"mean": (0.0,) * 3}, "mean: 50 values expected"),
        ({"log_floor": 0.0}, "log_floor"),
        ({"kind": "mfcc/1"}, "kind"),
    ],
)
def test_bad_parameters_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(FeatureError) as ei:
        _spec(**kw).validate()
    assert needle in str(ei.value)


def test_json_roundtrip_and_missing_key() -> None:
    spec = _spec()
    assert FeatureSpec.from_json(spec.to_json()) == spec
    d = spec.to_json()
    del d["window"]
    with pytest.raises(FeatureError, match=r"preprocessing.window: missing"):
        FeatureSpec.from_json(d)


# -- fft_band_energy/2: resampling on sample timestamps ------------------------------------

TIMED = {"kind": "fft_band_energy/2", "resample": "linear", "max_gap_ms": 50.0}


def _jittered_times(rng: np.random.Generator, lo_ms: float, hi_ms: float) -> np.ndarray:
    """256 timestamps (s) with independent gaps uniform in [lo_ms, hi_ms], at a large
    monotonic-clock offset (a gateway up for weeks)."""
    return 2.5e6 + np.cumsum(rng.uniform(lo_ms, hi_ms, 256)) / 1000.0


def _tones_at(t: np.ndarray) -> np.ndarray:
    """Shaft-like 1x and 2x tones sampled at the instants t, plus gravity on z."""
    x = np.zeros((t.size, 3), np.float64)
    x[:, 0] = 0.045 * np.sin(2 * np.pi * 16.4 * t) + 0.015 * np.sin(2 * np.pi * 32.8 * t + 1)
    x[:, 1] = 0.045 * np.cos(2 * np.pi * 16.4 * t)
    x[:, 2] = 1.0 + 0.01 * np.sin(2 * np.pi * 16.4 * t + 2)
    return x.astype(np.float32)


def test_resampling_on_timestamps_undoes_timing_jitter() -> None:
    """The same tones read at jittered instants: with their timestamps the band energies
    match the evenly sampled window's; taken as evenly spaced (kind /1) they do not."""
    pre = Preprocessor(_spec(**TIMED))
    rng = np.random.default_rng(7)
    t_even = 2.5e6 + np.arange(256) / 200.0
    ref = pre.raw_features({"accel_g": _tones_at(t_even), "temp_c": [20.0], "current_a": [3.0]})
    t_jit = _jittered_times(rng, 1.0, 9.0)
    x_jit = _tones_at(t_jit)
    timed = pre.raw_features(
        {"accel_g": x_jit, "temp_c": [20.0], "current_a": [3.0]}, {"accel_g": t_jit}
    )
    untimed = pre.raw_features({"accel_g": x_jit, "temp_c": [20.0], "current_a": [3.0]})
    # the bands holding the tones (x: 1x band 2, 2x band 5; y: 1x) keep their energy
    # (log10; linear interpolation attenuates the 33 Hz tone a little over 1-9 ms gaps)
    tone_bands = [2, 5, 16 + 2]
    assert np.max(np.abs(timed[tone_bands] - ref[tone_bands])) < 0.2
    # without timestamps the jitter is phase noise that smears the tones over every band;
    # with them the empty bands stay > 3.5 decades below the 1x tone, >10x below untimed
    empty = list(range(6, 16)) + list(range(16 + 6, 32))
    assert np.median(timed[empty]) < timed[2] - 3.5
    assert np.median(untimed[empty]) > np.median(timed[empty]) + 1.0


def test_evenly_spaced_timestamps_are_the_identity() -> None:
    """Timestamps exactly on the grid change nothing: kind /2 == kind /1 (to float rounding)."""
    x = _tones_at(np.arange(256) / 200.0)
    inputs = {"accel_g": x, "temp_c": [20.0], "current_a": [3.0]}
    a = Preprocessor(_spec()).raw_features(inputs)
    b = Preprocessor(_spec(**TIMED)).raw_features(
        inputs, {"accel_g": 1234.5 + np.arange(256) / 200.0}
    )
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # float rounding of the grid only


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: np.r_[t[:100], t[99], t[101:]], "strictly increasing"),  # duplicated stamp
        (lambda t: np.r_[t[:100], t[100] - 0.01, t[101:]], "strictly increasing"),  # backwards
        (lambda t: np.where(np.arange(256) >= 200, t + 0.06, t), "gap of 6"),  # 65 ms stall
        (lambda t: t[-1] - (255 - np.arange(256)) / 400.0, "covers 637.5 ms"),  # 400 Hz sensor
        (lambda t: np.r_[t[:10], np.nan, t[11:]], "non-finite"),
        (lambda t: t[:255], "256 expected"),
    ],
)
def test_bad_timestamps_are_an_input_fault(mutate: object, needle: str) -> None:
    pre = Preprocessor(_spec(**TIMED))
    t = 100.0 + np.arange(256) / 200.0
    inputs = {"accel_g": _tones_at(t), "temp_c": [20.0], "current_a": [3.0]}
    with pytest.raises(FeatureError, match=needle):
        pre(inputs, {"accel_g": mutate(t)})  # type: ignore[operator]


def test_one_dropped_sample_is_interpolated_over() -> None:
    """A single missing read (a 10 ms gap) is within max_gap_ms and barely moves the tones."""
    pre = Preprocessor(_spec(**TIMED))
    t_full = 50.0 + np.arange(257) / 200.0
    t = np.delete(t_full, 128)
    ref = pre.raw_features({"accel_g": _tones_at(t_full[1:]), "temp_c": [1.0], "current_a": [1.0]})
    got = pre.raw_features(
        {"accel_g": _tones_at(t), "temp_c": [1.0], "current_a": [1.0]}, {"accel_g": t}
    )
    assert np.max(np.abs(got[[2, 5, 18]] - ref[[2, 5, 18]])) < 0.02


def test_timed_spec_json_roundtrip_and_validation() -> None:
    spec = _spec(**TIMED)
    d = spec.to_json()
    assert d["kind"] == "fft_band_energy/2" and d["resample"]["max_gap_ms"] == 50.0
    assert FeatureSpec.from_json(d) == spec
    del d["resample"]
    with pytest.raises(FeatureError, match=r"preprocessing\.resample: missing"):
        FeatureSpec.from_json(d)
    with pytest.raises(FeatureError, match="max_gap_ms"):
        _spec(**{**TIMED, "max_gap_ms": 2.0}).validate()  # shorter than a 5 ms period
    with pytest.raises(FeatureError, match=r"resample\.method"):
        _spec(**{**TIMED, "resample": "cubic"}).validate()


def test_a_sensor_read_far_below_the_rate_is_an_input_fault() -> None:
    """At 60 Hz only ~77 samples fall in the 1.275 s grid: under min_density (40 % of 256),
    the upper bands would be interpolation only: refused. At 120 Hz (60 %) it is used."""
    pre = Preprocessor(_spec(**TIMED, min_density=0.4))
    for rate, ok in ((60.0, False), (120.0, True)):
        t = 10.0 + np.arange(256) / rate
        inputs = {"accel_g": _tones_at(t), "temp_c": [20.0], "current_a": [3.0]}
        if ok:
            assert np.isfinite(pre(inputs, {"accel_g": t})).all()
        else:
            with pytest.raises(FeatureError, match=r"77 samples in the last 1275 ms, at least 103"):
                pre(inputs, {"accel_g": t})
