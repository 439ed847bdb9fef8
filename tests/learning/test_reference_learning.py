"""The shipped reference model's learning fields, and a calibration on its real graph."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgerund.inference.calibration import (
    CalibrationRefused,
    FitInput,
    apply_normalization,
    check_must_detect,
    check_policy,
    fit_calibration,
)
from edgerund.inference.drift import DriftConfig, DriftMonitor, feature_channels
from edgerund.inference.errors import ModelError
from edgerund.inference.manifest import load_manifest, parse_manifest
from edgerund.inference.session import open_session
from tests.inference.conftest import REF

ROOT = Path(__file__).resolve().parents[2]


def build_module() -> Any:
    spec = importlib.util.spec_from_file_location("models_build", ROOT / "models" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["models_build"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ref() -> Any:
    man = load_manifest(REF, check_files=True)
    sess = open_session(REF / "model.onnx")

    def scorer(x: np.ndarray) -> np.ndarray:
        rows = np.asarray(x, np.float32)
        return np.array([sess.run(["score"], {"features": r[None, :]})[0][0] for r in rows])

    return man, scorer


def test_shipped_manifest_has_profile_policy_and_must_detect(ref: Any) -> None:
    man, _ = ref
    assert man.profile is not None and man.profile.n_features == 50
    assert man.profile.samples == 1000
    assert 0.8 < man.profile.score_quantiles[0.5] < 1.2
    assert man.profile.score_quantiles[0.999] < man.threshold
    assert man.adaptation is not None and "normalization" in man.adaptation.parameters
    assert man.must_detect is not None
    kinds = {(c["kind"], c["severity"]) for c in man.must_detect.cases}
    assert {("bearing_wear", 0.5), ("bearing_wear", 1.0), ("overheat", 1.0)} <= kinds


def test_older_manifest_without_the_fields_still_loads() -> None:
    doc = json.loads((REF / "manifest.json").read_text())
    for k in ("reference_profile", "adaptation", "must_detect"):
        doc.pop(k)
    man = parse_manifest(json.dumps(doc).encode())
    assert man.profile is None and man.adaptation is None and man.must_detect is None


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d["reference_profile"]["features"].update(mean=[0.0] * 3), "features.mean"),
        (lambda d: d["reference_profile"]["features"]["std"].__setitem__(0, 0.0), "features.std"),
        (lambda d: d["adaptation"].update(max_shift_sd="big"), "adaptation.max_shift_sd"),
        (lambda d: d["adaptation"].update(parameters=["weights"]), "adaptation.parameters"),
        (lambda d: d["must_detect"].update(file="../x.npz"), "must_detect.file"),
    ],
)
def test_bad_learning_fields_are_refused_naming_the_field(edit: Any, where: str) -> None:
    doc = json.loads((REF / "manifest.json").read_text())
    edit(doc)
    with pytest.raises(ModelError) as ei:
        parse_manifest(json.dumps(doc).encode())
    assert where in str(ei.value)


def test_shipped_must_detect_vectors_are_detected(ref: Any) -> None:
    man, scorer = ref
    g = np.load(REF / man.must_detect.file)
    out = check_must_detect(
        g[man.must_detect.features],
        g[man.must_detect.case],
        man.must_detect.cases,
        mean=man.preprocessing.mean,
        std=man.preprocessing.std,
        threshold=man.threshold,
        scorer=scorer,
    )
    assert len(out) == len(man.must_detect.cases)


@pytest.mark.timeout(300)
def test_gain_drift_on_the_real_model_is_detected_and_calibrated_away(ref: Any) -> None:
    """An accelerometer whose gain rose 40 %: the reference model false-alarms on a
    healthy plant; the monitor reports drift; the calibration fit inside the signed policy
    brings the false alarms back under 1 % and keeps every must-detect vector detected."""
    man, scorer = ref
    b = build_module()
    spec = man.preprocessing

    def windows(draw: int, n: int) -> Any:
        w = b.sample_windows(42, n, t_min_s=1000.0, t_max_s=1000.0 + 3600.0, draw_seed=draw)
        w.accel *= 1.4
        return w

    fit_w = windows(90, 1200)
    x = b.features(spec, fit_w).astype(np.float64)
    s = scorer(x)
    assert float((s > man.threshold).mean()) > 0.3  # the static model false-alarms

    names, channels = feature_channels(50, 3, 16, "accel_g", ("temp_c", "current_a"))
    mon = DriftMonitor(
        man.profile,
        man.threshold,
        names=names,
        channels=channels,
        config=DriftConfig(block=50, anomaly_max_blocks=5),
    )
    blocks = []
    for i in range(0, 1200, 50):
        rep = mon.feed_block(x[i : i + 50], s[i : i + 50], float(i))
        blocks.append((x[i : i + 50], s[i : i + 50], rep.state))
    assert rep.state == "drift", rep.to_json()
    assert rep.moved and all(d["feature"].startswith("accel_g") for d in rep.moved[:4])

    cal = fit_calibration(
        FitInput(blocks),
        profile=man.profile,
        policy=man.adaptation,
        mean0=spec.mean,
        std0=spec.std,
        threshold0=man.threshold,
        scorer=scorer,
        names=names,
    )
    check_policy(cal, man.adaptation)
    g = np.load(REF / "golden.npz")
    check_must_detect(
        g["must_detect_raw"],
        g["must_detect_case"],
        man.must_detect.cases,
        mean=cal.mean,
        std=cal.std,
        threshold=cal.threshold,
        scorer=scorer,
    )
    xt = b.features(spec, windows(91, 400)).astype(np.float64)
    after = scorer(apply_normalization(xt, spec.mean, spec.std, cal.mean, cal.std))
    assert float((after > cal.threshold).mean()) <= 0.01
    # a too-tight policy refuses the same fit with a reason
    from dataclasses import replace

    with pytest.raises(CalibrationRefused) as ei:
        check_policy(cal, replace(man.adaptation, max_shift_sd=0.5))
    assert ei.value.reason == "shift_out_of_bounds"
