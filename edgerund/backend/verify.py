"""The attestation verifier: pure Python (`cryptography` only, no libtss2, no TPM).

This is what a fleet backend runs on an attestation result (the JSON from `attest`, see
docs/identity.md). It is I/O-free: `verify_result(result, ...)` takes the parsed JSON and
the verifier's expectations and returns a `Verdict`; `edgerund attest verify` is a thin CLI
over it. Checks, in order, each failing with a stable reason code:

1. `malformed`          every field decodes (base64/hex) and parses as its TPM structure.
   `no_nonce`           the verifier gave its nonce (else a quote can be a replay, or made
                        in advance by whoever held the key once); skipped only by
                        `insecure_no_nonce` (`--insecure-no-nonce`).
   `ak_untrusted`       the verifier trusts the AK: it pinned it (`ak_pem`, written by
                        `edgerund attest enroll` after credential activation, see
                        enroll.py). The AK in the result is chosen by whoever wrote the
                        result, so without a pin a quote signed by ANY key (made in
                        software, no TPM) is self-consistent; skipped only by
                        `insecure_skip_ak_trust` (`--insecure-skip-ak-trust`).
2. `ak_attributes`      the AK is a restricted signing key that cannot decrypt (only a
                        restricted key refuses to sign outside data that starts with the
                        TPM_GENERATED magic, so only it makes a quote unforgeable).
3. `ak_mismatch`        the AK equals the one the verifier pinned (`ak_pem`), and the
                        result's `ak_pem` equals its `ak_public`.
4. `bad_signature`      the AK's signature over the raw TPMS_ATTEST bytes.
5. `bad_magic`/`bad_type`  magic 0xFF544347 (TPM_GENERATED), type TPM_ST_ATTEST_QUOTE.
6. `nonce_mismatch`     extraData equals the verifier's nonce (freshness).
7. `pcr_selection`      the quoted selection equals the declared one; every value present.
8. `pcr_digest`         H(PCR values in selection order) equals the quoted pcrDigest.
9. `clock`              against a previous quote from the same AK: resetCount never
                        decreases; restartCount never decreases within a reset; the clock
                        advances within the same reset/restart.
10. `certify_*`         the TPM2_Certify of the telemetry key: AK signature, magic, type
                        TPM_ST_ATTEST_CERTIFY, same nonce, certified Name == Name of the
                        declared signing key public area, and that key is fixedTPM,
                        non-restricted signing (so telemetry signatures come from this TPM).
11. `binding_log`/`binding_mismatch`  the binding log (config + model manifest digests,
                        and the overlay digest of a model running a device calibration)
                        replays to the quoted binding PCR; optionally it matches the config,
                        the model manifest(s) (a calibrated model of an expected manifest
                        matches: the verdict names its calibration) and the calibration the
                        verifier expects (`expected_overlays`: a digest, or None for "no
                        calibration"), or a whole expected PCR value (`expected_binding`).
                        The verdict's `models` lists per bound model its manifest and the
                        calibration in force (version `X+cal.N`, overlay digest) or null.
12. `nv_*`              unless `insecure_skip_nv_binding` (`--insecure-skip-nv-binding`), for a
                        result that is not a software identity's: the NV binding index
                        (binding_verify.verify_nv_binding), the binding a verifier should
                        trust, since any local process with TPM access can reset PCR 23 and
                        extend the digests the verifier expects (11 then passes).
                        `nv_binding_missing` no `nv_binding` in the result;
                        `nv_name_untrusted` no index Name pinned (`nv_name`, recorded at
                        enrolment): an AK with an empty authValue certifies any index,
                        also one a local attacker defined and extends at will;
                        `nv_binding_malformed`, `nv_binding_signature` (AK signature),
                        `nv_binding_attest` (magic, type TPM_ST_ATTEST_NV, extraData == the
                        quote's nonce), `nv_binding_index_name` (certified Name != pinned),
                        `nv_binding_replay` (the log does not replay to the certified
                        contents), `nv_binding_mismatch` (the LAST event differs from the
                        expected config / models / calibrations, compared as in 11).
                        The verdict's `nv_binding` names the index, the certified value and
                        the models and calibrations of the last event; `bindings_verified`
                        says which bindings were checked (["pcr", "nv"], or ["pcr"] alone).

What a quote does NOT prove by itself: that the AK lives in the TPM named by the EK
certificate. That is established once at registration by credential activation
(MakeCredential to the EK, bound to the AK Name: makecredential.py, enroll.py, EK
certificate chain: ekcert.py); the verifier then pins the AK (`ak_pem`), and every later
quote is checked against that pin. A `kind: software` result is refused unless
`allow_software` (`software_identity`), but the `kind` field is the sender's claim: the pin
is what stops a software-made quote that says `kind: tpm`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgerund.backend.binding_verify import BindingError, verify_nv_binding
from edgerund.errors import EdgerundError
from edgerund.identity import tpmstruct as ts
from edgerund.identity.binding import (
    ModelBinding,
    binding_value,
    overlay_mismatch,
    parse_model_entry,
)

HASH_ALGS: dict[int, hashes.HashAlgorithm] = {
    ts.ALG_SHA1: hashes.SHA1(),
    ts.ALG_SHA256: hashes.SHA256(),
    ts.ALG_SHA384: hashes.SHA384(),
    ts.ALG_SHA512: hashes.SHA512(),
}


class VerifyError(EdgerundError):
    """One failed check: `code` is stable (see the module docstring), message is for humans."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass
