"""Verifier side of the NV binding (docs/identity.md "NV binding"): pure Python.

An attestation result from a TPM identity carries `nv_binding`:
    {"index": "0x01500101", "name": hex, "attest": b64 TPMS_ATTEST (TPM_ST_ATTEST_NV),
     "signature": b64 TPMT_SIGNATURE, "log": {"initial": hex, "events": [
        {"config_sha256": hex, "models": [{"name", "manifest_sha256",
                                           "overlay_sha256", "overlay_version"}]}, ...]}}
(`overlay_*` null or absent for a model without a device calibration: such events replay
as `edgerund-binding-v1`; an event with a calibrated model is `edgerund-binding-v2`, see
edgerund.identity.nvbinding).

`verify_nv_binding` checks, in order, and raises BindingError(check, message) at the first
failure:
  1. `present`     the result has an nv_binding (software identities have none);
  2. `signature`   the AK signature over the raw attest bytes, with the AK the caller trusts
                   (pinned, or proven by credential activation: that is verify.py's job);
  3. `attest`      TPM_GENERATED magic, type TPM_ST_ATTEST_NV, extraData == the nonce;
  4. `index_name`  certified index Name == the Name pinned at enrolment (if given) and == the
                   result's `name`: a redefined index has another Name;
  5. `replay`      replaying the log from `initial` gives the certified contents;
  6. `expected`    the LAST event (the binding in force) equals the config / models the
                   verifier deployed (if given; models compare by manifest, so a
                   calibrated model of an expected manifest matches), and the calibration
                   in force is the one expected (`expected_overlays`, if given: per model
                   name or binding.ANY_MODEL, an overlay digest or None for "none").
The verdict names, per model, the calibration in force (`calibrations`).
Only the daemon can extend the index (write policy), so 5 proves the daemon itself extended
the last event; a local process resetting PCR 23 changes nothing here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgerund.identity import nvbinding
from edgerund.identity import tpmstruct as ts
from edgerund.identity.binding import ModelBinding, overlay_mismatch, parse_model_entry


class BindingError(Exception):
    def __init__(self, check: str, message: str) -> None:
        self.check = check
        self.message = message
        super().__init__(f"{check}: {message}")


@dataclass(frozen=True)
class BindingVerdict:
    config_sha256: bytes
    models: dict[str, bytes]
    value: bytes
    index_name: bytes
    clock: int
    reset_count: int
    entries: tuple[ModelBinding, ...] = ()

    @property
    def calibrations(self) -> dict[str, dict[str, str | None] | None]:
        """{model name: {"version", "overlay_sha256"} of its calibration, or None}."""
        return {e.name: e.calibration() for e in self.entries}


def verify_nv_binding(
    result: Mapping[str, Any],
    *,
    nonce: bytes,
    ak_pem: str | bytes,
    pinned_name: bytes | None = None,
    expected_config_sha256: bytes | None = None,
    expected_models: Mapping[str, bytes] | None = None,
    expected_overlays: Mapping[str, bytes | None] | None = None,
) -> BindingVerdict:
    nvb = result.get("nv_binding")
    if not isinstance(nvb, Mapping):
        raise BindingError("present", "the result has no nv_binding (software identity?)")
    try:
        attest = base64.b64decode(str(nvb["attest"]), validate=True)
        sig_raw = base64.b64decode(str(nvb["signature"]), validate=True)
        log = nvb["log"]
        if not isinstance(log, Mapping):
            raise ValueError("log must be an object")
        initial, events, raw = nvbinding.log_events(log)
        claimed_name = bytes.fromhex(str(nvb["name"]))
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise BindingError("present", f"malformed nv_binding: {exc}") from None
    # 2: signature by the trusted AK
    key = serialization.load_pem_public_key(ak_pem.encode() if isinstance(ak_pem, str) else ak_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BindingError("signature", "expected an ECDSA AK")
    try:
        sig = ts.parse_signature(sig_raw)
        key.verify(encode_dss_signature(sig.r, sig.s), attest, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, ts.StructError) as exc:
        raise BindingError(
            "signature", f"AK signature over nv_binding.attest invalid: {exc!r}"
        ) from None
    # 3: structure and freshness
    try:
        head, info = nvbinding.parse_nv_certify(attest)
    except (ValueError, ts.StructError) as exc:
        raise BindingError("attest", str(exc)) from None
    if head.magic != ts.TPM_GENERATED_VALUE:
        raise BindingError("attest", f"magic 0x{head.magic:08x} is not TPM_GENERATED")
    if head.extra_data != nonce:
        raise BindingError(
            "attest", f"extraData {head.extra_data.hex()} != nonce {nonce.hex()} (replay?)"
        )
    # 4: the index is the pinned one
    if info.index_name != claimed_name:
        raise BindingError("index_name", "certified index Name differs from nv_binding.name")
    if pinned_name is not None and info.index_name != pinned_name:
        raise BindingError(
            "index_name",
            f"certified index Name {info.index_name.hex()} != pinned {pinned_name.hex()}: "
            "the NV index was redefined",
        )
    # 5: replay
    if info.offset != 0 or len(info.contents) != 32:
        raise BindingError("replay", "the certification does not cover the whole index")
    if not events:
        raise BindingError("replay", "the log has no event: nothing is bound")
    value = nvbinding.replay(initial, events)
    if value != info.contents:
        raise BindingError(
            "replay",
            f"log replays to {value.hex()}, the TPM certified {info.contents.hex()}",
        )
    last = raw[-1]
    assert isinstance(last, Mapping)
    config = bytes.fromhex(str(last["config_sha256"]))
    entries = tuple(parse_model_entry(m) for m in last.get("models") or [])  # replayed above
    models = {e.name: e.manifest_sha256 for e in entries}
    # 6: what the verifier deployed
    if expected_config_sha256 is not None and config != expected_config_sha256:
        raise BindingError(
            "expected", f"bound config {config.hex()} != expected {expected_config_sha256.hex()}"
        )
    if expected_models is not None and dict(expected_models) != models:
        raise BindingError(
            "expected",
            f"bound models {sorted((k, v.hex()) for k, v in models.items())} != expected "
            f"{sorted((k, v.hex()) for k, v in expected_models.items())}",
        )
    if expected_overlays is not None:
        why = overlay_mismatch(entries, expected_overlays)
        if why is not None:
            raise BindingError("expected", why)
    return BindingVerdict(
        config, models, value, info.index_name, head.clock, head.reset_count, entries
    )
