"""Output-layer refit: the derived hidden-output session, the closed-form fit, the
escalation from a refused calibration, its policy bound, the must-detect guard and the
overlay that carries it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgerund.inference import outlayer
from edgerund.inference.adapt import hidden_scorer_for, output_layer_input, scorer_for
from edgerund.inference.calibration import (
    CalibrationRefused,
    FitInput,
    MustDetect,
    OutputLayer,
    OutputLayerInput,
    apply_normalization,
    calibrate,
    make_overlay,
    overlay_digest,
    refit_scorer,
    verify_overlay,
)
from edgerund.inference.manifest import load_manifest
from edgerund.inference.profile import AdaptationPolicy, ReferenceProfile, parse_output_layer
from tests.inference.conftest import REF
from tests.learning.test_calibration import SoftSigner

# -- the shipped model: the derived session, the shipped layer ------------------------------


def test_derived_session_outputs_the_hidden_layer_of_the_signed_model() -> None:
    man = load_manifest(REF, check_files=True)
    ol = man.output_layer
    assert ol is not None and ol.hidden_size == 512
    data = (REF / man.model_file).read_bytes()
    assert hashlib.sha256(data).hexdigest() == man.model_sha256  # the model file as signed
    g = np.load(REF / "golden.npz")
    x = g["features"].astype(np.float64)
    plain = scorer_for(REF / man.model_file)(x)
    s, h = hidden_scorer_for(data, ol.hidden_tensor, ol.hidden_size)(x)
    np.testing.assert_array_equal(s, plain)  # the same graph, one more output
    assert h.shape == (len(x), 512) and (h >= 0).all() and h.max() > 0  # ReLU activations
    # the shipped float layer reproduces the graph's score up to the reconstruction's
    # int8 rounding (within the golden tolerance)
    mine = outlayer.scores(x, h, g[ol.weights], g[ol.bias])
    np.testing.assert_allclose(mine, plain, rtol=0.02, atol=0.1)


def test_output_layer_field_is_optional_and_checked() -> None:
    assert parse_output_layer(None, "m") is None
    ok = {"hidden_tensor": "t", "hidden_size": 4, "file": "g.npz", "weights": "w", "bias": "b"}
    assert parse_output_layer(ok, "m") is not None
    for bad, field in (
        ({**ok, "file": "../x.npz"}, "output_layer.file"),
        ({**ok, "hidden_size": 0}, "output_layer.hidden_size"),
        ({**ok, "weights": 3}, "output_layer.weights"),
    ):
        with pytest.raises(Exception, match=field):
            parse_output_layer(bad, "m")
    from edgerund.inference.profile import parse_adaptation

    old = parse_adaptation({"parameters": ["normalization", "threshold"]}, "m")
    assert old is not None and old.max_output_change == 1.0  # older manifests load


# -- the closed form ---------------------------------------------------------------------------


def test_refit_recovers_the_layer_and_the_ridge_pulls_towards_the_signed_one() -> None:
    rng = np.random.default_rng(5)
    h = np.maximum(rng.normal(0.0, 1.0, (3000, 24)), 0.0)
    w_true, b_true = rng.normal(0.0, 1.0, (24, 6)), rng.normal(0.0, 1.0, 6)
    y = h @ w_true + b_true + rng.normal(0.0, 0.01, (3000, 6))
    w0, b0 = w_true + rng.normal(0.0, 0.5, w_true.shape), b_true - 1.0
    w, b, ch = outlayer.refit(h, y, w0, b0, ridge=1e-6)
    np.testing.assert_allclose(w, w_true, atol=0.01)
    np.testing.assert_allclose(b, b_true, atol=0.01)
    assert ch == pytest.approx(outlayer.change(w, b, w0, b0))
    w, b, ch = outlayer.refit(h, y, w0, b0, ridge=1e6)
    np.testing.assert_allclose(w, w0, atol=0.01)  # weights stay; the bias is not penalised
    assert ch < outlayer.change(w_true, b_true, w0, b0)


# -- escalation, bounds, guard -------------------------------------------------------------

F, H = 10, 48
RNG = np.random.default_rng(11)
ENC = RNG.normal(0.0, 0.6, (F + 1, H))
MU = np.zeros(F)
M0, S0 = np.linspace(5.0, 14.0, F), np.linspace(0.5, 2.0, F)


def _h(x: np.ndarray) -> np.ndarray:
    # like the reference model, the encoder sees the input clipped to the training envelope
    xc = np.clip(x, -3.0, 3.0)
    return np.maximum(np.hstack([xc, np.ones((len(x), 1))]) @ ENC, 0.0)


def hidden(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in autoencoder with its hidden output: (scores, h)."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    h = _h(x)
    return outlayer.scores(x, h, W0, B0), h


def _signed_layer() -> tuple[np.ndarray, np.ndarray]:
    x = RNG.normal(0.0, 1.0, (4000, F))
    h = _h(x)
    a = np.linalg.lstsq(np.hstack([h, np.ones((len(h), 1))]), x, rcond=None)[0]
    return a[:-1], a[-1]


W0, B0 = _signed_layer()
REF_SCORES = hidden(RNG.normal(0.0, 1.0, (4000, F)))[0]
THR = float(1.5 * np.quantile(REF_SCORES, 0.999))
PROFILE = ReferenceProfile(
    samples=4000,
    mean=tuple(MU),
    std=tuple(np.ones(F)),
    quantiles={},
    score_mean=float(REF_SCORES.mean()),
    score_std=float(REF_SCORES.std()),
    score_quantiles={q: float(np.quantile(REF_SCORES, q)) for q in (0.5, 0.9, 0.99, 0.999)},
)
ALL = ("normalization", "threshold", "output_layer")
# a short window's 99.9 % quantile is noisy: room for it, the tests are about the layer
POL = AdaptationPolicy(parameters=ALL, min_samples=500, max_threshold_ratio=2.0)


def score(x: np.ndarray) -> np.ndarray:
    return hidden(x)[0]


def drifted(shift_sd: np.ndarray, seed: int) -> FitInput:
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(10):
        x = rng.normal(0.0, 1.0, (100, F)) + shift_sd  # under the signed normalisation
        blocks.append((x, score(x), "drift"))
    return FitInput(blocks)


def run(data: FitInput, policy: AdaptationPolicy, md: MustDetect | None = None):  # type: ignore[no-untyped-def]
    return calibrate(
        data,
        profile=PROFILE,
        policy=policy,
        mean0=M0,
        std0=S0,
        threshold0=THR,
        scorer=score,
        must_detect=md,
        output_layer=OutputLayerInput(hidden, W0, B0),
    )


SHIFT = np.zeros(F)
SHIFT[0] = 5.5  # beyond max_shift_sd 4


def test_a_shift_beyond_the_bound_is_refused_without_the_refit_and_absorbed_with_it() -> None:
    data = drifted(SHIFT, 1)
    with pytest.raises(CalibrationRefused) as ei:
        run(data, AdaptationPolicy(min_samples=500))  # the shipped default parameters
    assert ei.value.reason == "shift_out_of_bounds"
    policy = POL
    cal, _ = run(data, policy)
    assert cal.output_layer is not None
    assert max(abs(d) for d in cal.shift_sd) == pytest.approx(4.0)  # clipped to the bound
    assert 0.0 < cal.output_layer.change <= policy.max_output_change
    fresh = np.concatenate([b[0] for b in drifted(SHIFT, 2).blocks])
    x1 = apply_normalization(fresh, M0, S0, cal.mean, cal.std)
    static = float((score(fresh) > THR).mean())
    shift_only = float((score(x1) > THR).mean())
    after = float((refit_scorer(cal.output_layer, hidden)(x1) > cal.threshold).mean())
    print(f"false alarms: static {static:.3f}, shift only {shift_only:.3f}, refit {after:.3f}")
    assert static > 0.5 and after <= 0.01, (static, shift_only, after)
    # a shift inside the bound never refits: the plain calibration suffices
    small = np.zeros(F)
    small[0] = 3.0
    plain, _ = run(drifted(small, 3), policy)
    assert plain.output_layer is None


def test_the_output_change_is_bounded_by_the_policy() -> None:
    policy = AdaptationPolicy(
        parameters=ALL, min_samples=500, max_threshold_ratio=2.0, max_output_change=1e-4
    )
    with pytest.raises(CalibrationRefused) as ei:
        run(drifted(SHIFT, 4), policy)
    assert ei.value.reason == "output_layer_out_of_bounds"
    assert "shift_out_of_bounds" in str(ei.value)  # and why the refit was tried


def test_must_detect_guard_refuses_a_refit_that_absorbs_a_fault() -> None:
    # the known fault is the very signature of the drift: feature 0 up by 5.5 sd
    fault = np.zeros((2, F))
    fault[:, 0] = 5.5
    fault[1, 1] = 0.3
    raw = fault * S0 + M0
    md = MustDetect(raw, np.array([0, 0]), [{"kind": "bearing_wear", "severity": 1.0}])
    assert (score(fault) > THR).all()  # detected by the signed model
    with pytest.raises(CalibrationRefused) as ei:
        run(drifted(SHIFT, 5), POL, md)
    assert ei.value.reason == "must_detect_lost"
    # a fault elsewhere stays detected under the refit: accepted
    other = np.zeros((1, F))
    other[0, 5] = 9.0
    ok = MustDetect(other * S0 + M0, np.array([0]), [{"kind": "overheat", "severity": 1.0}])
    cal, must = run(drifted(SHIFT, 5), POL, ok)
    assert cal.output_layer is not None and must["overheat@1.0"]["min_score"] > cal.threshold


def test_overlay_carries_the_layer_and_verification_recomputes_its_change() -> None:
    policy = POL
    cal, _ = run(drifted(SHIFT, 6), policy)
    assert cal.output_layer is not None
    signer, msha = SoftSigner(), b"\x11" * 32
    doc = make_overlay(
        cal,
        model="m",
        base_version="2.0.0",
        seq=1,
        manifest_sha256=msha,
        policy=policy,
        device_key_id=signer.key_id,
        created=1.0,
    )
    doc = json.loads(json.dumps(doc))  # as stored
    assert np.asarray(doc["output_layer"]["weights"]).shape == (H, F)
    pem = signer.public_key_pem()

    def verify(d: dict, layer0: tuple | None = (W0, B0)) -> None:  # type: ignore[type-arg]
        sig = asyncio.run(signer.sign_digest(overlay_digest(d)))
        verify_overlay(
            d,
            sig,
            pem,
            manifest_sha256=msha,
            policy=policy,
            threshold0=THR,
            output_layer0=layer0,
        )

    verify(doc)
    # the runtime reads back exactly the float32 weights the threshold was fitted with
    np.testing.assert_array_equal(
        np.asarray(doc["output_layer"]["weights"], np.float32), cal.output_layer.weights
    )
    # validly signed but far from the signed layer; the declared change lies: refused
    far = json.loads(json.dumps(doc))
    far["output_layer"]["weights"] = (np.asarray(far["output_layer"]["weights"]) * 5).tolist()
    with pytest.raises(CalibrationRefused) as ei:
        verify(far)
    assert ei.value.reason == "output_layer_out_of_bounds"
    with pytest.raises(CalibrationRefused) as ei:
        verify(doc, layer0=None)  # a model that ships no layer to refit
    assert ei.value.reason == "overlay_format"


def test_dry_run_inputs_from_the_shipped_manifest() -> None:
    man = load_manifest(REF, check_files=True)
    assert man.adaptation is not None and "output_layer" in man.adaptation.parameters
    ol = output_layer_input(man, REF)
    assert ol is not None and ol.weights.shape == (512, man.preprocessing.n_features)


def test_runner_scores_with_a_refit_output_layer() -> None:
    from edgerund.inference.runner import ModelRunner

    runner = ModelRunner.load(REF, warmup_runs=2)
    g = np.load(REF / "golden.npz")
    feeds = [runner._golden_inputs(g, i) for i in range(len(g["score_int8"]))]
    times = [runner._golden_times(g, i) for i in range(len(feeds))]
    signed = [runner.infer(f, t).score for f, t in zip(feeds, times, strict=True)]
    w0, b0 = g["output_layer_w"], g["output_layer_b"]
    runner.use_output_layer(w0, b0)  # the signed layer: the same scores, up to int8 rounding
    same = [runner.infer(f, t) for f, t in zip(feeds, times, strict=True)]
    assert all(r.ok for r in same)
    np.testing.assert_allclose([r.score for r in same], signed, rtol=0.02, atol=0.1)
    # a different layer: exactly the module's formula on the derived session's activations
    b1 = b0 + 0.05
    runner.use_output_layer(w0, b1)
    man = runner.manifest
    assert man.output_layer is not None
    hid = hidden_scorer_for(
        (REF / man.model_file).read_bytes(), man.output_layer.hidden_tensor, 512
    )
    _, h = hid(g["features"].astype(np.float64))
    want = outlayer.scores(g["features"], h, w0, b1)
    got = [runner.infer(f, t).score for f, t in zip(feeds, times, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    with pytest.raises(Exception, match="shapes"):
        runner.use_output_layer(w0[:10], b0)


def test_a_refit_overlay_through_the_slot_checks_precheck_and_runner(tmp_path: Path) -> None:
    """The gate's pieces on the shipped model with an overlay that refits its output
    layer: the device check compares it with the signed layer shipped beside the model
    (and refuses it when that layer is not given: fail closed), the precheck scores the
    must-detect vectors through the refit layer, and the runner scores with it."""
    import dataclasses
    import shutil

    from edgerund.inference.adapt import forced_calibration
    from edgerund.inference.overlay import (
        OVERLAY_FILE,
        OVERLAY_SIG,
        check_must_detect_under,
        check_overlay,
        overlay_bytes,
    )
    from edgerund.inference.runner import ModelRunner

    d = tmp_path / "slot"
    shutil.copytree(REF, d)
    runner = ModelRunner.load(d, warmup_runs=1)
    man = runner.manifest
    assert man.output_layer is not None and man.adaptation is not None
    fitted = forced_calibration(runner, shift_sd=0.0)  # the signed normalisation
    with np.load(d / man.output_layer.file) as g:
        w0, b0 = g[man.output_layer.weights], g[man.output_layer.bias]
    b1 = np.asarray(b0, np.float64) + 0.05
    layer = OutputLayer(w0.astype(np.float64), b1, outlayer.change(w0, b1, w0, b0))
    assert 0 < layer.change <= man.adaptation.max_output_change
    cal = dataclasses.replace(fitted.calibration, output_layer=layer)
    signer = SoftSigner()
    doc = make_overlay(
        cal,
        model=man.name,
        base_version=man.version,
        seq=1,
        manifest_sha256=man.sha256,
        policy=man.adaptation,
        device_key_id=signer.key_id,
        created=1.0,
    )
    doc = json.loads(overlay_bytes(doc))
    sig = asyncio.run(signer.sign_digest(overlay_digest(doc)))
    pem = signer.public_key_pem()
    assert check_overlay(doc, sig, man, pem, d) == 1
    with pytest.raises(CalibrationRefused) as ei:
        check_overlay(doc, sig, man, pem)  # without the signed layer: refused
    assert ei.value.reason == "overlay_format"

    plain = dict(doc)
    plain.pop("output_layer")
    (d / OVERLAY_FILE).write_bytes(overlay_bytes(plain))
    (d / OVERLAY_SIG).write_bytes(b"unused by the precheck's scoring")
    plain_must = check_must_detect_under(d)
    (d / OVERLAY_FILE).write_bytes(overlay_bytes(doc))
    (d / OVERLAY_SIG).write_bytes(sig)
    refit_must = check_must_detect_under(d)
    assert refit_must.keys() == plain_must.keys() and refit_must
    moved = [k for k in refit_must if refit_must[k]["min_score"] != plain_must[k]["min_score"]]
    assert moved, "the must-detect vectors were not scored through the refit layer"

    calibrated = ModelRunner.load(d, warmup_runs=1)
    assert calibrated.version == f"{man.version}+cal.1" and calibrated._head is not None
    with np.load(d / "golden.npz") as g:
        feed, times = calibrated._golden_inputs(g, 0), calibrated._golden_times(g, 0)
    a = calibrated.infer(feed, times)
    b = runner.infer(feed, times)
    assert a.ok and b.ok and a.score != pytest.approx(b.score, rel=1e-6)
