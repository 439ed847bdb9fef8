"""On-device calibration: fit, policy bounds, must-detect check, and the signed overlay.

Theory of operation
-------------------
A drifted plant (a sensor whose gain changed, a warmer season, a new load profile) moves
the model's input features away from what the publisher trained on; the autoencoder then
reconstructs them badly and the gateway drifts into false alarms. Most such drifts are a
*shift* of the log band energies (a gain g adds 2 log10 g to every band of an axis) or of
a scalar input, so the cheapest faithful correction is per feature affine, before the
model: the calibration replaces the manifest's normalisation `(r - m0) / s0` by
`(r - m') / s'` such that the live normal windows land where the reference profile says
normal is, and refits the score threshold at the manifest's target false-alarm quantile.

Fit (numpy only, pure; the caller runs it off the event loop):
- input: normalised feature rows `xs` the model saw (under the current normalisation)
  with their `scores`, grouped in blocks labelled by the drift monitor; anomaly and
  sensor-fault blocks are excluded, and so are blocks whose score p99 *under a first
  fit* exceeds `max_tail_ratio` x the profile's p99 (a heavy tail the shift does not
  explain may be a beginning fault); then the fit is redone on what is left.
- shift: per feature `d = median(x) - mu_ref` (robust to the odd noisy window), zero
  when |d| <= DEADBAND_SD (0.75 reference sd: a short window's time-of-day offset); with
  `fit_scale`, also the scale ratio `c = sd(x) / sd_ref` (off by default: a short
  window's spread understates the daily cycle the profile includes).
  Then `s' = s0 * c` and `m' = m0 + s0 * (mu_ref * (1 - c) + d)`, so that
  `(r - m') / s' = (x - d - mu_ref) / c + mu_ref` maps the live median onto `mu_ref`.
- threshold: `threshold_margin x quantile(score', 1 - target_false_alarm)` of the
  calibrated scores of the kept windows (the rule the build used), but never below the
  signed threshold (a site's short window is less diverse than the validation set).

Policy (the manifest's signed `adaptation`): refused with a reason when the parameters
are not allowed, fewer than `min_samples` windows were kept, any |d| exceeds
`max_shift_sd` reference sd, any c is outside [1/max_scale_ratio, max_scale_ratio], or
the threshold ratio to the signed threshold is outside [1/r, r].

Output layer (when the policy's `parameters` include "output_layer" and the manifest ships
the layer): only if the normalisation-and-threshold calibration above is refused (a
shift beyond `max_shift_sd`, a threshold beyond its ratio, a must-detect vector lost),
`calibrate` tries again with the shift clipped to the bound (the normalisation takes
what the policy allows) and the autoencoder's output layer refit in closed form on the
kept windows, the rest (edgerund.inference.outlayer: ridge towards the signed layer,
change bounded by `max_output_change`); that calibration goes through the same policy
and must-detect checks, its score is `sum((x - (h W' + b'))^2)`. The plainest
correction that works is the one used: a refit is never made when a shift suffices.

Never unlearn a known fault: every must-detect vector (raw feature vectors of synthesised
faults, shipped in golden.npz) must still score above the new threshold under the new
normalisation; otherwise the calibration is refused naming the case.

Overlay (format `edgerund.calibration/1`, JSON beside the unchanged publisher-signed
model files): the model's name, base version, the SHA-256 of the model manifest it
calibrates, the new normalisation (`mean`, `std` as float32-rounded lists), the new
`threshold`, `samples`, what changed (largest shifts), the policy it was checked
against, and with a refit `output_layer` {`weights` (H x F), `bias`, `change`}, float32
values (~0.3 MB of JSON for the reference model). It is signed by the device identity key (`ports.Signer`, ECDSA P-256) over
`SHA-256(b"edgerund-calibration-v1\\x00" + canonical JSON)`; `verify_overlay` checks the
signature against the device's public key, the binding to the model manifest and the
policy again (a start-up re-verification needs all three).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.inference import outlayer
from edgerund.inference.profile import AdaptationPolicy, ReferenceProfile

__all__ = [
    "OVERLAY_FORMAT",
    "OVERLAY_TAG",
    "Calibration",
    "CalibrationRefused",
    "FitInput",
    "MustDetect",
    "OutputLayer",
    "OutputLayerInput",
    "apply_normalization",
    "calibrate",
    "check_must_detect",
    "check_policy",
    "fit_calibration",
    "make_overlay",
    "overlay_digest",
    "overlay_layer",
    "verify_overlay",
]

OVERLAY_FORMAT = "edgerund.calibration/1"
OVERLAY_TAG = b"edgerund-calibration-v1\x00"
F64 = npt.NDArray[np.float64]
Scorer = Callable[[F64], F64]  # normalised feature rows -> scores (the model)
# normalised feature rows -> (the model's scores, the last hidden layer's activations)
HiddenScorer = Callable[[F64], tuple[F64, F64]]


class CalibrationRefused(Exception):
    """A calibration that may not be used; `reason` is a short code, str() explains."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FitInput:
    """Blocks of normalised feature rows with their scores and the monitor's labels."""

    blocks: Sequence[tuple[F64, F64, str]]  # (xs, scores, state) per block


