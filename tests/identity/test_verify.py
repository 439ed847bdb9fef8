"""The pure-Python verifier and wire structures (no TPM needed: software-identity results)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerund.backend.forgeries import forge_quote, forged_quotes_accepted
from edgerund.backend.verify import expected_binding_for_files, verify_result
from edgerund.identity import tpmstruct as ts
from edgerund.identity.base import pem
from edgerund.identity.binding import binding_value, parse_nonce
from edgerund.identity.config import IdentityConfig
from edgerund.identity.software import SoftwareIdentity
from tests.identity.pins import pins

NONCE = b"\x5a" * 32


@pytest.fixture
def result(tmp_path: Path) -> dict[str, Any]:
    async def make() -> dict[str, Any]:
        ident = SoftwareIdentity(IdentityConfig(), tmp_path)
        await ident.open()
        await ident.bind_config(b"\x01" * 32)
        return await ident.attest(NONCE)

    return asyncio.run(make())


def check(r: dict[str, Any], **kw: Any) -> tuple[bool, str]:
    """Verify as a configured verifier: its nonce and the AK it pinned (r's own by default)."""
    kw.setdefault("nonce", bytes.fromhex(r["nonce"]) if isinstance(r.get("nonce"), str) else NONCE)
    kw.setdefault("ak_pem", r.get("ak_pem") if isinstance(r.get("ak_pem"), str) else None)
    kw.setdefault("insecure_skip_ak_trust", kw["ak_pem"] is None)
    v = verify_result(r, allow_software=True, **kw)
    return v.ok, v.code


def test_valid_result(result: dict[str, Any]):
    assert check(result, nonce=NONCE) == (True, "ok")


def flip(b64: str, index: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x80
    return base64.b64encode(bytes(raw)).decode()


def test_tampering_is_rejected_with_specific_codes(result: dict[str, Any]):
    r = result
    assert check(r, nonce=b"\x00" * 32) == (False, "nonce_mismatch")
    assert check(dict(r, nonce="00" * 32), nonce=NONCE) == (False, "nonce_mismatch")
    # a replay: the verifier sent a new nonce, the result carries the old one
    assert check(r, nonce=os.urandom(32)) == (False, "nonce_mismatch")
    assert check(dict(r, attest=flip(r["attest"], 40))) == (False, "bad_signature")
    assert check(dict(r, signature=flip(r["signature"], 10))) == (False, "bad_signature")
    bad_pcrs = dict(r["pcrs"], **{"sha256:0": "ab" * 32})
    assert check(dict(r, pcrs=bad_pcrs)) == (False, "pcr_digest")
    missing = {k: v for k, v in r["pcrs"].items() if k != "sha256:7"}
    assert check(dict(r, pcrs=missing)) == (False, "pcr_selection")
    assert check(dict(r, pcr_selection="sha256:0,1,2,3,4,5,6,23")) == (False, "pcr_selection")
    assert check(dict(r, attest="%%%")) == (False, "malformed")
    assert check(dict(r, attest=base64.b64encode(b"\x00" * 5).decode()))[0] is False
    assert check({k: v for k, v in r.items() if k != "signature"}) == (False, "malformed")
    # the certify proof must name the signing key and carry the same nonce
    assert check(dict(r, signing_key_public=r["ak_public"])) == (False, "certify_name")
    assert check(dict(r, certify_attest=flip(r["certify_attest"], 30)))[1] == "certify_signature"
    # a signing-key AK (non-restricted) is refused
    assert check(dict(r, ak_public=r["signing_key_public"]))[1] in ("ak_attributes",)


def test_quote_type_and_magic_checked(tmp_path: Path):
    """A valid signature over a non-quote structure is still refused (restricted-key logic)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    ident = SoftwareIdentity(IdentityConfig(), tmp_path)
    asyncio.run(ident.open())
    r = asyncio.run(ident.attest(NONCE))
    for magic, typ, code in ((0x12345678, ts.ST_ATTEST_QUOTE, "bad_magic"),
                             (ts.TPM_GENERATED_VALUE, ts.ST_ATTEST_CERTIFY, "bad_type")):  # fmt: skip
        att = ts.parse_attest(base64.b64decode(r["attest"]))
        forged = ts.marshal_attest(ts.Attest(**{**att.__dict__, "magic": magic, "type": typ}))
        rr, ss = decode_dss_signature(ident._ak.sign(forged, ec.ECDSA(hashes.SHA256())))
        bad = dict(r, attest=base64.b64encode(forged).decode(),
                   signature=base64.b64encode(ts.marshal_ecdsa_signature(rr, ss)).decode())  # fmt: skip
        assert check(bad) == (False, code)


def test_clock_checks(tmp_path: Path):
    async def two() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        ident = SoftwareIdentity(IdentityConfig(), tmp_path)
        await ident.open()
        a = await ident.attest(b"\x01")
        await asyncio.sleep(0.01)
        b = await ident.attest(b"\x02")
        ident2 = SoftwareIdentity(IdentityConfig(), tmp_path)  # a "reboot": resetCount + 1
        await ident2.open()
        c = await ident2.attest(b"\x03")
        return a, b, c

    a, b, c = asyncio.run(two())
    assert check(b, previous=a) == (True, "ok")
    assert check(a, previous=b) == (False, "clock")
    assert check(c, previous=b) == (True, "ok")  # after a reset the clock may restart
    v = verify_result(c, previous=b, allow_software=True, nonce=b"\x03", **pins(c))
    assert any("reset" in w for w in v.warnings)
    assert check(b, previous=c) == (False, "clock")  # resetCount went back


def test_binding_expectation(tmp_path: Path):
    cfg = tmp_path / "edgerund.yaml"
    cfg.write_text("gateway: {id: x}\n")
    ma, mb = tmp_path / "a.json", tmp_path / "b.json"
    ma.write_text(json.dumps({"name": "zeta", "version": "1"}))
    mb.write_text(json.dumps({"name": "alpha", "version": "2"}))
    import hashlib

    want = binding_value(
        hashlib.sha256(cfg.read_bytes()).digest(),
        [hashlib.sha256(mb.read_bytes()).digest(), hashlib.sha256(ma.read_bytes()).digest()],
    )
    # manifests are ordered by model name, whatever the order given
    assert expected_binding_for_files(cfg, [ma, mb]) == want
    assert expected_binding_for_files(cfg, [mb, ma]) == want
    assert expected_binding_for_files(cfg, [ma]) != want


def test_parse_nonce():
    assert parse_nonce("0x" + "ab" * 64) == b"\xab" * 64
    for bad, text in (("", "empty"), ("abc", "hex"), ("zz", "hex"), ("00" * 65, "at most 64")):
        with pytest.raises(ValueError, match=text):
            parse_nonce(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_never_crash_on_garbage(data: bytes):
    for fn in (ts.parse_attest, ts.parse_signature, ts.parse_tpm2b_public):
        try:
            fn(data)
        except ts.StructError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["attest", "signature", "ak_public", "nonce", "pcrs",
                                        "pcr_selection", "binding", "certify_attest"]),
                       st.one_of(st.text(max_size=20), st.integers(), st.none())))  # fmt: skip
def test_verifier_never_raises_on_garbage(doc: dict[str, Any]):
    v = verify_result(doc)
    assert v.ok is False


def test_pcr_selection_roundtrip():
    sel = ts.parse_pcr_selection_string("sha256:23,0,7+sha1:1")
    assert sel == [(ts.ALG_SHA256, [0, 7, 23]), (ts.ALG_SHA1, [1])]
    assert ts.format_pcr_selection(sel) == "sha256:0,7,23+sha1:1"
    for bad in ("", "md5:1", "sha256:24", "sha256:", "sha256:x"):
        with pytest.raises(ValueError):
            ts.parse_pcr_selection_string(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import argparse, sys\n"
        "from edgerund.backend.attest_cli import register\n"
        "p = argparse.ArgumentParser(prog='edgerund'); sub = p.add_subparsers(required=True)\n"
        "register(sub); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])  # fmt: skip


def test_cli_exit_codes(result: dict[str, Any], tmp_path: Path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(result))
    ak = tmp_path / "ak.pem"
    ak.write_text(result["ak_pem"])
    ok = run_cli("attest", "verify", "--result", str(f), "--nonce", NONCE.hex(),
                 "--ak-pem", str(ak), "--allow-software")  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.startswith("VALID"), ok.stdout + ok.stderr
    bad = run_cli("attest", "verify", "--result", str(f), "--nonce", "00" * 32,
                  "--ak-pem", str(ak), "--allow-software")  # fmt: skip
    assert bad.returncode == 1 and "INVALID (nonce_mismatch)" in bad.stdout
    sw = run_cli(
        "attest", "verify", "--result", str(f), "--nonce", NONCE.hex(), "--ak-pem", str(ak)
    )
    assert sw.returncode == 1 and "software_identity" in sw.stdout
    usage = run_cli("attest", "verify", "--result", str(f), "--nonce", "xyz")
    assert usage.returncode == 2 and "hex" in usage.stderr
    missing = run_cli("attest", "verify", "--result", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert run_cli("attest", "verify").returncode == 2  # argparse usage error
    # a socket response wrapper is accepted as well
    f.write_text(json.dumps({"id": 1, "ok": True, "result": result}))
    js = run_cli("attest", "verify", "--result", str(f), "--allow-software", "--json",
                 "--nonce", NONCE.hex(), "--ak-pem", str(ak))  # fmt: skip
    assert js.returncode == 0 and json.loads(js.stdout)["valid"] is True


# ---------------------------------------------------------------- forged quotes (issue #12)


def test_forged_quote_refused_by_default_with_the_reason():
    """A quote made in software (no TPM) that says kind "tpm" used to print VALID."""
    forged = forge_quote(ec.generate_private_key(ec.SECP256R1()), NONCE)
    # the pre-fix invocation: no nonce, no pin
    v = verify_result(forged)
    assert (v.ok, v.code) == (False, "no_nonce") and "--nonce" in v.message
    # with the nonce but no trusted AK
    v = verify_result(forged, nonce=NONCE)
    assert (v.ok, v.code) == (False, "ak_untrusted") and "--ak-pem" in v.message
    # with the AK the verifier enrolled (the forger does not hold its private key)
    genuine_ak = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    v = verify_result(forged, nonce=NONCE, ak_pem=genuine_ak)
    assert (v.ok, v.code) == (False, "ak_mismatch")
    # the switches skip exactly what they name, and nothing else
    v = verify_result(forged, nonce=NONCE, insecure_skip_ak_trust=True)
    assert (v.ok, v.code) == (False, "nv_binding_missing")  # a software quote has none
    v = verify_result(
        forged, nonce=NONCE, insecure_skip_ak_trust=True, insecure_skip_nv_binding=True
    )
    assert v.ok and any("INSECURE" in w for w in v.warnings)
    v = verify_result(forged, **pins(forged))
    assert (v.ok, v.code) == (False, "no_nonce")
    v = verify_result(forged, **pins(forged), insecure_no_nonce=True, insecure_skip_nv_binding=True)
    assert v.ok and any("no nonce" in w for w in v.warnings)


def test_cli_refuses_forged_quote_by_default(tmp_path: Path):
    forged = forge_quote(ec.generate_private_key(ec.SECP256R1()), NONCE)
    f = tmp_path / "forged.json"
    f.write_text(json.dumps(forged))
    bare = run_cli("attest", "verify", "--result", str(f))
    assert bare.returncode == 1 and "INVALID (no_nonce)" in bare.stdout, bare.stdout
    nonce_only = run_cli("attest", "verify", "--result", str(f), "--nonce", NONCE.hex())
    assert nonce_only.returncode == 1 and "INVALID (ak_untrusted)" in nonce_only.stdout
    pinned = tmp_path / "enrolled-ak.pem"
    pinned.write_text(pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    p = run_cli("attest", "verify", "--result", str(f), "--nonce", NONCE.hex(),
                "--ak-pem", str(pinned))  # fmt: skip
    assert p.returncode == 1 and "INVALID (ak_mismatch)" in p.stdout
    # a quote made in software has no NV binding: skipping the AK trust is not enough ...
    skip = run_cli("attest", "verify", "--result", str(f), "--nonce", NONCE.hex(),
                   "--insecure-skip-ak-trust")  # fmt: skip
    assert skip.returncode == 1 and "INVALID (nv_binding_missing)" in skip.stdout, skip.stdout
    # ... each switch skips exactly the check it names
    skip = run_cli("attest", "verify", "--result", str(f), "--nonce", NONCE.hex(),
                   "--insecure-skip-ak-trust", "--insecure-skip-nv-binding")  # fmt: skip
    assert skip.returncode == 0 and "INSECURE" in skip.stdout
    assert "binding verified: none" in skip.stdout  # the forgery carries no binding log


def test_forged_quotes_accepted_is_zero(result: dict[str, Any]):
    # the software identity's result plays a genuine earlier TPM result of the pinned AK
    out = forged_quotes_accepted(ak_pem=result["ak_pem"], genuine=dict(result, kind="tpm"))
    assert out["forged_quotes_tried"] >= 18
    assert out["forged_quotes_accepted"] == 0, out["codes"]
    assert out["codes"]["software_quote_claims_tpm"] == "ak_mismatch"
    assert out["codes"]["software_quote_claims_tpm+no_flags"] == "no_nonce"
    assert out["codes"]["replayed_genuine"] == "nonce_mismatch"
    assert out["codes"]["genuine_altered_pcrs"] == "pcr_digest"
    assert out["codes"]["software_kind"] == "ak_mismatch"

    # and the counter does count: a verifier that trusts any AK accepts the forgery
    def lax_verify(r: dict[str, Any], **kw: Any) -> Any:
        return verify_result(
            r,
            **{
                **kw,
                "insecure_skip_ak_trust": True,
                "ak_pem": None,
                "insecure_skip_nv_binding": True,
            },
        )

    lax = forged_quotes_accepted(verify=lax_verify)
    assert lax["forged_quotes_accepted"] >= 1


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["ek_public", "ak_public", "ek_certificate", "kind",
                                        "secret", "result"]),
                       st.one_of(st.text(max_size=40), st.integers(), st.none(),
                                 st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()))))  # fmt: skip
def test_enrolment_parsers_fail_only_with_verify_errors(doc: dict[str, Any]):
    from edgerund.backend import enroll
    from edgerund.backend.verify import VerifyError

    with pytest.raises(VerifyError):
        enroll.parse_device_facts(doc)
    pending = enroll.Pending(secret=b"\x01" * 32, ak_public=b"", ak_name=b"")
    with pytest.raises(VerifyError) as err:
        enroll.finish(pending, doc)
    assert err.value.code == "activation_failed"


def test_invalid_rsa_public_area_is_malformed_not_a_crash(result: dict[str, Any]):
    import struct

    body = struct.pack(">HHI", ts.ALG_RSA, ts.ALG_SHA256, 0x00050072) + ts.b2(b"")
    body += struct.pack(">HHHI", ts.ALG_NULL, ts.ALG_NULL, 2048, 0) + ts.b2(b"\x00")  # n = 0
    bad = dict(result, ak_public=base64.b64encode(ts.b2(body)).decode())
    assert check(bad) == (False, "malformed")
