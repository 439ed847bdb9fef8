"""Attestation results forged WITHOUT a TPM, and a counter of how many a verifier accepts
(the backend's self-check: used by tests/identity and benchmarks/attacks.py).

`forged_quotes_accepted()` is the figure of issue #12 (`forged_quotes_accepted`, target 0):
it runs every variant through `verify_result` exactly as a verifier configured per
docs/identity.md would (its own fresh nonce, the AK pinned at enrolment) and counts VALID
verdicts. The forger has everything a local attacker has: any key of its own, the
gateway's public facts (AK public, EK certificate), and old genuine results if given.

Variants (name -> how it was made):
  software_quote_claims_tpm     a well-formed quote signed by the forger's own restricted-
                                looking key, `kind: "tpm"`, right nonce
  software_quote_no_nonce       the same with an empty extraData, verifier without a nonce
                                (the old default CLI invocation)
  genuine_ak_forged_signature   the genuine AK public area, a signature by the forger's key
  forged_ak_pem_field           the forger's AK in ak_public, the genuine ak_pem alongside
  software_kind                 the software identity's honest `kind: "software"` result
  unrestricted_ak               the forger's key marked as a non-restricted signing key
  non_quote_structure           a TPM_ST_ATTEST_CERTIFY structure presented as a quote
  replayed_genuine              a genuine earlier result replayed for a new nonce
  genuine_altered_pcrs          a genuine result with a PCR value changed
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from edgerund.backend.verify import Verdict, verify_result
from edgerund.identity import tpmstruct as ts
from edgerund.identity.base import pem
from edgerund.identity.software import AK_ATTRS, SK_ATTRS

SELECTION = "sha256:0,1,2,3,4,5,6,7,23"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def forge_quote(
    key: ec.EllipticCurvePrivateKey,
    nonce: bytes,
    *,
    kind: str = "tpm",
    ak_attrs: int = AK_ATTRS,
    attest_type: int = ts.ST_ATTEST_QUOTE,
    selection: str = SELECTION,
) -> dict[str, Any]:
    """A self-consistent attestation result built in software (no TPM anywhere)."""
    sel = ts.parse_pcr_selection_string(selection)
    values = {(h, i): os.urandom(32) for h, ix in sel for i in ix}
    att = ts.Attest(
        magic=ts.TPM_GENERATED_VALUE, type=attest_type, qualified_signer=b"\x00\x0b" + bytes(32),
        extra_data=nonce, clock=123456, reset_count=1, restart_count=0, safe=1,
        firmware_version=0x20191023, pcr_select=sel,
        pcr_digest=ts.pcr_digest(sel, values, ts.ALG_SHA256),
        certified_name=b"\x00\x0b" + bytes(32),
    )  # fmt: skip
    raw = ts.marshal_attest(att)
    r, s = decode_dss_signature(key.sign(raw, ec.ECDSA(hashes.SHA256())))
    return {
        "version": 1,
        "kind": kind,
        "nonce": nonce.hex(),
        "pcr_selection": selection,
        "attest": _b64(raw),
        "signature": _b64(ts.marshal_ecdsa_signature(r, s)),
        "pcrs": {f"{ts.HASH_NAMES[h]}:{i}": v.hex() for (h, i), v in sorted(values.items())},
        "ak_public": _b64(ts.marshal_ecc_public(key.public_key(), ak_attrs)),
        "ak_pem": pem(key.public_key()),
        "ek_public": None,
        "ek_certificate": None,
    }


def forged_variants(
    nonce: bytes, genuine: Mapping[str, Any] | None = None
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, result, extra verify kwargs) for each forgery; `genuine` adds replay variants."""
    key = ec.generate_private_key(ec.SECP256R1())
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("software_quote_claims_tpm", forge_quote(key, nonce), {}),
        ("software_quote_no_nonce", forge_quote(key, b""), {"nonce": None}),
        ("software_kind", forge_quote(key, nonce, kind="software"), {}),
        ("unrestricted_ak", forge_quote(key, nonce, ak_attrs=SK_ATTRS), {}),
        ("non_quote_structure", forge_quote(key, nonce, attest_type=ts.ST_ATTEST_CERTIFY), {}),
    ]
    if genuine is not None:
        f = forge_quote(key, nonce, selection=str(genuine["pcr_selection"]))
        out.append(("genuine_ak_forged_signature", dict(f, ak_public=genuine["ak_public"],
                                                        ak_pem=genuine["ak_pem"]), {}))  # fmt: skip
        out.append(("forged_ak_pem_field", dict(f, ak_pem=genuine["ak_pem"]), {}))
        out.append(("replayed_genuine", dict(genuine), {}))
        pcrs = dict(genuine["pcrs"])
        first = sorted(pcrs)[0]
        pcrs[first] = hashlib.sha256(b"forged").hexdigest()
        fresh = dict(genuine, pcrs=pcrs)
        out.append(("genuine_altered_pcrs", fresh, {"nonce": bytes.fromhex(genuine["nonce"])}))
    return out


def forged_quotes_accepted(
    *,
    ak_pem: str | None = None,
    genuine: Mapping[str, Any] | None = None,
    verify: Callable[..., Verdict] = verify_result,
) -> dict[str, Any]:
    """Run every forged variant through `verify` as a correctly configured verifier would.

    `ak_pem` is the AK the verifier pinned at enrolment (default: a fresh key the forger
    does not hold, i.e. some genuine gateway's AK); `genuine` an earlier genuine result of
    that AK (adds the replay/tamper variants). Returns the counts and every verdict code.
    """
    if ak_pem is None:
        ak_pem = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    nonce = os.urandom(32)
    codes: dict[str, str] = {}
    accepted = 0
    for name, result, extra in forged_variants(nonce, genuine):
        kw: dict[str, Any] = {"nonce": nonce, "ak_pem": ak_pem, **extra}
        v = verify(result, **kw)
        codes[name] = v.code
        accepted += int(v.ok)
        # the pre-fix default invocation (no nonce, no pin) must refuse as well
        bare = verify(result)
        codes[name + "+no_flags"] = bare.code
        accepted += int(bare.ok)
    return {"forged_quotes_tried": len(codes), "forged_quotes_accepted": accepted,
            "codes": codes}  # fmt: skip