@dataclass(frozen=True)
class OutputLayer:
    """A refit output layer: reconstruction = h @ weights + bias (float32 values)."""

    weights: F64  # (H, F)
    bias: F64  # (F,)
    change: float  # ||[W; b] - [W0; b0]||_F / ||[W0; b0]||_F

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": [[_f32(v) for v in row] for row in self.weights],
            "bias": [_f32(v) for v in self.bias],
            "change": round(self.change, 6),
        }


def _f32(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (compact JSON)."""
    return float(str(np.float32(v)))


@dataclass(frozen=True)
class OutputLayerInput:
    """What a refit needs: the session with the hidden output, the signed layer."""

    hidden: HiddenScorer
    weights: F64
    bias: F64


@dataclass(frozen=True)
class MustDetect:
    raw: F64
    case: npt.NDArray[Any]
    cases: Sequence[Mapping[str, Any]]


@dataclass
class Calibration:
    mean: tuple[float, ...]  # the new preprocessing mean (raw feature space)
    std: tuple[float, ...]
    threshold: float
    shift_sd: tuple[float, ...]  # d per feature, reference sd
    scale: tuple[float, ...]  # c per feature
    samples: int
    excluded_blocks: int
    threshold_ratio: float
    false_alarm_before: float
    false_alarm_after: float
    changes: list[dict[str, Any]] = field(default_factory=list)
    output_layer: OutputLayer | None = None

    def summary(self) -> dict[str, Any]:
        extra = (
            {}
            if self.output_layer is None
            else {"output_change": round(self.output_layer.change, 4)}
        )
        return {
            **extra,
            "threshold": self.threshold,
            "threshold_ratio": round(self.threshold_ratio, 4),
            "samples": self.samples,
            "excluded_blocks": self.excluded_blocks,
            "max_shift_sd": round(max(abs(d) for d in self.shift_sd), 3),
            "false_alarm_before": round(self.false_alarm_before, 5),
            "false_alarm_after": round(self.false_alarm_after, 5),
            "changes": self.changes,
        }


Vec = Sequence[float] | F64


def apply_normalization(x: F64, m0: Vec, s0: Vec, m1: Vec, s1: Vec) -> F64:
    """Rows normalised with (m0, s0) re-expressed under (m1, s1): raw = x s0 + m0."""
    raw = np.asarray(x, np.float64) * np.asarray(s0, np.float64) + np.asarray(m0, np.float64)
    out: F64 = (raw - np.asarray(m1, np.float64)) / np.asarray(s1, np.float64)
    return out


def _select(data: FitInput) -> tuple[list[tuple[F64, F64]], int]:
    """Blocks usable for fitting: not anomaly or sensor-fault blocks, finite scores."""
    keep: list[tuple[F64, F64]] = []
    excluded = 0
    for xs, scores, state in data.blocks:
        s = np.asarray(scores, np.float64)
        if state in ("anomaly", "sensor_fault") or not np.isfinite(s).all():
            excluded += 1
            continue
        keep.append((np.asarray(xs, np.float64), s))
    return keep, excluded


DEADBAND_SD = 0.75


def _shift_fit(
    x: F64, profile: ReferenceProfile, m0: F64, s0: F64, fit_scale: bool, clip: float | None
) -> tuple[F64, F64, F64, F64]:
    mu = np.asarray(profile.mean)
    sd = np.asarray(profile.std)
    d = (np.median(x, axis=0) - mu) / sd  # reference sd
    # A feature whose median sits within DEADBAND_SD of the profile's mean is left alone:
    # the profile spans days, a fitting window minutes, so a small offset is the time of
    # day (the temperature's daily swing is about +-1.4 sd), not a drift to remove.
    d = np.where(np.abs(d) > DEADBAND_SD, d, 0.0)
    if clip is not None:  # with an output-layer refit: the layer takes the rest
        d = np.clip(d, -clip, clip)
    c = np.ones_like(d)
    if fit_scale:
        c = np.maximum(x.std(axis=0), 1e-9) / sd
    s1 = (s0 * c).astype(np.float32).astype(np.float64)
    m1 = (m0 + s0 * (mu * (1.0 - c) + d * sd)).astype(np.float32).astype(np.float64)
    return d, c, m1, s1


def fit_calibration(
    data: FitInput,
    *,
    profile: ReferenceProfile,
    policy: AdaptationPolicy,
    mean0: Sequence[float],
    std0: Sequence[float],
    threshold0: float,
    scorer: Scorer,
    fit_scale: bool = False,
    top: int = 8,
    names: Sequence[str] | None = None,
    refit: OutputLayerInput | None = None,
) -> Calibration:
    """Fit (unchecked against the policy: see `check_policy`). Raises CalibrationRefused
    when there is not enough usable data. With `refit`, the shift is clipped to the
    policy's bound and the output layer is refit on the kept windows."""
    clip = policy.max_shift_sd if refit is not None else None
    blocks, excluded = _select(data)
    m0 = np.asarray(mean0, np.float64)
    s0 = np.asarray(std0, np.float64)
    n = sum(len(b[1]) for b in blocks)
    if n >= policy.min_samples:
        # Two passes: a drifted plant raises every score, so a heavy tail is judged on
        # the scores *after* a first fit (a block still far above the profile's p99 under
        # the calibration holds something the shift does not explain: a beginning fault).
        x = np.concatenate([b[0] for b in blocks])
        _, _, m1, s1 = _shift_fit(x, profile, m0, s0, fit_scale, clip)
        p99 = profile.score_quantiles.get(0.99) or max(profile.score_quantiles.values())
        kept = []
        for xs, sc in blocks:
            s_cal = np.asarray(scorer(apply_normalization(xs, m0, s0, m1, s1)), np.float64)
            if float(np.quantile(s_cal, 0.99)) > policy.max_tail_ratio * p99:
                excluded += 1
            else:
                kept.append((xs, sc))
        blocks = kept
        n = sum(len(b[1]) for b in blocks)
    if n < policy.min_samples:
        raise CalibrationRefused(
            "too_few_samples",
            f"{n} usable windows after excluding {excluded} blocks, the policy needs "
            f"{policy.min_samples}",
        )
    x = np.concatenate([b[0] for b in blocks])
    s = np.concatenate([b[1] for b in blocks])
    d, c, m1, s1 = _shift_fit(x, profile, m0, s0, fit_scale, clip)
    x1 = apply_normalization(x, m0, s0, m1, s1)
    layer = None
    if refit is None:
        s_new = np.asarray(scorer(x1), np.float64)
    else:
        _, h = refit.hidden(x1)
        w, b, _ = outlayer.refit(h, x1, refit.weights, refit.bias, policy.output_ridge)
        w, b = (v.astype(np.float32).astype(np.float64) for v in (w, b))
        layer = OutputLayer(w, b, outlayer.change(w, b, refit.weights, refit.bias))
        s_new = outlayer.scores(x1, h, w, b)
    q = float(np.quantile(s_new, 1.0 - policy.target_false_alarm))
    # Never below the signed threshold: one site's few minutes of normal data are less
    # diverse than the publisher's validation set, and a calibration is there to remove
    # false alarms, not to make the model more trigger-happy than it was released.
    thr = float(np.float32(max(policy.threshold_margin * q, threshold0)))
    names = list(names) if names is not None else [f"f{i}" for i in range(len(d))]
    order = np.argsort(-np.abs(d), kind="stable")[:top]
    return Calibration(
        mean=tuple(float(v) for v in m1),
        std=tuple(float(v) for v in s1),
        threshold=thr,
        shift_sd=tuple(float(v) for v in d),
        scale=tuple(float(v) for v in c),
        samples=n,
        excluded_blocks=excluded,
        threshold_ratio=thr / threshold0,
        false_alarm_before=float((s > threshold0).mean()),
        false_alarm_after=float((s_new > thr).mean()),
        changes=[
            {"feature": names[i], "shift_sd": round(float(d[i]), 3), "scale": round(float(c[i]), 3)}
            for i in order
        ],
        output_layer=layer,
    )


def check_policy(cal: Calibration, policy: AdaptationPolicy) -> None:
    """Raise CalibrationRefused when `cal` is outside the signed policy."""
    if "normalization" not in policy.parameters and (
        any(d != 0.0 for d in cal.shift_sd) or any(c != 1.0 for c in cal.scale)
    ):
        raise CalibrationRefused("parameter_not_allowed", "the policy does not allow normalization")
    if "threshold" not in policy.parameters and cal.threshold_ratio != 1.0:
        raise CalibrationRefused("parameter_not_allowed", "the policy does not allow threshold")
    if cal.samples < policy.min_samples:
        raise CalibrationRefused(
            "too_few_samples", f"{cal.samples} windows < min_samples {policy.min_samples}"
        )
    worst = int(np.argmax(np.abs(cal.shift_sd)))
    if abs(cal.shift_sd[worst]) > policy.max_shift_sd:
        raise CalibrationRefused(
            "shift_out_of_bounds",
            f"feature {worst} shifts {cal.shift_sd[worst]:+.2f} sd, the policy allows "
            f"{policy.max_shift_sd}",
        )
    r = policy.max_scale_ratio
    for i, c in enumerate(cal.scale):
        if not (1.0 / r <= c <= r):
            raise CalibrationRefused(
                "scale_out_of_bounds", f"feature {i} scale x{c:.3f}, the policy allows x{r}"
            )
    layer = cal.output_layer
    if layer is not None:
        if "output_layer" not in policy.parameters:
            raise CalibrationRefused(
                "parameter_not_allowed", "the policy does not allow output_layer"
            )
        if not layer.change <= policy.max_output_change:
            raise CalibrationRefused(
                "output_layer_out_of_bounds",
                f"the output layer changes by {layer.change:.3f} (relative Frobenius norm), "
                f"the policy allows {policy.max_output_change}",
            )
    t = policy.max_threshold_ratio
    if not (1.0 / t <= cal.threshold_ratio <= t) or not math.isfinite(cal.threshold):
        raise CalibrationRefused(
            "threshold_out_of_bounds",
            f"threshold x{cal.threshold_ratio:.3f} of the signed one, the policy allows x{t}",
        )


def check_must_detect(
    raw: F64,
    case: npt.NDArray[Any],
    cases: Sequence[Mapping[str, Any]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    threshold: float,
    scorer: Scorer,
) -> dict[str, Any]:
    """Score the must-detect vectors under (mean, std, threshold); raise
    CalibrationRefused naming the first case with a vector not detected."""
    x = (np.asarray(raw, np.float64) - np.asarray(mean)) / np.asarray(std)
    s = np.asarray(scorer(x), np.float64)
    out: dict[str, Any] = {}
    for c in sorted({int(v) for v in np.asarray(case).reshape(-1)}):
        sel = np.asarray(case).reshape(-1) == c
        meta = cases[c] if c < len(cases) else {}
        label = f"{meta.get('kind', 'case')}@{meta.get('severity', c)}"
        lo = float(s[sel].min())
        out[label] = {"vectors": int(sel.sum()), "min_score": round(lo, 4)}
        if not lo > threshold:
            raise CalibrationRefused(
                "must_detect_lost",
                f"{label}: a must-detect vector scores {lo:.3f} <= threshold {threshold:.3f}",
            )
    return out


def refit_scorer(layer: OutputLayer, hidden: HiddenScorer) -> Scorer:
    """The score under a refit output layer, for normalised rows."""

    def score(x: F64) -> F64:
        _, h = hidden(x)
        return outlayer.scores(x, h, layer.weights, layer.bias)

    return score


def calibrate(
    data: FitInput,
    *,
    profile: ReferenceProfile,
    policy: AdaptationPolicy,
    mean0: Sequence[float],
    std0: Sequence[float],
    threshold0: float,
    scorer: Scorer,
    names: Sequence[str] | None = None,
    must_detect: MustDetect | None = None,
    output_layer: OutputLayerInput | None = None,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit, check the policy and the must-detect vectors; on a refusal, when the policy
    allows it and `output_layer` is given, once more with the output layer refit (module
    docstring). Returns (calibration, must-detect figures); raises CalibrationRefused."""
    kw: dict[str, Any] = dict(
        profile=profile,
        policy=policy,
        mean0=mean0,
        std0=std0,
        threshold0=threshold0,
        scorer=scorer,
        names=names,
    )

    def checked(cal: Calibration, score: Scorer) -> tuple[Calibration, dict[str, Any]]:
        check_policy(cal, policy)
        if must_detect is None:
            return cal, {}
        return cal, check_must_detect(
            must_detect.raw,
            must_detect.case,
            must_detect.cases,
            mean=cal.mean,
            std=cal.std,
            threshold=cal.threshold,
            scorer=score,
        )

    try:
        return checked(fit_calibration(data, **kw), scorer)
    except CalibrationRefused as exc:
        first = exc
        if (
            output_layer is None
            or "output_layer" not in policy.parameters
            or exc.reason == "too_few_samples"
        ):
            raise
    try:
        cal = fit_calibration(data, refit=output_layer, **kw)
        assert cal.output_layer is not None
        return checked(cal, refit_scorer(cal.output_layer, output_layer.hidden))
    except CalibrationRefused as exc:
        raise CalibrationRefused(
            exc.reason, f"{exc.detail} (output layer refit; without it: {first})"
        ) from None


def canonical(doc: Any) -> bytes:
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def make_overlay(
    cal: Calibration,
    *,
    model: str,
    base_version: str,
    seq: int,
    manifest_sha256: bytes,
    policy: AdaptationPolicy,
    device_key_id: str,
    created: float,
) -> dict[str, Any]:
    """The overlay document (unsigned): sign `overlay_digest(doc)`."""
    extra = {} if cal.output_layer is None else {"output_layer": cal.output_layer.to_json()}
    return {
        **extra,
        "format": OVERLAY_FORMAT,
        "model": model,
        "base_version": base_version,
        "version": f"{base_version}+cal.{seq}",
        "model_manifest_sha256": manifest_sha256.hex(),
        "normalization": {"mean": list(cal.mean), "std": list(cal.std)},
        "threshold": cal.threshold,
        "shift_sd": [round(v, 6) for v in cal.shift_sd],
        "scale": [round(v, 6) for v in cal.scale],
        "summary": cal.summary(),
        "policy": policy.to_json(),
        "device_key_id": device_key_id,
        "created": created,
    }


def overlay_digest(doc: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(OVERLAY_TAG + canonical(dict(doc))).digest()


def verify_overlay(
    doc: Mapping[str, Any],
    signature: bytes,
    public_key_pem: str,
    *,
    manifest_sha256: bytes,
    policy: AdaptationPolicy,
    threshold0: float,
    output_layer0: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> None:
    """Raise CalibrationRefused unless `doc` is a well-formed overlay signed by the device
    key, for this very model manifest, and within the policy. `output_layer0`: the signed
    output layer (W0, b0), needed to check an overlay that refits it (the change is
    recomputed from the weights, never read from the document)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    if doc.get("format") != OVERLAY_FORMAT:
        raise CalibrationRefused("overlay_format", f"expected {OVERLAY_FORMAT!r}")
    key = serialization.load_pem_public_key(public_key_pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CalibrationRefused("overlay_signature", "the device key is not an EC key")
    try:
        key.verify(signature, overlay_digest(doc), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise CalibrationRefused(
            "overlay_signature", "not signed by this device's identity key"
        ) from None
    if doc.get("model_manifest_sha256") != manifest_sha256.hex():
        raise CalibrationRefused("overlay_binding", "the overlay calibrates another model manifest")
    try:
        shift = [float(v) for v in doc["shift_sd"]]
        scale = [float(v) for v in doc["scale"]]
        thr = float(doc["threshold"])
        samples = int(doc["summary"]["samples"])
        norm = doc["normalization"]
        mean = tuple(float(v) for v in norm["mean"])
        std = tuple(float(v) for v in norm["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationRefused("overlay_format", f"missing or bad field ({exc})") from None
    if not (len(mean) == len(std) == len(shift) == len(scale)) or min(std) <= 0:
        raise CalibrationRefused("overlay_format", "normalization sizes or std invalid")
    layer = overlay_layer(doc.get("output_layer"), output_layer0)
    check_policy(
        Calibration(
            mean=mean,
            std=std,
            threshold=thr,
            shift_sd=tuple(shift),
            scale=tuple(scale),
            samples=samples,
            excluded_blocks=0,
            threshold_ratio=thr / threshold0,
            false_alarm_before=0.0,
            false_alarm_after=0.0,
            output_layer=layer,
        ),
        policy,
    )


def overlay_layer(
    doc: Any, signed: tuple[npt.ArrayLike, npt.ArrayLike] | None
) -> OutputLayer | None:
    if doc is None:
        return None
    if signed is None:
        raise CalibrationRefused(
            "overlay_format", "the overlay refits an output layer the model does not ship"
        )
    w0, b0 = (np.asarray(v, np.float64) for v in signed)
    try:
        w = np.asarray(doc["weights"], np.float64)
        b = np.asarray(doc["bias"], np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationRefused("overlay_format", f"bad output_layer ({exc})") from None
    if (
        w.shape != w0.shape
        or b.shape != b0.shape
        or not (np.isfinite(w).all() and np.isfinite(b).all())
    ):
        raise CalibrationRefused(
            "overlay_format",
            f"output_layer shapes {w.shape}/{b.shape}, the model's {w0.shape}/{b0.shape}",
        )
    return OutputLayer(w, b, outlayer.change(w, b, w0, b0))
