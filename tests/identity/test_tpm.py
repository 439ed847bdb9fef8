"""The TPM identity against a real swtpm: enrolment, persistence, quotes, counter, auth."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edgerund.backend.attest_cli import export_checkquote_files
from edgerund.backend.verify import expected_binding_for_files, verify_result
from edgerund.errors import DeviceError
from edgerund.identity import tpmstruct as ts
from edgerund.identity.binding import binding_value
from edgerund.identity.tpm import TpmIdentity
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import tpm_config
from tests.identity.pins import pins

pytestmark = pytest.mark.needs_swtpm
NONCE = bytes(range(32))


async def opened(swtpm: SwtpmProcess, state: Path, **kw: Any) -> TpmIdentity:
    ident = TpmIdentity(tpm_config(swtpm.tcti, **kw), state)
    await ident.open()
    return ident


def esapi(swtpm: SwtpmProcess) -> Any:
    from tpm2_pytss import ESAPI

    return ESAPI(swtpm.tcti)


def persistent_handles(swtpm: SwtpmProcess) -> list[int]:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

    with esapi(swtpm) as e:
        _, data = e.get_capability(TPM2_CAP.HANDLES, TPM2_HC.PERSISTENT_FIRST, 64)
        return [int(h) for h in data.data.handles]


def lockout_counter(swtpm: SwtpmProcess) -> int:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

    with esapi(swtpm) as e:
        _, data = e.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)


async def test_enrolment_creates_noda_keys_and_certified_ek(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path)
    try:
        assert ident.enrolled_now
        st = ident.status()
        assert st["kind"] == "tpm" and st["insecure"] is False
        # swtpm provisions an RSA 2048 EK certificate but no ECC P-256 one: auto picks RSA
        assert st["ek_certificate_found"] is True and st["ek_type"] == "EK-RSA2048"
        cert = ident.ek_certificate()
        assert cert is not None
        ek = ts.parse_tpm2b_public(base64.b64decode(ident.state["ek"]["public"]))
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        assert cert.public_key().public_bytes(serialization.Encoding.DER, fmt) == (
            ek.key.public_bytes(serialization.Encoding.DER, fmt)
        )
        ak = ts.parse_tpm2b_public(base64.b64decode(ident.state["ak"]["public"]))
        sk = ts.parse_tpm2b_public(base64.b64decode(ident.state["signing_key"]["public"]))
        assert ak.has(ts.OA_RESTRICTED) and ak.has(ts.OA_SIGN) and not ak.has(ts.OA_DECRYPT)
        assert sk.has(ts.OA_SIGN) and not sk.has(ts.OA_RESTRICTED)
        for key in (ak, sk):
            assert key.has(ts.OA_NODA) and key.has(ts.OA_FIXEDTPM)
            assert isinstance(key.key, ec.EllipticCurvePublicKey)
        assert st["ak_name"] == ak.name.hex()
        # key id = fingerprint of the telemetry key
        assert (
            st["key_id"]
            == hashlib.sha256(sk.key.public_bytes(serialization.Encoding.DER, fmt)).hexdigest()
        )
        # sign a digest and verify it with the published public key
        digest = hashlib.sha256(b"telemetry batch 1").digest()
        der = await ident.sign_digest(digest)
        pub = serialization.load_pem_public_key(ident.public_key_pem().encode())
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        # state file is private
        assert ident.state_path.stat().st_mode & 0o077 == 0
    finally:
        await ident.close()
    handles = persistent_handles(swtpm)
    for h in (0x81000001, 0x81010020, 0x81000020):
        assert h in handles


async def test_restart_reuses_keys_and_checks_names(swtpm: SwtpmProcess, tmp_path: Path):
    first = await opened(swtpm, tmp_path)
    ak_name, key_id = first.ak_name, first.key_id
    await first.close()
    swtpm.stop()  # power cycle the TPM as well
    swtpm.start()
    second = await opened(swtpm, tmp_path)
    try:
        assert not second.enrolled_now and second.restored == []
        assert (second.ak_name, second.key_id) == (ak_name, key_id)
        r = await second.attest(NONCE)
        assert verify_result(r, nonce=NONCE, **pins(r)).ok
    finally:
        await second.close()


async def test_evicted_key_is_restored_from_blob(swtpm: SwtpmProcess, tmp_path: Path):
    first = await opened(swtpm, tmp_path)
    ak_name = first.ak_name
    await first.close()
    from tpm2_pytss.constants import ESYS_TR

    with esapi(swtpm) as e:  # someone evicts the AK and the telemetry key
        for h in (0x81010020, 0x81000020):
            e.evict_control(ESYS_TR.OWNER, e.tr_from_tpmpublic(h), h)
    second = await opened(swtpm, tmp_path)
    try:
        assert sorted(second.restored) == ["ak", "signing_key"]
        assert second.ak_name == ak_name
        r = await second.attest(NONCE)
        assert verify_result(r, nonce=NONCE, **pins(r)).ok
    finally:
        await second.close()


async def test_foreign_object_at_enrolled_handle_is_refused(swtpm: SwtpmProcess, tmp_path: Path):
    first = await opened(swtpm, tmp_path)
    await first.close()
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    with esapi(swtpm) as e:  # replace the telemetry key by another object
        e.evict_control(ESYS_TR.OWNER, e.tr_from_tpmpublic(0x81000020), 0x81000020)
        other, *_ = e.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256", ESYS_TR.OWNER)
        e.evict_control(ESYS_TR.OWNER, other, 0x81000020)
        e.flush_context(other)
    with pytest.raises(DeviceError, match=r"0x81000020 .*holds another object"):
        await opened(swtpm, tmp_path)


async def test_quote_verified_by_us_and_by_tpm2_checkquote(
    swtpm: SwtpmProcess, tmp_path: Path, tpm2_checkquote: str
):
    ident = await opened(swtpm, tmp_path / "state")
    try:
        await ident.bind_config(hashlib.sha256(b"config").digest())
        r = await ident.attest(NONCE)
    finally:
        await ident.close()
    json.dumps(r)  # the result is JSON as-is
    for key in ("nonce", "attest", "signature", "pcr_selection", "pcrs", "ak_public", "ak_pem",
                "ek_certificate", "certify_attest", "certify_signature", "signing_key_pem"):  # fmt: skip
        assert key in r
    assert r["pcr_selection"] == "sha256:0,1,2,3,4,5,6,7,23"
    assert r["ek_certificate"] is not None

    def checkquote(result: dict[str, Any], nonce_hex: str) -> subprocess.CompletedProcess[str]:
        argv = export_checkquote_files(result, tmp_path / "cq")
        argv[0] = tpm2_checkquote
        argv[argv.index("-q") + 1] = nonce_hex
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    v = verify_result(r, nonce=NONCE, **pins(r))
    assert v.ok, v
    assert v.warnings == []
    assert checkquote(r, NONCE.hex()).returncode == 0

    # wrong nonce
    wrong = bytes(32)
    v = verify_result(r, nonce=wrong, **pins(r))
    assert (v.ok, v.code) == (False, "nonce_mismatch")
    assert checkquote(r, wrong.hex()).returncode != 0

    # altered PCR value
    bad = dict(r, pcrs=dict(r["pcrs"], **{"sha256:23": "11" * 32}))
    v = verify_result(bad, nonce=NONCE, **pins(bad))
    assert (v.ok, v.code) == (False, "pcr_digest")
    assert checkquote(bad, NONCE.hex()).returncode != 0

    # altered attest bytes (flip one bit of the clock)
    raw = bytearray(base64.b64decode(r["attest"]))
    raw[len(raw) // 2] ^= 0x01
    bad = dict(r, attest=base64.b64encode(bytes(raw)).decode())
    v = verify_result(bad, nonce=NONCE, **pins(bad))
    assert (v.ok, v.code) == (False, "bad_signature")
    assert checkquote(bad, NONCE.hex()).returncode != 0

    # a different AK pinned by the verifier
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    v = verify_result(r, nonce=NONCE, ak_pem=other_pem)
    assert (v.ok, v.code) == (False, "ak_mismatch")

    # the certify proof names the telemetry key
    bad = dict(r, signing_key_public=r["ak_public"])
    v = verify_result(bad, nonce=NONCE, **pins(bad))
    assert (v.ok, v.code) == (False, "certify_name")


async def test_clock_sanity_against_previous_quote(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path)
    try:
        first = await ident.attest(b"\x01" * 16)
        await asyncio.sleep(0.05)
        second = await ident.attest(b"\x02" * 16)
    finally:
        await ident.close()
    pin = pins(first)
    assert verify_result(second, previous=first, nonce=b"\x02" * 16, **pin).ok
    v = verify_result(first, previous=second, nonce=b"\x01" * 16, **pin)  # replayed
    assert (v.ok, v.code) == (False, "clock")


async def test_model_binding_pcr_changes_with_the_model(swtpm: SwtpmProcess, tmp_path: Path):
    cfg_file = tmp_path / "edgerund.yaml"
    cfg_file.write_text("gateway:\n  id: gw-1\n")
    m1, m2 = tmp_path / "m1" / "manifest.json", tmp_path / "m2" / "manifest.json"
    for m, version in ((m1, "1.0.0"), (m2, "1.1.0")):
        m.parent.mkdir()
        m.write_text(json.dumps({"name": "vib", "version": version}))
    ident = await opened(swtpm, tmp_path / "state")
    try:
        await ident.bind_config(hashlib.sha256(cfg_file.read_bytes()).digest())
        await ident.bind_model(hashlib.sha256(m1.read_bytes()).digest(), "vib")
        r1 = await ident.attest(NONCE)
        await ident.bind_model(hashlib.sha256(m2.read_bytes()).digest(), "vib")
        r2 = await ident.attest(NONCE)
    finally:
        await ident.close()
    assert r1["pcrs"]["sha256:23"] != r2["pcrs"]["sha256:23"]
    want1 = expected_binding_for_files(cfg_file, [m1])
    want2 = expected_binding_for_files(cfg_file, [m2])
    assert r1["pcrs"]["sha256:23"] == want1.hex()
    assert verify_result(r1, nonce=NONCE, expected_binding=want1, **pins(r1)).ok
    # the old model expected
    v = verify_result(r2, nonce=NONCE, expected_binding=want1, **pins(r2))
    assert (v.ok, v.code) == (False, "binding_mismatch")
    assert verify_result(r2, nonce=NONCE, expected_binding=want2, **pins(r2)).ok
    # a forged binding log that claims the old model does not replay to the quoted PCR
    forged = dict(r2, binding=r1["binding"])
    v = verify_result(forged, nonce=NONCE, expected_binding=want1, **pins(forged))
    assert (v.ok, v.code) == (False, "binding_log")
    assert binding_value(bytes(32), []) != bytes(32)


async def test_nv_counter_monotonic_across_restarts(swtpm: SwtpmProcess, tmp_path: Path):
    seen: list[int] = []
    for cycle in range(3):
        ident = await opened(swtpm, tmp_path)
        try:
            seen.append(await ident.counter_read())
            seen.append(await ident.counter_increment())
            seen.append(await ident.counter_increment())
            seen.append(await ident.counter_read())
        finally:
            await ident.close()
        if cycle == 0:
            swtpm.stop()
            swtpm.start()
        elif cycle == 1:
            swtpm.kill()  # power cut
            swtpm.start()
    assert seen == sorted(seen) and seen[-1] - seen[0] == 6
    assert all(b > a for a, b in zip(seen[1::4], seen[2::4], strict=True))
    # the index is a NO_DA counter
    from tpm2_pytss.constants import TPM2_NT, TPMA_NV

    with esapi(swtpm) as e:
        pub, _ = e.nv_read_public(e.tr_from_tpmpublic(0x01500100))
        attrs = int(pub.nvPublic.attributes)
    assert attrs & TPMA_NV.NO_DA
    assert (attrs & TPMA_NV.TPM2_NT_MASK) >> TPMA_NV.TPM2_NT_SHIFT == TPM2_NT.COUNTER


async def test_owner_and_endorsement_hierarchy_passwords(swtpm: SwtpmProcess, tmp_path: Path):
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_AUTH

    with esapi(swtpm) as e:  # as IT / Windows would leave it
        e.hierarchy_change_auth(ESYS_TR.OWNER, TPM2B_AUTH(b"owner-pw"))
        e.hierarchy_change_auth(ESYS_TR.ENDORSEMENT, TPM2B_AUTH(b"endorse-pw"))
    owner, endorse, wrong = tmp_path / "owner", tmp_path / "endorse", tmp_path / "wrong"
    owner.write_text("owner-pw\n")
    endorse.write_text("endorse-pw\n")
    wrong.write_text("nope\n")

    # no password configured: a specific, actionable message
    with pytest.raises(DeviceError, match=r"wrong password .*endorsement_auth_file"):
        await opened(swtpm, tmp_path / "a")
    # wrong owner password
    with pytest.raises(DeviceError, match=r"wrong password .*owner_auth_file"):
        await opened(swtpm, tmp_path / "b", owner_auth_file=str(wrong),
                     endorsement_auth_file=str(endorse))  # fmt: skip
    ident = await opened(swtpm, tmp_path / "c", owner_auth_file=str(owner),
                         endorsement_auth_file=str(endorse))  # fmt: skip
    try:
        assert ident.enrolled_now
        r = await ident.attest(NONCE)
        assert verify_result(r, nonce=NONCE, **pins(r)).ok
        assert await ident.counter_increment() >= 1
    finally:
        await ident.close()
    assert lockout_counter(swtpm) == 0  # hierarchy auth failures are not DA-counted


async def test_bad_tcti_gives_actionable_messages(tmp_path: Path, swtpm: SwtpmProcess):
    port = swtpm.port
    swtpm.kill()
    with pytest.raises(DeviceError, match=r"cannot talk to the TPM at swtpm:.*simulator running"):
        await opened(swtpm, tmp_path)
    ident = TpmIdentity(tpm_config("device:/nonexistent/tpmrm9"), tmp_path)
    with pytest.raises(DeviceError, match=r"/nonexistent/tpmrm9.*group 'tss'.*fallback"):
        await ident.open()
    ident = TpmIdentity(tpm_config("nosuchtcti:x"), tmp_path)
    with pytest.raises(DeviceError, match=r"unknown TCTI 'nosuchtcti'"):
        await ident.open()
    assert port  # the fixture's port is not reused by anything above


async def test_lockout_is_reported_and_noda_keys_keep_working(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path)
    await ident.close()
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_AUTH, TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE

    with esapi(swtpm) as e:  # lock the TPM out with a DA-protected key and a wrong password
        e.dictionary_attack_parameters(2, 1000, 1000, ESYS_TR.LOCKOUT)
        sens = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(b"right")))
        parent, *_ = e.create_primary(sens, "ecc256:aes128cfb", ESYS_TR.OWNER)
        e.tr_set_auth(parent, b"wrong")
        for _ in range(3):
            with pytest.raises(TSS2_Exception):
                e.create(parent, TPM2B_SENSITIVE_CREATE(), "ecc256")
        e.flush_context(parent)
    ident = await opened(swtpm, tmp_path)
    try:
        st = ident.status()
        assert st["da_in_lockout"] is True
        # edgerund's own keys are noDA: signing, quoting and the counter still work
        await ident.sign_digest(bytes(32))
        r = await ident.attest(NONCE)
        assert verify_result(r, nonce=NONCE, **pins(r)).ok
        await ident.counter_increment()

        # a DA-protected operation through the worker gets the specific lockout message
        def use_da_key(e: Any) -> None:
            sens = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(b"x")))
            h, *_ = e.create_primary(sens, "ecc256:aes128cfb", ESYS_TR.OWNER)
            try:
                e.tr_set_auth(h, b"x")
                e.create(h, TPM2B_SENSITIVE_CREATE(), "ecc256")
            finally:
                e.flush_context(h)

        with pytest.raises(DeviceError, match=r"dictionary-attack lockout.*clear-lockout"):
            await ident.worker.call(use_da_key, what="use a DA-protected key")
    finally:
        await ident.close()


async def test_bad_nonce_rejected(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path)
    try:
        with pytest.raises(ValueError, match="at most 64"):
            await ident.attest(b"\x00" * 65)
        with pytest.raises(ValueError, match="empty"):
            await ident.attest(b"")
        r = await ident.attest(b"\xff" * 64)  # the maximum is accepted
        assert verify_result(r, nonce=b"\xff" * 64, **pins(r)).ok
    finally:
        await ident.close()


async def test_event_loop_not_blocked_by_100_quotes(swtpm: SwtpmProcess, tmp_path: Path):
    ident = await opened(swtpm, tmp_path)
    loop_thread = threading.get_ident()
    try:
        assert await ident.worker.call(lambda e: threading.get_ident(), what="x") != loop_thread
        period = 0.01
        lateness: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            deadline = time.monotonic()
            while not done.is_set():
                deadline += period
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                lateness.append(time.monotonic() - deadline)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*(ident.attest(i.to_bytes(4, "big")) for i in range(100)))
        done.set()
        await tick
    finally:
        await ident.close()
    assert len(results) == 100 and len({r["attest"] for r in results}) == 100
    assert all(verify_result(r, nonce=bytes.fromhex(r["nonce"]), **pins(r)).ok for r in results[:5])
    # while 100 quotes (+ PCR reads + certify) ran, the loop kept ticking. Run inline, the
    # gathered coroutines would never yield and block the loop for the whole burst
    # (0.4-1.3 s here); the bound is generous because CI machines are shared.
    assert len(lateness) >= 5
    assert max(lateness) < 0.25, f"max lateness {max(lateness):.3f}s"


async def test_silent_tpm_times_out_instead_of_hanging(tmp_path: Path):
    """A TPM that accepts the connection but never answers: bounded failure, no hang."""
    import socket

    from tests.fixtures.swtpm import _two_free_ports

    port = _two_free_ports()
    servers = []
    for p in (port, port + 1):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        s.listen(4)
        servers.append(s)
    ident = TpmIdentity(
        tpm_config(f"swtpm:host=127.0.0.1,port={port}", call_timeout_ms=500), tmp_path
    )
    t0 = time.monotonic()
    try:
        with pytest.raises(DeviceError, match=r"did not answer within 0.5 s"):
            await ident.open()
        assert time.monotonic() - t0 < 5.0
        assert ident.worker.wedged
        # the next call tries ONE re-open (bounded by the timeout as well) ...
        t1 = time.monotonic()
        with pytest.raises(DeviceError, match=r"did not answer within 0.5 s.*re-open"):
            await ident.worker.call(lambda e: None, what="anything")
        assert time.monotonic() - t1 < 3.0
        # ... and calls during the back-off fail fast, naming why
        t2 = time.monotonic()
        with pytest.raises(DeviceError, match=r"not answering.*next attempt in"):
            await ident.worker.call(lambda e: None, what="anything")
        assert time.monotonic() - t2 < 0.1
    finally:
        for s in servers:
            s.close()


async def test_slots_leaked_by_a_dead_process_are_flushed(swtpm: SwtpmProcess, tmp_path: Path):
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE, TPMT_SYM_DEF

    e = esapi(swtpm)  # a crashed predecessor: 3 objects + 2 sessions left in the TPM
    for _ in range(3):
        e.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256", ESYS_TR.OWNER)
    for _ in range(2):
        e.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC,
                             TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)  # fmt: skip
    e.close()  # finalizing the context does not flush anything
    ident = await opened(swtpm, tmp_path)  # enrolment needs free slots
    try:
        assert ident.flushed_stale == 5 and ident.enrolled_now
        r = await ident.attest(NONCE)
        assert verify_result(r, nonce=NONCE, **pins(r)).ok
    finally:
        await ident.close()


def use_da_protected_key(e: Any) -> None:
    """Sign with a primary key WITHOUT noDA (as another tool on the same TPM might)."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_DIGEST,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMT_PUBLIC,
        TPMT_SIG_SCHEME,
        TPMT_TK_HASHCHECK,
    )

    attrs = (
        TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
    )  # fmt: skip
    key, *_ = e.create_primary(
        TPM2B_SENSITIVE_CREATE(),
        TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs)),
        ESYS_TR.OWNER,
    )
    try:
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        e.sign(key, TPM2B_DIGEST(bytes(32)), scheme,
               TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL))  # fmt: skip
    finally:
        e.flush_context(key)