class Verdict:
    ok: bool
    code: str = "ok"
    message: str = "attestation result is valid"
    warnings: list[str] = field(default_factory=list)
    reset_count: int | None = None
    restart_count: int | None = None
    clock_ms: int | None = None
    pcrs: dict[str, str] = field(default_factory=dict)
    # per bound model (from the binding log, once it replayed to the quoted PCR): name,
    # manifest_sha256 and `calibration` {version, overlay_sha256} or None
    models: list[dict[str, Any]] = field(default_factory=list)
    # which bindings were verified: "pcr" (the log replays to the quoted PCR) and "nv" (the
    # NV binding index, check 12); the NV result: index, name, value, events and the
    # config and models (with their calibrations) of its last event
    bindings_verified: list[str] = field(default_factory=list)
    nv_binding: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.ok, "code": self.code, "message": self.message,
            "warnings": self.warnings, "reset_count": self.reset_count,
            "restart_count": self.restart_count, "clock_ms": self.clock_ms, "pcrs": self.pcrs,
            "models": self.models, "bindings_verified": self.bindings_verified,
            "nv_binding": self.nv_binding,
        }  # fmt: skip


# ---------------------------------------------------------------- helpers


def expected_binding_for_files(config_file: Path, manifests: Sequence[Path]) -> bytes:
    """binding_value() from the files themselves (manifests sorted by their `name`)."""
    models = sorted(expected_models_for_files(manifests).items())
    return binding_value(hashlib.sha256(config_file.read_bytes()).digest(), [d for _, d in models])


def expected_models_for_files(manifests: Sequence[Path]) -> dict[str, bytes]:
    """{model name: sha256(manifest.json bytes)} for the manifests a verifier deployed."""
    out: dict[str, bytes] = {}
    for m in manifests:
        raw = m.read_bytes()
        try:
            name = str(json.loads(raw).get("name", m.parent.name))
        except (ValueError, AttributeError):
            name = m.parent.name
        out[name] = hashlib.sha256(raw).digest()
    return out


