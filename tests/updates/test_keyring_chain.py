"""Keyring chain re-verification (keyring.verify_chain, keyringstore.KeyringStore) against
crafted stored keyrings: nothing on disk is trusted without its signatures, every link back
to the provisioned root is checked, and revocation survives the deletion of files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund.errors import TrustError
from edgerund.publisher import build as B
from edgerund.updates.keyring import Keyring, check_self_signed, parse_keyring, verify_chain
from edgerund.updates.keyringstore import KeyringStore


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def doc(
    version: int,
    members: list[Ed25519PrivateKey],
    signers: list[Ed25519PrivateKey],
    threshold: int = 2,
    expires: float | None = None,
) -> bytes:
    return B.keyring_bytes(
        B.make_keyring(
            [k.public_key() for k in members],
            threshold=threshold,
            version=version,
            signers=signers,
            expires=expires,
        )
    )


class Chain:
    """Root v1 {k1,k2,k3}; v2 revokes k1 and adds k4; v3 adds k5. Each rotation is signed
    by a threshold of the old and of the new keys."""

    def __init__(self) -> None:
        self.k = keys(5)
        k1, k2, k3, k4, k5 = self.k
        self.v1 = doc(1, [k1, k2, k3], [k1, k2])
        self.v2 = doc(2, [k2, k3, k4], [k2, k3, k4])
        self.v3 = doc(3, [k2, k3, k4, k5], [k2, k3, k4])
        self.root = parse_keyring(self.v1)
        check_self_signed(self.root)


@pytest.fixture
def chain() -> Chain:
    return Chain()


def kid(k: Ed25519PrivateKey) -> str:
    return B.keyid(k)


def test_valid_rotation_chain_accepted(chain: Chain) -> None:
    v = verify_chain(chain.root, [chain.v3, chain.v2], floor=1)  # any order
    assert v.usable and v.reason is None
    assert [k.version for k in v.chain] == [1, 2, 3]
    assert v.keyring.version == 3
    assert kid(chain.k[0]) not in v.keyring.keys  # k1 revoked at v2
    assert kid(chain.k[4]) in v.keyring.keys
    assert v.refused == ()


def test_unsigned_higher_version_refused(chain: Chain) -> None:
    # The attack from the issue: signatures [], a higher version, the attacker's key.
    evil = Ed25519PrivateKey.generate()
    for version in (2, 7):
        forged = json.loads(doc(version, [evil], [], threshold=1))
        assert forged["signatures"] == []
        v = verify_chain(chain.root, [json.dumps(forged).encode()], floor=1)
        assert v.keyring is chain.root and v.usable
        assert kid(evil) not in v.keyring.keys
        (r,) = v.refused
        assert r.version == version
        assert r.reason == ("keyring_old_unsigned" if version == 2 else "keyring_chain_gap")


def test_self_signed_attacker_keyring_refused(chain: Chain) -> None:
    evil = keys(2)
    v = verify_chain(chain.root, [doc(2, evil, evil)], floor=1)
    assert v.keyring is chain.root
    assert [r.reason for r in v.refused] == ["keyring_old_unknown_key"]


def test_signed_by_revoked_key_refused(chain: Chain) -> None:
    k1 = chain.k[0]  # revoked at v2, then stolen
    evil = Ed25519PrivateKey.generate()
    v3_evil = doc(3, [k1, evil], [k1, evil, chain.k[1]], threshold=1)
    v = verify_chain(chain.root, [chain.v2, v3_evil], floor=1)
    assert v.keyring.version == 2
    assert kid(evil) not in v.keyring.keys
    (r,) = v.refused
    assert r.version == 3
    assert r.reason == "keyring_old_below_threshold"  # only k2 of v2 signed: 1 < 2


def test_one_old_key_cannot_rotate_alone(chain: Chain) -> None:
    _k1, k2, k3, k4, _ = chain.k
    v = verify_chain(chain.root, [doc(2, [k2, k3, k4], [*[k2, k3, k4][:1], k4])], floor=1)
    assert v.keyring.version == 1
    assert v.refused[0].reason == "keyring_old_below_threshold"


def test_new_keys_must_sign_too(chain: Chain) -> None:
    k1, k2, _, k4, k5 = chain.k
    v = verify_chain(chain.root, [doc(2, [k4, k5], [k1, k2])], floor=1)
    assert v.refused[0].reason == "keyring_new_unknown_key"


def test_forged_link_among_genuine_ones(chain: Chain) -> None:
    # Genuine v2 and a forged v2 planted beside it: the genuine one links, the chain goes on.
    forged = doc(2, keys(2), [])
    v = verify_chain(chain.root, [forged, chain.v2, chain.v3], floor=3)
    assert v.usable and v.keyring.version == 3
    assert [r.reason for r in v.refused] == ["keyring_old_unsigned"]


def test_expired_intermediate_is_still_a_link(chain: Chain) -> None:
    _k1, k2, k3, k4, _k5 = chain.k
    old = doc(2, [k2, k3, k4], [k2, k3, k4], expires=time.time() - 86400)
    v = verify_chain(chain.root, [old, chain.v3], floor=1)
    assert v.keyring.version == 3 and v.usable


def test_garbage_documents_are_refused_not_fatal(chain: Chain) -> None:
    v = verify_chain(chain.root, [b"[" * 100_000, b"{}", b"\xff", chain.v2], floor=1)
    assert v.keyring.version == 2
    assert [r.reason for r in v.refused] == ["keyring_malformed"] * 3


def test_below_floor_refuses_to_fall_back_to_root(chain: Chain) -> None:
    v = verify_chain(chain.root, [], floor=3)
    assert not v.usable
    assert v.reason == "keyring_below_floor"
    assert "v3" in v.message and "v1" in v.message
    assert v.keyring is chain.root  # the base for re-delivered rotations, nothing more


def test_rotation_helpers_still_refuse(chain: Chain) -> None:
    from edgerund.updates.keyring import check_rotation

    v2 = parse_keyring(chain.v2)
    with pytest.raises(TrustError) as ei:
        check_rotation(
            chain.root, parse_keyring(doc(2, chain.k[1:4], chain.k[1:4], expires=1.0)), time.time()
        )
    assert ei.value.code == "keyring_expired"
    check_rotation(chain.root, v2, time.time())


# -- the store: persisted chain and floor --------------------------------------------------


def rotate(store: KeyringStore, cur: Keyring, data: bytes) -> Keyring:
    from edgerund.updates.keyring import check_rotation

    new = parse_keyring(data)
    check_rotation(cur, new, time.time())
    store.append(new, data)
    return new


def test_store_round_trip_and_floor(chain: Chain, tmp_path: Path) -> None:
    store = KeyringStore(tmp_path / "updates")
    assert store.load(chain.root).keyring is chain.root
    assert store.read_floor() == 1  # anchored at the root on first start
    k = rotate(store, chain.root, chain.v2)
    k = rotate(store, k, chain.v3)
    assert store.read_floor() == 3
    assert sorted(p.name for p in store.chain_dir.iterdir()) == ["v2.json", "v3.json"]
    v = store.load(chain.root)
    assert v.usable and v.keyring.version == 3


def test_deleting_stored_keyrings_does_not_restore_revoked_keys(
    chain: Chain, tmp_path: Path
) -> None:
    store = KeyringStore(tmp_path / "updates")
    k = rotate(store, chain.root, chain.v2)
    rotate(store, k, chain.v3)
    for p in store.chain_dir.iterdir():
        p.unlink()
    store.legacy.unlink()
    v = store.load(chain.root)
    assert not v.usable and v.reason == "keyring_below_floor"
    assert store.read_floor() == 3  # never lowered


def test_unsigned_keyring_json_on_disk_is_not_trusted(chain: Chain, tmp_path: Path) -> None:
    # The reported attack, against the store: updates/keyring.json with "signatures": [].
    store = KeyringStore(tmp_path / "updates")
    store.upd_dir.mkdir(parents=True)
    evil = Ed25519PrivateKey.generate()
    store.legacy.write_bytes(doc(5, [evil], [], threshold=1))
    v = store.load(chain.root)
    assert v.usable and v.keyring is chain.root
    assert [r.reason for r in v.refused] == ["keyring_chain_gap"]
    assert store.read_floor() == 1


def test_legacy_keyring_json_that_chains_is_migrated(chain: Chain, tmp_path: Path) -> None:
    store = KeyringStore(tmp_path / "updates")
    store.upd_dir.mkdir(parents=True)
    store.legacy.write_bytes(chain.v2)  # written by a daemon before the chain existed
    v = store.load(chain.root)
    assert v.usable and v.keyring.version == 2
    assert store.read_floor() == 2


def test_replaced_link_breaks_the_chain_below_the_floor(chain: Chain, tmp_path: Path) -> None:
    store = KeyringStore(tmp_path / "updates")
    k = rotate(store, chain.root, chain.v2)
    rotate(store, k, chain.v3)
    evil = keys(3)
    (store.chain_dir / "v2.json").write_bytes(doc(2, evil, evil))
    v = store.load(chain.root)
    assert v.reason == "keyring_below_floor"
    assert {r.reason for r in v.refused} == {"keyring_old_unknown_key", "keyring_chain_gap"}


def test_unreadable_floor_refuses(chain: Chain, tmp_path: Path) -> None:
    store = KeyringStore(tmp_path / "updates")
    rotate(store, chain.root, chain.v2)
    store.floor_path.write_bytes(b"garbage")
    v = store.load(chain.root)
    assert v.reason == "keyring_floor_unreadable" and not v.usable


def test_newer_provisioned_root_outranks_stored_links(chain: Chain, tmp_path: Path) -> None:
    store = KeyringStore(tmp_path / "updates")
    rotate(store, chain.root, chain.v2)
    k2, k3, k4, k5 = chain.k[1:]
    root3 = parse_keyring(doc(3, [k2, k3, k4, k5], [k2, k3]))  # installed by the administrator
    v = store.load(root3)
    assert v.usable and v.keyring is root3
    assert store.read_floor() == 3
