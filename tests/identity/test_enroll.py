"""Credential activation and EK certificate validation against a real swtpm.

The swtpm here is manufactured by `swtpm_setup --create-ek-cert` with a CA made in this
test (swtpm_localca signs with our key), so the verifier can be given exactly that CA.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgerund.backend import enroll
from edgerund.backend.ekcert import validate_ek_certificate
from edgerund.backend.forgeries import forge_quote, forged_quotes_accepted
from edgerund.backend.makecredential import make_credential
from edgerund.backend.verify import VerifyError, verify_result
from edgerund.component import CommandError
from edgerund.identity import tpmstruct as ts
from edgerund.identity.base import pem
from edgerund.identity.credential import handle_activate
from edgerund.identity.software import AK_ATTRS
from edgerund.identity.tpm import TpmIdentity
from edgerund.identity.tpm_errors import TpmError
from tests.fixtures.swtpm import SwtpmProcess, _swtpm_binaries, provision_state
from tests.helpers.daemon import DaemonProcess
from tests.identity.conftest import tpm_config

pytestmark = pytest.mark.needs_swtpm


@dataclass
class EkCa:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    pem_file: Path


def make_ca(path: Path, cn: str = "edgerund test EK CA") -> EkCa:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        # swtpm_localca needs the authority key id of its issuer
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return EkCa(key, cert, path)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> EkCa:
    return make_ca(tmp_path_factory.mktemp("ekca") / "ca.pem")


@pytest.fixture(scope="session")
def ca_swtpm_template(tmp_path_factory: pytest.TempPathFactory, test_ca: EkCa) -> Path:
    """A TPM whose EK certificates swtpm_setup made with OUR CA (signkey/issuercert given)."""
    _swtpm_binaries()
    base = tmp_path_factory.mktemp("swtpm-ca-template")
    localca = base / "setup" / "localca"
    localca.mkdir(parents=True)
    (localca / "signkey.pem").write_bytes(
        test_ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (localca / "issuercert.pem").write_bytes(test_ca.cert.public_bytes(serialization.Encoding.PEM))
    provision_state(base / "state", base / "setup")
    return base / "state"


@pytest.fixture
def ca_swtpm(ca_swtpm_template: Path, tmp_path: Path) -> Iterator[SwtpmProcess]:
    binary, _ = _swtpm_binaries()
    state = tmp_path / "swtpm-state"
    shutil.copytree(ca_swtpm_template, state)
    with contextlib.suppress(FileNotFoundError):
        (state / ".lock").unlink()
    server = SwtpmProcess(binary, state, tmp_path / "swtpm.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def opened(swtpm: SwtpmProcess, tmp_path: Path, **kw: Any) -> TpmIdentity:
    ident = TpmIdentity(tpm_config(swtpm.tcti, **kw), tmp_path / "state")
    await ident.open()
    return ident


def facts_of(ident: TpmIdentity) -> enroll.DeviceFacts:
    return enroll.parse_device_facts(ident.public_fields())


# ---------------------------------------------------------------- MakeCredential on a real TPM


@pytest.mark.parametrize("ek_type", ["rsa2048", "ecc256"])
async def test_make_credential_activates_in_the_tpm(
    ca_swtpm: SwtpmProcess, tmp_path: Path, ek_type: str
):
    ident = await opened(ca_swtpm, tmp_path, ek_type=ek_type)
    try:
        facts = facts_of(ident)
        assert facts.ek.type == (ts.ALG_RSA if ek_type == "rsa2048" else ts.ALG_ECC)
        secret = os.urandom(32)
        cred = make_credential(facts.ek, secret, facts.ak.name)
        assert await ident.activate_credential(cred.blob, cred.encrypted_secret) == secret
        # a credential made for another AK Name is refused by the TPM (integrity check)
        other = ts.parse_tpm2b_public(
            ts.marshal_ecc_public(ec.generate_private_key(ec.SECP256R1()).public_key(), AK_ATTRS)
        )
        bad = make_credential(facts.ek, secret, other.name)
        with pytest.raises(TpmError):
            await ident.activate_credential(bad.blob, bad.encrypted_secret)
        # ... and through the socket command, with the reason
        args = {"credential_blob": base64.b64encode(bad.blob).decode(),
                "encrypted_secret": base64.b64encode(bad.encrypted_secret).decode()}  # fmt: skip
        with pytest.raises(CommandError) as err:
            await handle_activate(ident, args)
        assert err.value.code == "activation_failed"
        # the TPM still works after the refusals (transient EK and session flushed)
        ok = make_credential(facts.ek, secret, facts.ak.name)
        good = {"credential_blob": base64.b64encode(ok.blob).decode(),
                "encrypted_secret": base64.b64encode(ok.encrypted_secret).decode()}  # fmt: skip
        assert (await handle_activate(ident, good))["secret"] == secret.hex()
    finally:
        await ident.close()


async def test_credential_for_another_ek_is_refused(ca_swtpm: SwtpmProcess, tmp_path: Path):
    """A credential encrypted to a different EK (another TPM) cannot be activated here."""
    ident = await opened(ca_swtpm, tmp_path, ek_type="rsa2048")
    try:
        facts = facts_of(ident)
        foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        # the same EK public area with another modulus: what another TPM's EK looks like
        n = foreign.public_numbers().n.to_bytes(256, "big")
        raw = facts.ek.raw[:-258] + ts.b2(n)
        other_ek = ts.parse_tpmt_public(raw)
        cred = make_credential(other_ek, os.urandom(32), facts.ak.name)
        with pytest.raises(TpmError):
            await ident.activate_credential(cred.blob, cred.encrypted_secret)
    finally:
        await ident.close()


async def test_activate_request_is_size_checked(ca_swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(ca_swtpm, tmp_path)
    try:
        for args in ({}, {"credential_blob": "%%", "encrypted_secret": "AA=="},
                     {"credential_blob": base64.b64encode(b"\x00\x05ab").decode(),
                      "encrypted_secret": base64.b64encode(b"\x00\x01a").decode()},
                     {"credential_blob": base64.b64encode(b"\x10\x00" + bytes(4096)).decode(),
                      "encrypted_secret": base64.b64encode(b"\x00\x01a").decode()}):  # fmt: skip
            with pytest.raises(CommandError) as err:
                await handle_activate(ident, args)
            assert err.value.code == "bad_request"
    finally:
        await ident.close()


# ---------------------------------------------------------------- EK certificate chain


async def test_ek_certificate_chain(ca_swtpm: SwtpmProcess, tmp_path: Path, test_ca: EkCa):
    ident = await opened(ca_swtpm, tmp_path, ek_type="rsa2048")
    try:
        facts = facts_of(ident)
    finally:
        await ident.close()
    assert facts.ek_certificate is not None
    # valid chain: swtpm's EK certificate, signed by the test CA, for this EK
    path = validate_ek_certificate(facts.ek_certificate, facts.ek, [test_ca.cert])
    assert path[-1] == test_ca.cert

    def code(cert_der: bytes | None, anchors: list[x509.Certificate], **kw: Any) -> str:
        try:
            validate_ek_certificate(cert_der, facts.ek, anchors, **kw)
        except VerifyError as exc:
            return exc.code
        return "ok"

    # another CA, even one with the same name: refused (signatures, not names, decide)
    impostor = make_ca(tmp_path / "impostor.pem", cn=test_ca.cert.subject.rfc4514_string()[3:])
    assert code(facts.ek_certificate, [impostor.cert]) == "ek_cert_untrusted"
    assert code(facts.ek_certificate, [make_ca(tmp_path / "o.pem", "other").cert]) == (
        "ek_cert_untrusted"
    )
    # a certificate by the right CA whose key is not this EK: refused
    leaf = x509.load_der_x509_certificate(facts.ek_certificate)
    now = dt.datetime.now(dt.UTC)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong = (
        x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(test_ca.cert.subject)
        .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .sign(test_ca.key, hashes.SHA256())
    )  # fmt: skip
    assert code(wrong.public_bytes(serialization.Encoding.DER), [test_ca.cert]) == "ek_mismatch"
    # the impostor CA's certificate for the right EK key: refused
    forged = (
        x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(test_ca.cert.subject)
        .public_key(leaf.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .sign(impostor.key, hashes.SHA256())
    )  # fmt: skip
    assert code(forged.public_bytes(serialization.Encoding.DER), [test_ca.cert]) == (
        "ek_cert_untrusted"
    )
    assert code(None, [test_ca.cert]) == "ek_cert_missing"
    assert code(b"not der", [test_ca.cert]) == "malformed"
    later = now + dt.timedelta(days=365 * 40)
    assert code(facts.ek_certificate, [test_ca.cert], now=later) == "ek_cert_expired"


# ---------------------------------------------------------------- the whole flow, daemon


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgerund.cli", "attest", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def ctl(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path,
                           "--json", *args], capture_output=True, text=True, timeout=60)  # fmt: skip


def test_enroll_against_the_daemon_then_verify(
    tmp_path: Path, ca_swtpm: SwtpmProcess, test_ca: EkCa
):
    ak_file = tmp_path / "enrolled-ak.pem"
    other_ca = make_ca(tmp_path / "other-ca.pem", "another manufacturer")
    with DaemonProcess(tmp_path, {"identity": {"kind": "tpm", "tcti": ca_swtpm.tcti}}) as d:
        d.wait_ready()
        # an EK certificate from a CA the verifier does not trust: refused, nothing written
        bad = run_cli("enroll", "--socket", d.socket_path, "--ek-ca", str(other_ca.pem_file),
                      "--out", str(ak_file))  # fmt: skip
        assert bad.returncode == 1 and "INVALID (ek_cert_untrusted)" in bad.stdout, bad.stdout
        assert not ak_file.exists()
        no_ca = run_cli("enroll", "--socket", d.socket_path, "--out", str(ak_file))
        assert no_ca.returncode == 2 and "--ek-ca" in no_ca.stderr
        # the genuine flow: EK cert -> test CA, MakeCredential, attest-activate, pin
        ok = run_cli("enroll", "--socket", d.socket_path, "--ek-ca", str(test_ca.pem_file),
                     "--out", str(ak_file), "--json")  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr
        out = json.loads(ok.stdout)
        assert out["enrolled"] is True and out["quote"]["valid"] is True
        assert out["ak_name"] == d.call("identity")["ak_name"]
        # the enrolment record pins the AK and the NV binding index Name the proven AK
        # certified over the enrolment's nonce (its NV binding was verified with it)
        record = tmp_path / "enrolled-ak.enrolment.json"
        assert out["record_file"] == str(record) and out["quote"]["bindings_verified"] == [
            "pcr", "nv"]  # fmt: skip
        rec = json.loads(record.read_text())
        assert rec["ak_pem"] == ak_file.read_text() and rec["ak_name"] == out["ak_name"]
        assert rec["nv_binding"] == out["nv_binding"] and rec["nv_binding"]["index"] == "0x01500101"
        # a quote taken later verifies with the enrolled AK ...
        nonce = os.urandom(32).hex()
        q = ctl(d, "attest", "--nonce", nonce)
        assert q.returncode == 0, q.stderr
        genuine = json.loads(q.stdout)
        # ... and the offline two-step flow enrols the same AK
        ident_file, ch, pend, resp = (tmp_path / n for n in ("id.json", "ch.json", "p.json",
                                                            "r.json"))  # fmt: skip
        ident_file.write_text(ctl(d, "identity").stdout)
        step1 = run_cli("enroll", "--identity", str(ident_file), "--ek-ca",
                        str(test_ca.pem_file), "--challenge-out", str(ch), "--pending-out",
                        str(pend))  # fmt: skip
        assert step1.returncode == 0, step1.stdout + step1.stderr
        assert pend.stat().st_mode & 0o077 == 0
        act = ctl(d, "call", "attest-activate", ch.read_text())
        assert act.returncode == 0, act.stdout + act.stderr
        resp.write_text(act.stdout)
        ak2 = tmp_path / "ak2.pem"
        step2 = run_cli("enroll", "--pending", str(pend), "--response", str(resp),
                        "--out", str(ak2))  # fmt: skip
        assert step2.returncode == 0 and "ENROLLED" in step2.stdout, step2.stdout
        assert ak2.read_text() == ak_file.read_text()
        assert json.loads((tmp_path / "ak2.enrolment.json").read_text())["nv_binding"] is None
        assert "not pinned" in step2.stdout
        # ... with a result taken after the activation, it pins the NV index Name too
        n3 = os.urandom(32).hex()
        res3 = tmp_path / "res3.json"
        res3.write_text(ctl(d, "attest", "--nonce", n3).stdout)
        step2 = run_cli("enroll", "--pending", str(pend), "--response", str(resp),
                        "--out", str(ak2), "--result", str(res3), "--nonce", n3,
                        "--record", str(tmp_path / "rec2.json"))  # fmt: skip
        assert step2.returncode == 0 and "NV binding index 0x01500101 Name" in step2.stdout
        assert json.loads((tmp_path / "rec2.json").read_text()) == rec
        step2 = run_cli("enroll", "--pending", str(pend), "--response", str(resp),
                        "--out", str(ak2), "--result", str(res3), "--nonce", "00" * 32)  # fmt: skip
        assert step2.returncode == 1 and "INVALID (nonce_mismatch)" in step2.stdout
        # a wrong answer (e.g. from a device without that TPM) is refused
        resp.write_text(json.dumps({"secret": "00" * 32}))
        step2 = run_cli("enroll", "--pending", str(pend), "--response", str(resp),
                        "--out", str(tmp_path / "ak3.pem"))  # fmt: skip
        assert step2.returncode == 1 and "activation_failed" in step2.stdout
    result_file = tmp_path / "quote.json"
    result_file.write_text(json.dumps(genuine))
    v = run_cli("verify", "--result", str(result_file), "--nonce", nonce, "--enrolment",
                str(record))  # fmt: skip
    assert v.returncode == 0 and v.stdout.startswith("VALID"), v.stdout + v.stderr
    assert "binding verified: NV index 0x01500101" in v.stdout
    # the AK alone is not enough for a TPM result: the NV index Name must be pinned too
    v = run_cli("verify", "--result", str(result_file), "--nonce", nonce, "--ak-pem",
                str(ak_file))  # fmt: skip
    assert v.returncode == 1 and "INVALID (nv_name_untrusted)" in v.stdout, v.stdout
    # without the pin the same genuine quote is not trusted (the verifier cannot tell it
    # from a forgery), and a forged quote is refused against the pin
    v = run_cli("verify", "--result", str(result_file), "--nonce", nonce)
    assert v.returncode == 1 and "ak_untrusted" in v.stdout
    forged = forge_quote(ec.generate_private_key(ec.SECP256R1()), bytes.fromhex(nonce))
    result_file.write_text(json.dumps(forged))
    v = run_cli("verify", "--result", str(result_file), "--nonce", nonce, "--ak-pem",
                str(ak_file))  # fmt: skip
    assert v.returncode == 1 and "INVALID (ak_mismatch)" in v.stdout
    counted = forged_quotes_accepted(ak_pem=ak_file.read_text(), genuine=genuine)
    assert counted["forged_quotes_accepted"] == 0, counted["codes"]


def test_enroll_refuses_a_substituted_ak(tmp_path: Path, ca_swtpm: SwtpmProcess, test_ca: EkCa):
    """A man in the middle reports the genuine EK (and its certificate) with ITS OWN AK: the
    verifier's credential is bound to that AK's Name, so the genuine TPM cannot release it."""
    with DaemonProcess(tmp_path, {"identity": {"kind": "tpm", "tcti": ca_swtpm.tcti}}) as d:
        d.wait_ready()
        doc = d.call("identity")
        attacker = ec.generate_private_key(ec.SECP256R1())
        doc["ak_public"] = base64.b64encode(
            ts.marshal_ecc_public(attacker.public_key(), AK_ATTRS)
        ).decode()
        doc["ak_pem"] = pem(attacker.public_key())
        challenge, pending = enroll.begin(enroll.parse_device_facts(doc), [test_ca.cert])
        with pytest.raises(CommandError) as err:
            d.call("attest-activate", challenge)
        assert err.value.code == "activation_failed"
        with pytest.raises(VerifyError) as verr:
            enroll.finish(pending, {"secret": os.urandom(32).hex()})
        assert verr.value.code == "activation_failed"
        # a non-restricted "AK" is refused before any credential is made
        doc["ak_public"] = base64.b64encode(
            ts.marshal_ecc_public(attacker.public_key(), AK_ATTRS & ~ts.OA_RESTRICTED)
        ).decode()
        with pytest.raises(VerifyError) as verr:
            enroll.begin(enroll.parse_device_facts(doc), [test_ca.cert])
        assert verr.value.code == "ak_attributes"
        # and a genuine quote still verifies with the genuine AK
        nonce = os.urandom(16)
        r = d.call("attest", {"nonce": nonce.hex()})
        nv_name = bytes.fromhex(r["nv_binding"]["name"])
        assert verify_result(
            r, nonce=nonce, ak_pem=d.call("identity")["ak_pem"], nv_name=nv_name
        ).ok


async def test_activate_is_privileged_and_software_identity_refuses(tmp_path: Path):
    from edgerund.component import Peer
    from tests.identity.conftest import make_identity

    comp = make_identity(tmp_path, kind="software")
    async with comp:
        cmd = comp.commands()["attest-activate"]
        assert cmd.mutating is True  # the diag socket refuses it to unprivileged peers
        info = await comp.commands()["identity"].handler({}, Peer(1, 0, 0))
        with pytest.raises(VerifyError) as verr:
            enroll.parse_device_facts(info)
        assert verr.value.code == "software_identity"
        blob = base64.b64encode(b"\x00\x03abc").decode()
        with pytest.raises(CommandError) as err:
            await cmd.handler({"credential_blob": blob, "encrypted_secret": blob}, Peer(1, 0, 0))
        assert err.value.code == "not_supported"
