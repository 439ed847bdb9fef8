"""A calibrated slot's overlay on disk: read it, check it, and what it does to a model.

Theory of operation
-------------------
A calibration (edgerund.inference.calibration) is installed as a slot of its own, version
`X+cal.N`: the publisher-signed files of model `X` byte for byte, plus two files beside
them:

    calibration.json   the overlay document (format `edgerund.calibration/1`), canonical
                       JSON (sorted keys, no spaces) as it was signed
    calibration.sig    the device identity key's DER ECDSA signature over
                       `SHA-256(b"edgerund-calibration-v1\\x00" + canonical JSON)`

`check_overlay` is the trust decision on an overlay, used at start-up (slotcheck, through
the slot repository), before the precheck and when the technician asks: the signature
against THIS device's public key (an overlay copied from another gateway, or edited on
disk, fails), the binding to this very model manifest (`model_manifest_sha256`, the model
name, `version` = `<the manifest's version>+cal.<N>`), the signed `adaptation` policy, and
that the normalisation the overlay installs is the one its declared `shift_sd` / `scale`
describe (the policy is checked on what the overlay *does*, not only on what it says:
`derived_shift` recomputes them from the signed normalisation and reference profile).

The runner (edgerund.inference.runner) applies an overlay after its golden check has run
under the signed normalisation: the golden vectors prove the runtime computes what the
build computed; the overlay then replaces the normalisation mean/std and the threshold.
The runner does not check the signature (it has no key); it refuses an overlay bound to
another manifest. Every path that makes a slot active verifies it first. The runner keeps
the SHA-256 of the calibration.json bytes it applied (`read_overlay_measured`,
`runner.overlay_sha256`): the models component binds it into the attestation beside the
manifest digest (docs/identity.md), so a quote names the calibration in force.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.inference.calibration import (
    OVERLAY_FORMAT,
    CalibrationRefused,
    canonical,
    verify_overlay,
)
from edgerund.inference.manifest import ModelManifest

__all__ = [
    "OVERLAY_FILE",
    "OVERLAY_FILES",
    "OVERLAY_SIG",
    "check_must_detect_under",
    "check_overlay",
    "derived_shift",
    "overlay_bytes",
    "overlay_seq",
    "read_overlay",
    "read_overlay_measured",
]

OVERLAY_FILE = "calibration.json"
OVERLAY_SIG = "calibration.sig"
OVERLAY_FILES = frozenset({OVERLAY_FILE, OVERLAY_SIG})
OVERLAY_MAX_BYTES = 1 << 20
_CAL_VERSION = re.compile(r"^(?P<base>.+)\+cal\.(?P<seq>[1-9][0-9]{0,8})$")
# The overlay stores float32-rounded normalisation; the shift it declares is rounded to
# 1e-6. Derived and declared values agree within this (in reference sd / as a ratio).
_TOLERANCE = 1e-3


def overlay_seq(version: str) -> tuple[str, int] | None:
    """("2.0.0", 3) for "2.0.0+cal.3"; None for a version that is not a calibration."""
    m = _CAL_VERSION.match(version)
    return None if m is None else (m.group("base"), int(m.group("seq")))


def overlay_bytes(doc: Mapping[str, Any]) -> bytes:
    """How calibration.json is written: the canonical form that was signed."""
    return canonical(dict(doc))


def read_overlay(model_dir: Path) -> tuple[dict[str, Any], bytes] | None:
    """(document, signature) of the overlay in `model_dir`, None when there is none.
    Raises CalibrationRefused("overlay_format") for a half overlay or unreadable JSON."""
    found = read_overlay_measured(model_dir)
    return None if found is None else (found[0], found[1])


def read_overlay_measured(model_dir: Path) -> tuple[dict[str, Any], bytes, bytes] | None:
    """read_overlay plus the SHA-256 of the very calibration.json bytes it parsed: what
    the identity measures for the calibration in force (edgerund.identity.binding)."""
    doc_path, sig_path = Path(model_dir) / OVERLAY_FILE, Path(model_dir) / OVERLAY_SIG
    have = doc_path.exists(), sig_path.exists()
    if not any(have):
        return None
    if not all(have):
        missing = OVERLAY_FILE if not have[0] else OVERLAY_SIG
        raise CalibrationRefused("overlay_format", f"{missing} is missing")
    data = doc_path.read_bytes()[: OVERLAY_MAX_BYTES + 1]
    sig = sig_path.read_bytes()[:4096]
    if len(data) > OVERLAY_MAX_BYTES:
        raise CalibrationRefused("overlay_format", f"{OVERLAY_FILE} is too large")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CalibrationRefused("overlay_format", f"{OVERLAY_FILE}: {exc}") from None
    if not isinstance(doc, dict):
        raise CalibrationRefused("overlay_format", f"{OVERLAY_FILE} is not a JSON object")
    return doc, sig, hashlib.sha256(data).digest()


def derived_shift(
    manifest: ModelManifest, mean: Sequence[float], std: Sequence[float]
) -> tuple[list[float], list[float]]:
    """(shift_sd, scale) per feature of a normalisation (mean, std) relative to the signed
    one and the reference profile (the inverse of calibration._shift_fit's formula
    `s' = s0 c`, `m' = m0 + s0 (mu (1 - c) + d sd)`)."""
    prof = manifest.profile
    if prof is None:
        raise CalibrationRefused("no_policy", "the model manifest has no reference_profile")
    spec = manifest.preprocessing
    m0, s0 = np.asarray(spec.mean, np.float64), np.asarray(spec.std, np.float64)
    m1, s1 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    mu, sd = np.asarray(prof.mean, np.float64), np.asarray(prof.std, np.float64)
    c = s1 / s0
    d = ((m1 - m0) / s0 - mu * (1.0 - c)) / sd
    return [float(v) for v in d], [float(v) for v in c]


def signed_output_layer(
    manifest: ModelManifest, model_dir: Path | None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    """The publisher's output layer (W0, b0) shipped beside the model (golden.npz, whose
    hash the slot check verified), or None when the manifest ships none."""
    ol = manifest.output_layer
    if ol is None or model_dir is None:
        return None
    with np.load(Path(model_dir) / ol.file, allow_pickle=False) as g:
        return np.asarray(g[ol.weights]), np.asarray(g[ol.bias])


def check_overlay(
    doc: Mapping[str, Any],
    signature: bytes,
    manifest: ModelManifest,
    device_key_pem: str | None,
    model_dir: Path | None = None,
) -> int:
    """Raise CalibrationRefused unless `doc` is an overlay this device signed for
    `manifest` within its signed policy (module docstring); returns its N. An overlay
    that refits the output layer is checked against the signed layer in `model_dir`
    (without it, such an overlay is refused: fail closed)."""
    if device_key_pem is None:
        raise CalibrationRefused(
            "overlay_no_device_key", "no device identity key to verify the calibration with"
        )
    if manifest.adaptation is None or manifest.profile is None:
        raise CalibrationRefused(
            "no_policy", "the model manifest has no adaptation policy: no calibration is allowed"
        )
    if doc.get("format") != OVERLAY_FORMAT:
        raise CalibrationRefused("overlay_format", f"expected format {OVERLAY_FORMAT!r}")
    verify_overlay(
        doc,
        signature,
        device_key_pem,
        manifest_sha256=manifest.sha256,
        policy=manifest.adaptation,
        threshold0=float(manifest.threshold),
        output_layer0=(
            signed_output_layer(manifest, model_dir)
            if doc.get("output_layer") is not None
            else None
        ),
    )
    parsed = overlay_seq(str(doc.get("version", "")))
    if (
        doc.get("model") != manifest.name
        or doc.get("base_version") != manifest.version
        or parsed is None
        or parsed[0] != manifest.version
    ):
        raise CalibrationRefused(
            "overlay_binding",
            f"the overlay says {doc.get('model')!r} {doc.get('version')!r}, the model is "
            f"{manifest.name!r} {manifest.version!r}",
        )
    norm = doc["normalization"]
    if len(norm["mean"]) != manifest.preprocessing.n_features:
        raise CalibrationRefused("overlay_format", "normalization size differs from the model's")
    d, c = derived_shift(manifest, norm["mean"], norm["std"])
    declared_d = [float(v) for v in doc["shift_sd"]]
    declared_c = [float(v) for v in doc["scale"]]
    worst = max(
        max(abs(a - b) for a, b in zip(d, declared_d, strict=True)),
        max(abs(a - b) for a, b in zip(c, declared_c, strict=True)),
    )
    if not worst <= _TOLERANCE:
        raise CalibrationRefused(
            "overlay_inconsistent",
            f"the normalization differs from the declared shift/scale by {worst:.3g}",
        )
    return parsed[1]


def check_must_detect_under(model_dir: Path) -> dict[str, Any]:
    """The must-detect vectors of the model in `model_dir` scored under its overlay's
    normalisation and threshold (the precheck of a calibrated slot; blocking). Raises
    CalibrationRefused (`must_detect_lost` naming the case, or `overlay_format`)."""
    from edgerund.inference.adapt import scorer_for
    from edgerund.inference.calibration import check_must_detect
    from edgerund.inference.manifest import load_manifest

    man = load_manifest(Path(model_dir))
    found = read_overlay(Path(model_dir))
    if found is None:
        raise CalibrationRefused("overlay_format", "no calibration overlay in the slot")
    doc = found[0]
    if man.must_detect is None:
        return {}
    scorer = scorer_for(Path(model_dir) / man.model_file)
    if doc.get("output_layer") is not None:  # scored as the runner will: the refit layer
        from edgerund.inference.adapt import output_layer_input
        from edgerund.inference.calibration import overlay_layer, refit_scorer

        refit = output_layer_input(man, Path(model_dir))
        layer = overlay_layer(doc["output_layer"], signed_output_layer(man, Path(model_dir)))
        if refit is None or layer is None:
            raise CalibrationRefused("overlay_format", "a refit without a shipped output layer")
        scorer = refit_scorer(layer, refit.hidden)
    g = np.load(Path(model_dir) / man.must_detect.file)
    return check_must_detect(
        g[man.must_detect.features],
        g[man.must_detect.case],
        man.must_detect.cases,
        mean=[float(v) for v in doc["normalization"]["mean"]],
        std=[float(v) for v in doc["normalization"]["std"]],
        threshold=float(doc["threshold"]),
        scorer=scorer,
    )