@pytest.mark.parametrize("shutdown_on_exit", [True, False])
async def test_orderly_shutdown_on_close(
    swtpm: SwtpmProcess, tmp_path: Path, shutdown_on_exit: bool
):
    """close() sends TPM2_Shutdown: a later power cut is orderly and costs no DA try."""
    ident = await opened(swtpm, tmp_path, shutdown_on_exit=shutdown_on_exit)
    await ident.worker.call(use_da_protected_key, what="use a DA-protected key")
    await ident.close()
    swtpm.kill()  # power cut while the daemon is stopped
    swtpm.start()
    assert lockout_counter(swtpm) == (0 if shutdown_on_exit else 1)


async def test_enrolment_refuses_a_foreign_object_at_our_handles(
    swtpm: SwtpmProcess, tmp_path: Path
):
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    with esapi(swtpm) as e:  # e.g. tpm2_createprimary + evictcontrol by another tool
        other, *_ = e.create_primary(TPM2B_SENSITIVE_CREATE(), "rsa2048", ESYS_TR.OWNER)
        e.evict_control(ESYS_TR.OWNER, other, 0x81000001)
        e.flush_context(other)
    with pytest.raises(DeviceError, match=r"cannot enrol: persistent handle 0x81000001 "
                       r"\(identity.srk_handle\) is already in use"):  # fmt: skip
        await opened(swtpm, tmp_path)
    assert not (tmp_path / "identity" / "tpm-enrolment.json").exists()
    # with another handle it enrols, and leaves the foreign object alone
    ident = await opened(swtpm, tmp_path, srk_handle=0x81000002)
    await ident.close()
    assert 0x81000001 in persistent_handles(swtpm)
