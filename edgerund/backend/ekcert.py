"""EK certificate validation against the CA bundle a verifier is given (`--ek-ca FILE`).

The EK certificate is the only statement by a third party (the TPM or platform maker) that
a key is a TPM's endorsement key. The device reports it (read from NV 0x01C00002 and
friends at enrolment), so nothing about it is trusted until:

1. `ek_cert_missing`    a certificate is present (a verifier given a CA bundle refuses a
                        device that has none; --insecure-skip-ek-cert skips this step).
2. `malformed`          it parses as DER X.509.
3. `ek_mismatch`        its subject public key equals the EK public key the device reports
                        (the key MakeCredential encrypts to): a genuine certificate of
                        another TPM does not vouch for this EK.
4. `ek_cert_untrusted`  it chains to a certificate in the bundle: every certificate in the
                        bundle is a trust anchor (as in Keylime's tpm_cert_store, since a
                        device reports only its leaf certificate the bundle holds the
                        manufacturers' intermediates too). Each link is checked by
                        signature (not by name only), the issuer must be a CA
                        (basicConstraints cA), and the walk continues through the bundle
                        until a self-signed certificate or one whose issuer is not in it.
5. `ek_cert_expired`    every certificate on that path is within its validity period.

EK certificates are not web-PKI certificates (empty subject, critical SAN with a
directoryName of TPM manufacturer/model/version, no EKU, sometimes RSA-PSS), so this does
not use a TLS path builder; it checks exactly the properties above. Pure: bytes, keys and a
clock in, a chain or a VerifyError out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from edgerund.backend.verify import VerifyError
from edgerund.identity import tpmstruct as ts

MAX_CHAIN = 8


def load_ca_bundle(pem: bytes, what: str = "the EK CA bundle") -> list[x509.Certificate]:
    """PEM certificates (one or more) of the accepted EK CAs; ValueError if none."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{what}: not PEM certificates: {exc}") from None
    if not certs:
        raise ValueError(f"{what}: no certificate found")
    return certs


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(ku.key_cert_sign)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)  # issuer name AND signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_time(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerifyError(
            "ek_cert_expired",
            f"{what} ({cert.subject.rfc4514_string() or cert.issuer.rfc4514_string()}) is valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
            f"now is {now:%Y-%m-%d}",
        )


def validate_ek_certificate(
    cert_der: bytes | None,
    ek: ts.PublicArea,
    anchors: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> list[x509.Certificate]:
    """Check the EK certificate (module docstring); returns the path [leaf, issuer, ...]."""
    if cert_der is None:
        raise VerifyError(
            "ek_cert_missing",
            "the device reports no EK certificate, so nothing vouches that its EK is a TPM's "
            "(--insecure-skip-ek-cert to enrol it anyway)",
        )
    try:
        leaf = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise VerifyError("malformed", f"ek_certificate is not DER X.509: {exc}") from None
    try:
        cert_key = leaf.public_key()
    except (ValueError, TypeError) as exc:
        raise VerifyError("malformed", f"ek_certificate has an unusable key: {exc}") from None
    if _spki(cert_key) != _spki(ek.key):
        raise VerifyError(
            "ek_mismatch", "the EK certificate certifies another key than the device's EK"
        )
    now = now or dt.datetime.now(dt.UTC)
    _check_time(leaf, now, "the EK certificate")
    path = [leaf]
    cur = leaf
    while len(path) <= MAX_CHAIN:
        issuer = next(
            (a for a in anchors if a is not cur and _is_ca(a) and _signed_by(cur, a)), None
        )
        if issuer is None:
            if cur is leaf:
                raise VerifyError(
                    "ek_cert_untrusted",
                    f"the EK certificate (issuer {leaf.issuer.rfc4514_string()!r}) is not "
                    f"signed by any CA certificate in the EK CA bundle ({len(anchors)} "
                    "certificate(s))",
                )
            return path  # cur is an anchor whose issuer is not in the bundle
        _check_time(issuer, now, "the EK CA certificate")
        path.append(issuer)
        if issuer.issuer == issuer.subject and _signed_by(issuer, issuer):
            return path  # a self-signed root
        cur = issuer
    raise VerifyError("ek_cert_untrusted", f"the EK CA chain is longer than {MAX_CHAIN}")