def _b64(result: Mapping[str, Any], key: str, *, optional: bool = False) -> bytes | None:
    v = result.get(key)
    if v is None:
        if optional:
            return None
        raise VerifyError("malformed", f"field {key!r} is missing")
    if not isinstance(v, str):
        raise VerifyError("malformed", f"field {key!r} must be a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise VerifyError("malformed", f"field {key!r} is not valid base64") from None


def _hex(v: Any, what: str) -> bytes:
    if not isinstance(v, str):
        raise VerifyError("malformed", f"{what} must be a hex string")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise VerifyError("malformed", f"{what} is not valid hex") from None


def _parse(fn: Any, data: bytes, what: str) -> Any:
    try:
        return fn(data)
    except ts.StructError as exc:
        raise VerifyError("malformed", f"{what}: {exc}") from None


def verify_tpm_signature(
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, sig_bytes: bytes, message: bytes
) -> None:
    """Verify a marshalled TPMT_SIGNATURE over `message`. Raises VerifyError."""
    sig = _parse(ts.parse_signature, sig_bytes, "signature")
    halg = HASH_ALGS.get(sig.hash_alg)
    if halg is None:
        raise VerifyError("bad_signature", f"unsupported signature hash 0x{sig.hash_alg:04x}")
    try:
        if sig.alg == ts.ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(encode_dss_signature(sig.r, sig.s), message, ec.ECDSA(halg))
        elif sig.alg == ts.ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig.rsa_sig, message, padding.PKCS1v15(), halg)
        elif sig.alg == ts.ALG_RSAPSS and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig.rsa_sig, message,
                       padding.PSS(padding.MGF1(halg), padding.PSS.AUTO), halg)  # fmt: skip
        else:
            raise VerifyError(
                "bad_signature", f"signature algorithm 0x{sig.alg:04x} does not fit the key type"
            )
    except InvalidSignature:
        raise VerifyError("bad_signature", "signature does not verify with the AK") from None


def _same_key(a: Any, b: Any) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return bool(a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt))


def _load_pem(text: Any, what: str) -> Any:
    if not isinstance(text, str):
        raise VerifyError("malformed", f"{what} must be a PEM string")
    try:
        return serialization.load_pem_public_key(text.encode())
    except ValueError as exc:
        raise VerifyError("malformed", f"{what} is not a PEM public key: {exc}") from None


# ---------------------------------------------------------------- the verifier


def verify_result(
    result: Mapping[str, Any],
    *,
    nonce: bytes | None = None,
    previous: Mapping[str, Any] | None = None,
    expected_binding: bytes | None = None,
    ak_pem: str | None = None,
    allow_software: bool = False,
    insecure_skip_ak_trust: bool = False,
    insecure_no_nonce: bool = False,
    expected_config_sha256: bytes | None = None,
    expected_models: Mapping[str, bytes] | None = None,
    expected_overlays: Mapping[str, bytes | None] | None = None,
    nv_name: bytes | None = None,
    insecure_skip_nv_binding: bool = False,
) -> Verdict:
    """Check an attestation result. Never raises for bad input: returns Verdict(ok=False).

    Secure by default: without `nonce` and a pinned `ak_pem` the verdict is `no_nonce` /
    `ak_untrusted`; the `insecure_*` switches skip exactly the check they name.
    `expected_models` ({name: manifest sha256}) compares manifests only, so a calibrated
    model of that manifest matches; `expected_overlays` ({name or binding.ANY_MODEL:
    overlay sha256, or None for "no calibration"}) pins the calibration (give the
    expected models with it: the PCR log's model names are not measured).

    The NV binding of a TPM result is verified against `nv_name` (the index Name pinned
    at enrolment) with the same expectations (check 12): the PCR binding alone proves
    nothing against a local attacker. `insecure_skip_nv_binding` skips it (gateways from
    before it), as `--insecure-skip-nv-binding` does.
    """
    expect = _Expect(expected_binding, expected_config_sha256, expected_models, expected_overlays)
    nv = _NvPolicy(not insecure_skip_nv_binding, nv_name)
    try:
        return _verify(
            result, nonce, previous, expect, ak_pem, allow_software,
            insecure_skip_ak_trust=insecure_skip_ak_trust, insecure_no_nonce=insecure_no_nonce,
            nv=nv,
        )  # fmt: skip
    except VerifyError as exc:
        return Verdict(False, exc.code, exc.message)


