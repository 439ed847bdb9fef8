"""Calibration fit, policy bounds, must-detect guard and the device-signed overlay."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from edgerund.inference.calibration import (
    CalibrationRefused,
    FitInput,
    apply_normalization,
    check_must_detect,
    check_policy,
    fit_calibration,
    make_overlay,
    overlay_digest,
    verify_overlay,
)
from edgerund.inference.profile import AdaptationPolicy, ReferenceProfile

F = 10
MU = np.linspace(-1.0, 1.0, F)
SD = np.full(F, 1.0)
M0 = np.linspace(5.0, 14.0, F)  # the signed preprocessing (raw -> normalised)
S0 = np.linspace(0.5, 2.0, F)
THR = 4.0


def scorer(x: np.ndarray) -> np.ndarray:
    """A stand-in model: mean squared deviation from the reference mean."""
    return ((np.atleast_2d(x) - MU) ** 2).mean(axis=1)


PROFILE = ReferenceProfile(
    samples=1000,
    mean=tuple(MU),
    std=tuple(SD),
    quantiles={},
    score_mean=1.0,
    score_std=0.45,
    score_quantiles={0.5: 0.93, 0.9: 1.6, 0.99: 2.3, 0.999: 2.9},
)
POLICY = AdaptationPolicy(min_samples=500, max_shift_sd=4.0, max_threshold_ratio=1.5)


def live_blocks(rng: np.random.Generator, shift_raw: np.ndarray, n_blocks: int = 10) -> FitInput:
    """Raw windows of a drifted plant, normalised with the signed (M0, S0)."""
    blocks = []
    for _ in range(n_blocks):
        x_ref = MU + rng.normal(0.0, 1.0, (100, F))
        raw = x_ref * S0 + M0 + shift_raw
        x = (raw - M0) / S0
        blocks.append((x, scorer(x), "drift"))
    return FitInput(blocks)


def fit(data: FitInput, policy: AdaptationPolicy = POLICY):  # type: ignore[no-untyped-def]
    return fit_calibration(
        data, profile=PROFILE, policy=policy, mean0=M0, std0=S0, threshold0=THR, scorer=scorer
    )


def test_fit_undoes_a_shift_and_restores_the_false_alarm_rate() -> None:
    rng = np.random.default_rng(1)
    shift = np.zeros(F)
    shift[:4] = 3.0 * S0[:4]  # four features moved by 3 sd
    data = live_blocks(rng, shift)
    cal = fit(data)
    assert cal.false_alarm_before > 0.3
    np.testing.assert_allclose(cal.shift_sd[:4], 3.0, atol=0.15)
    np.testing.assert_allclose(cal.shift_sd[4:], 0.0, atol=0.15)
    check_policy(cal, POLICY)
    # fresh windows of the same drifted plant under the calibrated normalisation
    fresh = np.concatenate([b[0] for b in live_blocks(rng, shift).blocks])
    x1 = apply_normalization(fresh, M0, S0, cal.mean, cal.std)
    assert float((scorer(x1) > cal.threshold).mean()) <= 0.01
    assert 0.7 < cal.threshold_ratio < 1.5


def test_anomalous_and_heavy_tail_blocks_are_excluded() -> None:
    rng = np.random.default_rng(2)
    data = live_blocks(rng, np.zeros(F), n_blocks=8)
    x = data.blocks[0][0]
    bad = [(x, np.full(100, 9.0), "anomaly"), (x + 6.0, scorer(x + 6.0), "drift")]
    cal = fit(FitInput([*data.blocks, *bad]))
    assert cal.excluded_blocks == 2 and cal.samples == 800
    with pytest.raises(CalibrationRefused) as ei:
        fit(FitInput(bad))
    assert ei.value.reason == "too_few_samples"


@pytest.mark.parametrize(
    ("shift_sd", "reason"), [(6.0, "shift_out_of_bounds"), (0.0, "threshold_out_of_bounds")]
)
def test_policy_refuses_outside_the_bounds(shift_sd: float, reason: str) -> None:
    rng = np.random.default_rng(3)
    shift = np.zeros(F)
    shift[0] = shift_sd * S0[0]
    cal = fit(live_blocks(rng, shift))
    policy = POLICY
    if reason == "threshold_out_of_bounds":
        policy = AdaptationPolicy(min_samples=500, max_threshold_ratio=1.01)
    with pytest.raises(CalibrationRefused) as ei:
        check_policy(cal, policy)
    assert ei.value.reason == reason


def test_must_detect_guard_refuses_a_calibration_that_unlearns_a_fault() -> None:
    # a fault signature: feature 0 up by 4 sd (raw), detected under the signed calibration
    fault_x = MU.copy()
    fault_x[0] += 7.0
    raw = (fault_x * S0 + M0)[None, :]
    case = np.array([0])
    cases = [{"kind": "bearing_wear", "severity": 1.0}]
    ok = check_must_detect(raw, case, cases, mean=M0, std=S0, threshold=THR, scorer=scorer)
    assert ok["bearing_wear@1.0"]["min_score"] > THR
    # a "calibration" that shifts feature 0 by the fault's own signature absorbs it
    m_bad = M0.copy()
    m_bad[0] += 7.0 * S0[0]
    with pytest.raises(CalibrationRefused) as ei:
        check_must_detect(raw, case, cases, mean=m_bad, std=S0, threshold=THR, scorer=scorer)
    assert ei.value.reason == "must_detect_lost" and "bearing_wear@1.0" in str(ei.value)


class SoftSigner:
    kind = "software"
    key_id = "dev-1"

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def public_key_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    async def sign_digest(self, digest: bytes) -> bytes:
        return self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_overlay_signed_by_the_device_verifies_and_tampering_is_refused() -> None:
    rng = np.random.default_rng(4)
    shift = np.zeros(F)
    shift[:3] = 1.5 * S0[:3]
    cal = fit(live_blocks(rng, shift))
    signer = SoftSigner()
    msha = b"\x11" * 32
    doc = make_overlay(
        cal,
        model="motor-ae",
        base_version="2.0.0",
        seq=1,
        manifest_sha256=msha,
        policy=POLICY,
        device_key_id=signer.key_id,
        created=1.0,
    )
    assert doc["version"] == "2.0.0+cal.1"
    sig = asyncio.run(signer.sign_digest(overlay_digest(doc)))
    pem = signer.public_key_pem()
    verify_overlay(doc, sig, pem, manifest_sha256=msha, policy=POLICY, threshold0=THR)

    def refused(d: dict, key: str = pem, m: bytes = msha, s: bytes = sig) -> str:  # type: ignore[type-arg]
        with pytest.raises(CalibrationRefused) as ei:
            verify_overlay(d, s, key, manifest_sha256=m, policy=POLICY, threshold0=THR)
        return ei.value.reason

    assert refused({**doc, "threshold": doc["threshold"] * 3}) == "overlay_signature"
    assert refused(doc, key=SoftSigner().public_key_pem()) == "overlay_signature"
    assert refused(doc, m=b"\x22" * 32) == "overlay_binding"
    # a validly signed overlay outside the policy (a compromised device process, a policy
    # tightened by a later bundle) is refused at verification too
    wide = {**doc, "shift_sd": [9.0, *doc["shift_sd"][1:]]}
    wsig = asyncio.run(signer.sign_digest(overlay_digest(wide)))
    assert refused(wide, s=wsig) == "shift_out_of_bounds"
