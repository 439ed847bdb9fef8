"""The identity component as the daemon uses it: constructor, status, socket commands, fallback."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edgerund.backend.verify import verify_result
from edgerund.component import CommandError, Peer
from edgerund.errors import ConfigError, DeviceError
from edgerund.identity.binding import binding_value
from edgerund.identity.component import IdentityComponent
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import make_identity
from tests.identity.pins import nv_name_of, pins

PEER = Peer(pid=1, uid=0, gid=0)


async def test_tpm_component_status_and_commands(swtpm: SwtpmProcess, tmp_path: Path):
    comp = make_identity(tmp_path, kind="tpm", tcti=swtpm.tcti)
    assert comp.name == "identity"
    async with comp:
        st = comp.status()["identity"]
        assert st["kind"] == "tpm" and st["insecure"] is False
        assert st["ek_certificate_found"] is True and st["last_quote_time"] is None
        assert len(st["key_id"]) == 64 and st["ak_name"].startswith("000b")
        info = await comp.commands()["identity"].handler({}, PEER)
        assert "BEGIN PUBLIC KEY" in info["signing_key_pem"] and info["ak_pem"]
        nonce = os.urandom(32)
        result = await comp.commands()["attest"].handler({"nonce": nonce.hex()}, PEER)
        v = verify_result(result, nonce=nonce, ak_pem=info["ak_pem"], nv_name=nv_name_of(result))
        assert v.ok, v
        # start-up measured the config file into PCR 23
        cfg_digest = hashlib.sha256(comp.config_path.read_bytes()).digest()
        assert result["pcrs"]["sha256:23"] == binding_value(cfg_digest, []).hex()
        assert comp.status()["identity"]["last_quote_time"] is not None
        # bad nonces get specific errors
        for args, code, text in (
            ({}, "bad_request", "args.nonce"),
            ({"nonce": "zz"}, "bad_nonce", "hex"),
            ({"nonce": "00" * 65}, "bad_nonce", "at most 64"),
            ({"nonce": ""}, "bad_nonce", "empty"),
            ({"nonce": 5}, "bad_nonce", "hex string"),
        ):
            with pytest.raises(CommandError) as ei:
                await comp.commands()["attest"].handler(args, PEER)
            assert ei.value.code == code and text in ei.value.message
        # API used by telemetry/updates
        digest = hashlib.sha256(b"batch").digest()
        sig = await comp.sign_digest(digest)
        pub = serialization.load_pem_public_key(comp.public_key_pem().encode())
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        c0 = await comp.counter_read()
        assert await comp.counter_increment() == c0 + 1
        await comp.bind_model(hashlib.sha256(b"manifest").digest(), "vib")
        r2 = await comp.attest(nonce)
        assert (
            r2["pcrs"]["sha256:23"]
            == binding_value(cfg_digest, [hashlib.sha256(b"manifest").digest()]).hex()
        )
    assert comp.status()["identity"]["state"] == "stopped"


async def test_fallback_none_refuses_with_device_group_and_fix(tmp_path: Path):
    ident = make_identity(tmp_path, kind="tpm", tcti="device:/nonexistent/tpmrm0")
    with pytest.raises(DeviceError) as ei:
        async with ident:
            pass
    msg = str(ei.value)
    assert "/nonexistent/tpmrm0" in msg and "'tss'" in msg and "fallback" in msg
    assert "usermod -aG tss" in msg


async def test_fallback_software_is_loud(tmp_path: Path):
    ident = make_identity(tmp_path, kind="tpm", tcti="device:/nonexistent/tpmrm0",
                       fallback="software")  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        async with ident as comp:
            st = comp.status()["identity"]
            assert st["kind"] == "software" and st["insecure"] is True
            assert "INSECURE" in st["warning"] and "/nonexistent/tpmrm0" in st["fallback_reason"]
    events = [e["event"] for e in logs]
    assert "tpm_absent_falling_back_to_INSECURE_software_identity" in events
    assert "INSECURE_software_identity" in events


async def test_software_identity_files_and_result(tmp_path: Path):
    ident = make_identity(tmp_path)  # default kind: software
    async with ident as comp:
        assert isinstance(comp, IdentityComponent)
        key_file = tmp_path / "identity" / "software-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key_id = comp.key_id
        assert await comp.counter_increment() == 1
        assert await comp.counter_increment() == 2
        nonce = b"\x07" * 16
        r = await comp.attest(nonce)
        assert r["kind"] == "software" and r["insecure"] is True
        v = verify_result(r, nonce=nonce, **pins(r))
        assert (v.ok, v.code) == (False, "software_identity")
        v = verify_result(r, nonce=nonce, allow_software=True, **pins(r))
        assert v.ok, v
        assert any("INSECURE" in w for w in v.warnings)
    # restart: same key, counter continues
    async with ident as comp:
        assert comp.key_id == key_id
        assert await comp.counter_read() == 2
    # a world-readable key file is refused, with the fix
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        async with ident:
            pass


async def test_unreadable_auth_file_is_a_config_error(tmp_path: Path):
    ident = make_identity(tmp_path, kind="tpm", tcti="swtpm:host=127.0.0.1,port=1",
                       owner_auth_file=str(tmp_path / "missing-owner-pw"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"identity.owner_auth_file.*missing-owner-pw"):
        async with ident:
            pass
