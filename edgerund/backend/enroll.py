"""AK enrolment by credential activation: the verifier's decisions, I/O-free.

`edgerund attest enroll` (attest_cli.py) is the orchestration; this module holds every
check, so a fleet backend can call the same functions from its own registrar.

    1. device facts  <- `edgerunctl --json identity` (or an attestation result): EK public,
                        EK certificate, AK public. Nothing in them is trusted yet.
    2. begin()          EK certificate -> CA bundle, and its key == EK public
                        (ekcert.py); AK = restricted, fixedTPM signing key without
                        decrypt (`ak_attributes`); the verifier computes the AK Name
                        itself; MakeCredential(EK, fresh 32-byte secret, AK Name).
    3. device           TPM2_ActivateCredential(AK, EK) through the `attest-activate`
                        socket command; a TPM releases the secret only if it holds the EK
                        private key AND a loaded object with exactly that Name.
    4. finish()         the returned secret equals ours (constant-time compare), else
                        `activation_failed`. The AK is now proven: the verifier pins it
                        (ak.pem for `attest verify --ak-pem`).

Error codes are VerifyError codes (stable): malformed, ek_cert_missing, ek_mismatch,
ek_cert_untrusted, ek_cert_expired, ek_attributes, ak_attributes, activation_failed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from edgerund.backend.ekcert import validate_ek_certificate
from edgerund.backend.makecredential import CredentialError, check_ek, make_credential
from edgerund.backend.verify import VerifyError
from edgerund.identity import tpmstruct as ts
from edgerund.identity.base import pem

SECRET_BYTES = 32


@dataclass(frozen=True)
class DeviceFacts:
    ek: ts.PublicArea
    ek_public: bytes  # marshalled TPM2B_PUBLIC as reported
    ek_certificate: bytes | None
    ak: ts.PublicArea
    ak_public: bytes


@dataclass(frozen=True)
class Pending:
    """The verifier's side of one activation: keep it private until finish()."""

    secret: bytes
    ak_public: bytes
    ak_name: bytes
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "secret": self.secret.hex(),
            "ak_public": base64.b64encode(self.ak_public).decode(),
            "ak_name": self.ak_name.hex(),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pending:
        try:
            ak_public = base64.b64decode(str(d["ak_public"]), validate=True)
            return cls(
                secret=bytes.fromhex(str(d["secret"])),
                ak_public=ak_public,
                ak_name=bytes.fromhex(str(d["ak_name"])),
                warnings=[str(w) for w in d.get("warnings", [])],
            )
        except (KeyError, ValueError, binascii.Error) as exc:
            raise VerifyError("malformed", f"pending enrolment state: {exc}") from None


@dataclass(frozen=True)
class Enrolled:
    ak_public: bytes
    ak_name: bytes
    ak_pem: str
    warnings: list[str]


def _b64_field(doc: Mapping[str, Any], key: str, *, optional: bool = False) -> bytes | None:
    v = doc.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise VerifyError("malformed", f"device facts: field {key!r} missing or not base64")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise VerifyError("malformed", f"device facts: field {key!r} is not base64") from None


def _public(raw: bytes, what: str) -> ts.PublicArea:
    try:
        return ts.parse_tpm2b_public(raw)
    except ts.StructError as exc:
        raise VerifyError("malformed", f"{what}: {exc}") from None


def parse_device_facts(doc: Mapping[str, Any]) -> DeviceFacts:
    """From `edgerunctl --json identity` or an attestation result (or a socket response)."""
    if not isinstance(doc, Mapping):
        raise VerifyError("malformed", "device facts must be a JSON object")
    if "result" in doc and isinstance(doc["result"], Mapping) and "ak_public" not in doc:
        doc = doc["result"]
    if doc.get("kind") == "software":
        raise VerifyError(
            "software_identity",
            "the device runs the software identity: there is no TPM to activate a credential",
        )
    ek_public = _b64_field(doc, "ek_public")
    ak_public = _b64_field(doc, "ak_public")
    assert ek_public is not None and ak_public is not None
    cert = _b64_field(doc, "ek_certificate", optional=True)
    return DeviceFacts(
        ek=_public(ek_public, "ek_public"), ek_public=ek_public, ek_certificate=cert,
        ak=_public(ak_public, "ak_public"), ak_public=ak_public,
    )  # fmt: skip


def check_ak(ak: ts.PublicArea) -> None:
    if not (ak.has(ts.OA_RESTRICTED) and ak.has(ts.OA_SIGN)) or ak.has(ts.OA_DECRYPT):
        raise VerifyError(
            "ak_attributes",
            f"the AK must be a restricted signing key without decrypt "
            f"(objectAttributes 0x{ak.attributes:08x})",
        )
    if not (ak.has(ts.OA_FIXEDTPM) and ak.has(ts.OA_FIXEDPARENT)):
        raise VerifyError("ak_attributes", "the AK is not fixedTPM|fixedParent")
    if not ak.has(ts.OA_SENSITIVEDATAORIGIN):
        raise VerifyError(
            "ak_attributes", "the AK was imported (no sensitiveDataOrigin): it may exist outside"
        )


def begin(
    facts: DeviceFacts,
    anchors: Sequence[x509.Certificate] | None,
    *,
    insecure_skip_ek_cert: bool = False,
    secret: bytes | None = None,
) -> tuple[dict[str, str], Pending]:
    """Checks 2 of the module docstring; returns (args for attest-activate, Pending)."""
    warnings: list[str] = []
    if anchors is None or insecure_skip_ek_cert:
        if not insecure_skip_ek_cert:
            raise VerifyError(
                "ek_cert_untrusted",
                "no EK CA bundle given (--ek-ca FILE): nothing vouches that the EK is a "
                "genuine TPM's (--insecure-skip-ek-cert to skip this check)",
            )
        warnings.append("EK certificate NOT checked (--insecure-skip-ek-cert)")
    else:
        validate_ek_certificate(facts.ek_certificate, facts.ek, anchors)
    try:
        check_ek(facts.ek)
    except CredentialError as exc:
        raise VerifyError("ek_attributes", str(exc)) from None
    check_ak(facts.ak)
    secret = secret or os.urandom(SECRET_BYTES)
    cred = make_credential(facts.ek, secret, facts.ak.name)
    args = {
        "credential_blob": base64.b64encode(cred.blob).decode(),
        "encrypted_secret": base64.b64encode(cred.encrypted_secret).decode(),
    }
    return args, Pending(secret, facts.ak_public, facts.ak.name, warnings)


def finish(pending: Pending, response: Mapping[str, Any]) -> Enrolled:
    """Check the device's answer to attest-activate (check 4)."""
    if isinstance(response, Mapping) and isinstance(response.get("result"), Mapping):
        response = response["result"]
    got = response.get("secret") if isinstance(response, Mapping) else None
    try:
        got_bytes = bytes.fromhex(got) if isinstance(got, str) else b""
    except ValueError:
        got_bytes = b""
    if not hmac.compare_digest(got_bytes, pending.secret):
        raise VerifyError(
            "activation_failed",
            "the device did not return the credential: its TPM does not hold both the "
            "certified EK and the AK it reported",
        )
    ak = ts.parse_tpm2b_public(pending.ak_public)
    return Enrolled(pending.ak_public, pending.ak_name, pem(ak.key), list(pending.warnings))