@dataclass(frozen=True)
class _Expect:
    binding: bytes | None
    config: bytes | None
    models: Mapping[str, bytes] | None
    overlays: Mapping[str, bytes | None] | None

    def any(self) -> bool:
        return any(v is not None for v in (self.binding, self.config, self.models, self.overlays))


@dataclass(frozen=True)
class _NvPolicy:
    check: bool
    name: bytes | None


def _verify(
    result: Mapping[str, Any],
    nonce: bytes | None,
    previous: Mapping[str, Any] | None,
    expect: _Expect,
    ak_pem: str | None,
    allow_software: bool,
    *,
    insecure_skip_ak_trust: bool,
    insecure_no_nonce: bool,
    nv: _NvPolicy,
) -> Verdict:
    if not isinstance(result, Mapping):
        raise VerifyError("malformed", "the result must be a JSON object")
    verdict = Verdict(True)
    attest_raw = _b64(result, "attest")
    sig_raw = _b64(result, "signature")
    ak_pub_raw = _b64(result, "ak_public")
    assert attest_raw is not None and sig_raw is not None and ak_pub_raw is not None

    ak = _parse(ts.parse_tpm2b_public, ak_pub_raw, "ak_public")

    # 1: the verifier's own trust inputs
    if nonce is None:
        if not insecure_no_nonce:
            raise VerifyError(
                "no_nonce",
                "no verifier nonce: without the fresh nonce you sent, the quote may be a "
                "replay or made in advance; pass --nonce HEX (or --insecure-no-nonce)",
            )
        verdict.warnings.append("INSECURE: no nonce (--insecure-no-nonce): freshness not checked")
    if ak_pem is None:
        if not insecure_skip_ak_trust:
            raise VerifyError(
                "ak_untrusted",
                "no trusted AK: the result names its own signing key, so a quote made in "
                "software with any key is self-consistent; pin the AK with --ak-pem FILE "
                "(from `edgerund attest enroll`, credential activation) or pass "
                "--insecure-skip-ak-trust",
            )
        verdict.warnings.append(
            "INSECURE: AK not pinned (--insecure-skip-ak-trust): the signature only proves "
            "self-consistency, not that a TPM made this quote"
        )

    # 2-3: the AK
    if not (ak.has(ts.OA_RESTRICTED) and ak.has(ts.OA_SIGN)) or ak.has(ts.OA_DECRYPT):
        raise VerifyError(
            "ak_attributes",
            f"the AK must be a restricted signing key without decrypt "
            f"(objectAttributes 0x{ak.attributes:08x})",
        )
    if not ak.has(ts.OA_FIXEDTPM):
        raise VerifyError("ak_attributes", "the AK is not fixedTPM: it could have been exported")
    if "ak_pem" in result and not _same_key(_load_pem(result["ak_pem"], "ak_pem"), ak.key):
        raise VerifyError("ak_mismatch", "the result's ak_pem differs from its ak_public")
    if ak_pem is not None and not _same_key(_load_pem(ak_pem, "the pinned AK"), ak.key):
        raise VerifyError("ak_mismatch", "the quote's AK is not the AK pinned by the verifier")
    if result.get("kind") == "software":
        msg = "software identity: keys live in a file, not in a TPM (INSECURE)"
        if not allow_software:
            raise VerifyError("software_identity", msg + "; pass --allow-software to accept")
        verdict.warnings.append(msg)

    # 4-6: signature, magic, type, nonce
    verify_tpm_signature(ak.key, sig_raw, attest_raw)
    att = _parse(ts.parse_attest, attest_raw, "attest")
    if att.magic != ts.TPM_GENERATED_VALUE:
        raise VerifyError("bad_magic", f"magic is 0x{att.magic:08x}, expected 0xff544347")
    if att.type != ts.ST_ATTEST_QUOTE:
        raise VerifyError("bad_type", f"attest type is 0x{att.type:04x}, expected 0x8018 (quote)")
    declared_nonce = _hex(result.get("nonce"), "nonce")
    if nonce is not None and att.extra_data != nonce:
        raise VerifyError(
            "nonce_mismatch",
            f"quote is for nonce {att.extra_data.hex()}, the verifier sent {nonce.hex()}",
        )
    if att.extra_data != declared_nonce:
        raise VerifyError("nonce_mismatch", "the quoted nonce differs from the result's nonce")
    verdict.reset_count, verdict.restart_count = att.reset_count, att.restart_count
    verdict.clock_ms = att.clock
    if not att.safe:
        verdict.warnings.append("clockInfo.safe is 0: the TPM clock may have gone back")

    # 7-8: PCRs
    sel_text = result.get("pcr_selection")
    if not isinstance(sel_text, str):
        raise VerifyError("malformed", "field 'pcr_selection' is missing")
    try:
        declared_sel = ts.parse_pcr_selection_string(sel_text)
    except ValueError as exc:
        raise VerifyError("malformed", f"pcr_selection: {exc}") from None
    quoted_sel = [(h, ix) for h, ix in att.pcr_select if ix]
    if quoted_sel != declared_sel:
        raise VerifyError(
            "pcr_selection",
            f"the quote covers {ts.format_pcr_selection(quoted_sel) if all(h in ts.HASH_NAMES for h, _ in quoted_sel) else quoted_sel}, "
            f"the result declares {sel_text}",
        )
    pcrs = result.get("pcrs")
    if not isinstance(pcrs, Mapping):
        raise VerifyError("malformed", "field 'pcrs' is missing")
    values: dict[tuple[int, int], bytes] = {}
    for h, ix in declared_sel:
        for i in ix:
            key = f"{ts.HASH_NAMES[h]}:{i}"
            if key not in pcrs:
                raise VerifyError("pcr_selection", f"PCR value {key} is missing from 'pcrs'")
            values[(h, i)] = _hex(pcrs[key], f"pcrs[{key!r}]")
            verdict.pcrs[key] = values[(h, i)].hex()
    if ts.pcr_digest(declared_sel, values, ak.name_alg) != att.pcr_digest:
        raise VerifyError(
            "pcr_digest", "the PCR values do not hash to the quoted pcrDigest (altered values)"
        )

    # 9: clock sanity against a previous quote of the same AK
    if previous is not None:
        prev_raw = _b64(previous, "attest")
        assert prev_raw is not None
        prev = _parse(ts.parse_attest, prev_raw, "previous.attest")
        if previous.get("ak_public") != result.get("ak_public"):
            raise VerifyError("clock", "the previous result is from a different AK")
        if att.reset_count < prev.reset_count:
            raise VerifyError(
                "clock",
                f"resetCount went back: {prev.reset_count} -> {att.reset_count} (replayed quote?)",
            )
        if att.reset_count == prev.reset_count:
            if att.restart_count < prev.restart_count:
                raise VerifyError(
                    "clock",
                    f"restartCount went back: {prev.restart_count} -> {att.restart_count}",
                )
            if att.restart_count == prev.restart_count and att.clock <= prev.clock:
                raise VerifyError(
                    "clock",
                    f"TPM clock did not advance: {prev.clock} -> {att.clock} ms (replayed quote?)",
                )
        else:
            verdict.warnings.append(
                f"the TPM was reset since the previous quote ({prev.reset_count} -> "
                f"{att.reset_count}): PCRs were re-measured"
            )

    # 10: certify of the telemetry signing key
    cert_att_raw = _b64(result, "certify_attest", optional=True)
    if cert_att_raw is not None:
        cert_sig_raw = _b64(result, "certify_signature")
        sk_pub_raw = _b64(result, "signing_key_public")
        assert cert_sig_raw is not None and sk_pub_raw is not None
        try:
            verify_tpm_signature(ak.key, cert_sig_raw, cert_att_raw)
        except VerifyError as exc:
            raise VerifyError("certify_signature", exc.message) from None
        catt = _parse(ts.parse_attest, cert_att_raw, "certify_attest")
        if catt.magic != ts.TPM_GENERATED_VALUE or catt.type != ts.ST_ATTEST_CERTIFY:
            raise VerifyError("certify_type", "certify_attest is not a TPM2_Certify structure")
        if catt.extra_data != att.extra_data:
            raise VerifyError("certify_nonce", "the certify proof is not for this nonce")
        sk = _parse(ts.parse_tpm2b_public, sk_pub_raw, "signing_key_public")
        if catt.certified_name != sk.name:
            raise VerifyError(
                "certify_name",
                f"the AK certified Name {catt.certified_name.hex()}, the signing key's Name "
                f"is {sk.name.hex()}",
            )
        if not sk.has(ts.OA_FIXEDTPM) or not sk.has(ts.OA_SIGN) or sk.has(ts.OA_DECRYPT):
            raise VerifyError(
                "certify_attributes", "the telemetry key is not a fixedTPM signing-only key"
            )
        if "signing_key_pem" in result and not _same_key(
            _load_pem(result["signing_key_pem"], "signing_key_pem"), sk.key
        ):
            raise VerifyError(
                "certify_name", "signing_key_pem differs from the certified signing key"
            )
    else:
        verdict.warnings.append("no certify proof of the telemetry key in the result")

    # 11: binding log + expected model/config
    binding = result.get("binding")
    if isinstance(binding, Mapping):
        pcr_index = binding.get("pcr")
        key = f"sha256:{pcr_index}"
        if key not in verdict.pcrs:
            raise VerifyError("binding_log", f"the binding PCR {key} is not in the quote")
        cfg = _hex(binding.get("config_sha256"), "binding.config_sha256")
        models = binding.get("models") or []
        if not isinstance(models, list):
            raise VerifyError("malformed", "binding.models must be a list")
        entries: list[ModelBinding] = []
        for m in models:
            if not isinstance(m, Mapping):
                continue
            _hex(m.get("manifest_sha256"), "binding.models[].manifest_sha256")
            try:
                entries.append(parse_model_entry(m))
            except ValueError as exc:
                raise VerifyError("malformed", f"binding.models[]: {exc}") from None
        # replayed in the log's order (the device writes it sorted by model name): a
        # calibrated model extends its overlay digest right after its manifest
        digests = [d for e in entries for d in e.digests]
        if binding_value(cfg, digests).hex() != verdict.pcrs[key]:
            raise VerifyError("binding_log", f"the binding log does not replay to the quoted {key}")
        verdict.models = _model_list(entries)
        _check_expected(expect, key, verdict.pcrs[key], cfg, entries)
        verdict.bindings_verified.append("pcr")
        if expect.overlays is not None and expect.models is None:
            # the PCR does not measure model names: without the expected model set, an
            # overlay digest could be passed off as the manifest of a model that is not there
            verdict.warnings.append(
                "expected calibration checked without the expected models: pass the "
                "deployed manifests too (--expect-model) for it to mean anything"
            )
    elif expect.any():
        raise VerifyError("binding_log", "the result has no binding log to check the model")

    # 12: the NV binding (the PCR binding above is forgeable by a local process)
    if nv.check and result.get("kind") != "software":
        verdict.nv_binding = _check_nv_binding(result, att.extra_data, ak.key, nv.name, expect)
        verdict.bindings_verified.append("nv")

    # the EK certificate, when present, must certify the EK public key in the result
    ek_cert_raw = _b64(result, "ek_certificate", optional=True)
    ek_pub_raw = _b64(result, "ek_public", optional=True)
    if ek_cert_raw is not None and ek_pub_raw is not None:
        ek = _parse(ts.parse_tpm2b_public, ek_pub_raw, "ek_public")
        try:
            cert = x509.load_der_x509_certificate(ek_cert_raw)
        except ValueError as exc:
            raise VerifyError("malformed", f"ek_certificate is not DER X.509: {exc}") from None
        if not _same_key(cert.public_key(), ek.key):
            raise VerifyError("ek_mismatch", "the EK certificate is for a different key")
    return verdict


