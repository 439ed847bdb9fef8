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
