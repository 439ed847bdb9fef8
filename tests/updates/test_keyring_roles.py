"""Keyring roles (DESIGN.md "Keyring roles"): publisher keys sign bundles and keyrings,
operator keys sign desired state and commands, and neither stands in for the other. The
role is inside the signed keyring, so changing it breaks the keyring's signature."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund import __version__
from edgerund.errors import TrustError
from edgerund.publisher import build as B
from edgerund.updates.bundle import BundleReader
from edgerund.updates.keyring import check_rotation, check_self_signed, parse_keyring
from edgerund.updates.trust import Device, Installed, Limits, verify_manifest
from tests.updates import models as M
from tests.updates.support import Publisher

REPO = Path(__file__).resolve().parents[2]
PUB = [Ed25519PrivateKey.generate() for _ in range(2)]
OPS = [Ed25519PrivateKey.generate() for _ in range(2)]


def keyring(version: int = 1, signers: list[Ed25519PrivateKey] | None = None) -> bytes:
    return B.keyring_bytes(
        B.make_keyring(
            [k.public_key() for k in PUB],
            threshold=1,
            version=version,
            signers=PUB[:1] if signers is None else signers,
            operators=[k.public_key() for k in OPS],
        )
    )


def test_roles_are_parsed_apart() -> None:
    kr = parse_keyring(keyring())
    check_self_signed(kr)
    assert set(kr.keys) == {B.keyid(k) for k in PUB}
    assert set(kr.operators) == {B.keyid(k) for k in OPS}


def test_operator_key_cannot_sign_a_bundle(tmp_path: Path) -> None:
    pub = Publisher(n_keys=1, threshold=1)
    op = Ed25519PrivateKey.generate()
    doc = B.make_keyring(
        [pub.keys[0].public_key()],
        threshold=1,
        version=1,
        signers=pub.keys,
        operators=[op.public_key()],
    )
    kr = parse_keyring(B.keyring_bytes(doc))
    path = pub.bundle(tmp_path / "b", version="2.0.0", counter=1, model=M.affine(), signers=[op])
    limits = Limits(bundle_max_bytes=1 << 24, file_max_bytes=1 << 24, max_counter_jump=16)
    with BundleReader(path) as reader, pytest.raises(TrustError) as ei:
        head = reader.head(256 * 1024)
        verify_manifest(
            head.manifest_bytes,
            head.sig_bytes,
            kr,
            now=time.time(),
            device=Device("gw-test", __version__, 21, ["m1"]),
            installed=Installed(counter=0, version=None),
            limits=limits,
        )
    assert ei.value.code == "unknown_key"


def test_operator_keys_cannot_rotate_the_keyring() -> None:
    old = parse_keyring(keyring())
    with pytest.raises(TrustError) as ei:
        check_rotation(old, parse_keyring(keyring(2, signers=OPS)), time.time())
    assert ei.value.code == "keyring_old_unknown_key"
    check_rotation(old, parse_keyring(keyring(2, signers=PUB[:1])), time.time())


def test_operator_key_cannot_self_sign_a_keyring() -> None:
    with pytest.raises(TrustError) as ei:
        check_self_signed(parse_keyring(keyring(signers=OPS)))
    assert ei.value.code == "keyring_unknown_key"


def test_role_is_covered_by_the_signature() -> None:
    """Promoting an operator key to publisher after signing breaks the keyring."""
    doc = json.loads(keyring())
    for k in doc["signed"]["keys"]:
        k["role"] = "publisher"
    kr = parse_keyring(json.dumps(doc).encode())
    assert len(kr.keys) == 4 and not kr.operators
    with pytest.raises(TrustError) as ei:
        check_self_signed(kr)
    assert ei.value.code == "keyring_bad_signature"


def test_unknown_role_and_operator_only_threshold_are_malformed() -> None:
    doc = json.loads(keyring())
    doc["signed"]["keys"][0]["role"] = "admin"
    with pytest.raises(TrustError, match="role") as ei:
        parse_keyring(json.dumps(doc).encode())
    assert ei.value.code == "keyring_malformed"
    doc = json.loads(keyring())
    doc["signed"]["threshold"] = 3  # 2 publisher keys: operators do not count
    with pytest.raises(TrustError, match="publisher") as ei:
        parse_keyring(json.dumps(doc).encode())
    assert ei.value.code == "keyring_malformed"


def test_keys_without_role_are_publishers() -> None:
    doc = json.loads(keyring())
    doc["signed"]["keys"] = [k for k in doc["signed"]["keys"] if k["role"] == "publisher"]
    for k in doc["signed"]["keys"]:
        del k["role"]
    kr = parse_keyring(json.dumps(doc).encode())
    assert len(kr.keys) == 2 and not kr.operators


def test_dev_keyring_has_one_operator_key() -> None:
    kr = parse_keyring((REPO / "models" / "dev-keys" / "keyring.dev.json").read_bytes())
    check_self_signed(kr)
    op = B.load_private(REPO / "models" / "dev-keys" / "OPERATOR-DEVELOPMENT-ONLY.key")
    assert set(kr.operators) == {B.keyid(op)}
    assert B.keyid(op) not in kr.keys