def _model_list(entries: Sequence[ModelBinding]) -> list[dict[str, Any]]:
    return [
        {"name": e.name, "manifest_sha256": e.manifest_sha256.hex(),
         "calibration": e.calibration()}
        for e in entries
    ]  # fmt: skip


# BindingError.check of binding_verify -> the stable reason code of the verdict
NV_CODES = {
    "present": "nv_binding_malformed",
    "signature": "nv_binding_signature",
    "attest": "nv_binding_attest",
    "index_name": "nv_binding_index_name",
    "replay": "nv_binding_replay",
    "expected": "nv_binding_mismatch",
}


def _check_nv_binding(
    result: Mapping[str, Any], nonce: bytes, ak_key: Any, pinned: bytes | None, expect: _Expect
) -> dict[str, Any]:
    """Check 12 (`nonce`: the quote's, already compared with the verifier's)."""
    nvb = result.get("nv_binding")
    if nvb is None:
        raise VerifyError(
            "nv_binding_missing",
            "the TPM result has no nv_binding: only the PCR binding, which any local process "
            "with TPM access can reset and extend, vouches for the config and models (a "
            "gateway from before the NV binding: --insecure-skip-nv-binding)",
        )
    if pinned is None:
        raise VerifyError(
            "nv_name_untrusted",
            "no pinned NV binding index Name: the AK certifies any NV index, also one a "
            "local attacker defined and extends at will; pin the Name recorded at "
            "enrolment (--enrolment FILE from `edgerund attest enroll`, or --nv-name HEX)",
        )
    ak_pem = ak_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        v = verify_nv_binding(
            result, nonce=nonce, ak_pem=ak_pem, pinned_name=pinned,
            expected_config_sha256=expect.config, expected_models=expect.models,
            expected_overlays=expect.overlays,
        )  # fmt: skip
    except BindingError as exc:
        raise VerifyError(NV_CODES.get(exc.check, "nv_binding_malformed"), exc.message) from None
    except (ValueError, TypeError, KeyError) as exc:  # never raise for bad input
        raise VerifyError("nv_binding_malformed", f"nv_binding: {exc!r}") from None
    events = nvb["log"]["events"]  # parsed by verify_nv_binding
    return {
        "verified": True,
        "index": str(nvb.get("index")),
        "name": v.index_name.hex(),
        "value": v.value.hex(),
        "events": len(events),
        "config_sha256": v.config_sha256.hex(),
        "models": _model_list(v.entries),
    }


def _check_expected(
    expect: _Expect, key: str, value: str, cfg: bytes, entries: Sequence[ModelBinding]
) -> None:
    """The replayed binding log against what the verifier deployed (`binding_mismatch`)."""
    if expect.binding is not None and value != expect.binding.hex():
        raise VerifyError(
            "binding_mismatch",
            f"{key} is {value}, the expected model/config give "
            f"{expect.binding.hex()}: the gateway runs a different model, calibration or config",
        )
    if expect.config is not None and cfg != expect.config:
        raise VerifyError(
            "binding_mismatch",
            f"bound config {cfg.hex()} != expected {expect.config.hex()}: the gateway runs "
            "a different config",
        )
    bound = {e.name: e.manifest_sha256 for e in entries}
    if expect.models is not None and bound != dict(expect.models):
        raise VerifyError(
            "binding_mismatch",
            f"bound models {sorted((k, v.hex()) for k, v in bound.items())} != expected "
            f"{sorted((k, v.hex()) for k, v in expect.models.items())}: the gateway runs a "
            "different model",
        )
    if expect.overlays is not None:
        why = overlay_mismatch(entries, expect.overlays)
        if why is not None:
            raise VerifyError("binding_mismatch", why)
