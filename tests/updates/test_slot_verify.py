"""Slot re-verification (slotcheck.verify_slot) against tampered slots: a slot is trusted
from its stored signed manifest and the current keyring, never from the unsigned slot.json
marker. Slots are written by the real SlotStore install path from a real bundle."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund.publisher import build as B
from edgerund.updates import bundle as bundle_io
from edgerund.updates.keyring import Keyring, parse_keyring
from edgerund.updates.slotcheck import SlotVerdict, verify_slot
from edgerund.updates.slots import SlotStore
from edgerund.updates.trust import Device, Installed, Limits
from tests.updates import models as M
from tests.updates.support import Publisher, seed_dir

MODEL_MANIFEST = {"name": "m1", "version": "2.0.0", "threshold": 0.5, "inputs": ["x"]}


@pytest.fixture(scope="module")
def pub() -> Publisher:
    return Publisher()


def keyring_of(pub: Publisher) -> Keyring:
    return parse_keyring(B.keyring_bytes(pub.keyring_doc))


def install(pub: Publisher, tmp: Path, slot: str = "b", **kw: Any) -> SlotStore:
    """A slot installed exactly as the daemon does: read_bundle into staging, then
    SlotStore.install_staging."""
    tmp.mkdir(parents=True, exist_ok=True)
    b = pub.bundle(
        tmp / "v2.bundle",
        version="2.0.0",
        counter=3,
        model=M.affine(2.0),
        model_manifest=MODEL_MANIFEST,
        **kw,
    )
    store = SlotStore(tmp / "models" / "m1", "m1")
    staging = store.reset_staging()
    verdict, mbytes, sbytes = bundle_io.read_bundle(
        b,
        staging,
        keyring_of(pub),
        now=time.time(),
        device=Device("rpi4", "9.9.9", 21, ["m1"]),
        installed=Installed(counter=0, version=None),
        limits=Limits(8 << 20, 8 << 20, 16),
        manifest_max=256 * 1024,
    )
    store.install_staging(slot, verdict.manifest, verdict.manifest_sha256, mbytes, sbytes, 1.0)
    return store


def check(store: SlotStore, kr: Keyring | None, slot: str = "b", **kw: Any) -> SlotVerdict:
    return verify_slot(store.dir(slot), kr, model="m1", **kw)


def rewrite_marker(store: SlotStore, slot: str, **changes: Any) -> None:
    """What the attacker does after editing a file: make slot.json agree again."""
    p = store.dir(slot) / "slot.json"
    mk = json.loads(p.read_bytes())
    for rel in list(mk["files"]):
        if not (store.dir(slot) / rel).exists():
            del mk["files"][rel]
            continue
        d = bundle_io.hash_file(store.dir(slot) / rel)
        mk["files"][rel] = [d.size, d.sha256]
    mk.update(changes)
    p.write_bytes(json.dumps(mk).encode())


def assert_quarantined(v: SlotVerdict, reason: str, *words: str) -> None:
    assert not v.ok and v.quarantine
    assert v.reason == reason, v.message
    for w in words:
        assert w in v.message, v.message


def test_genuine_slot_verifies(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    v = check(store, keyring_of(pub))
    assert v.ok and v.reason is None, v.message
    assert (v.version, v.security_counter) == ("2.0.0", 3)
    assert len(v.signed_by) == 2
    mk = store.marker("b")
    assert mk is not None and v.manifest_sha256 == mk.manifest_sha256


def test_edited_model_manifest_threshold_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    # The attack from the issue: threshold 1e9 in the slot's manifest.json, slot.json fixed
    # up to match. The marker-based check is fooled; the signed manifest is not.
    store = install(pub, tmp_path)
    p = store.dir("b") / "manifest.json"
    mm = json.loads(p.read_bytes())
    mm["threshold"] = 1e9
    p.write_text(json.dumps(mm, indent=2, sort_keys=True))
    rewrite_marker(store, "b")
    assert store.verify_slot("b")  # the unsigned marker still "verifies"
    assert_quarantined(
        check(store, keyring_of(pub)), "slot_model_manifest", "manifest.json", "signed"
    )


def test_edited_slot_json_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    rewrite_marker(store, "b", version="9.9.9")
    assert_quarantined(check(store, keyring_of(pub)), "slot_marker_mismatch", "version", "9.9.9")
    store = install(pub, tmp_path / "2")
    rewrite_marker(store, "b", security_counter=99)
    assert_quarantined(check(store, keyring_of(pub)), "slot_marker_mismatch", "security_counter")


def test_swapped_model_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    (store.dir("b") / "model.onnx").write_bytes(M.affine(-5.0))
    rewrite_marker(store, "b")
    assert store.verify_slot("b")
    assert_quarantined(check(store, keyring_of(pub)), "slot_file_hash", "model.onnx")


def test_missing_signature_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    os.unlink(store.dir("b") / "bundle.sig")
    rewrite_marker(store, "b")
    assert_quarantined(check(store, keyring_of(pub)), "slot_unsigned", "bundle.sig")


def test_resigned_by_attacker_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    man = json.loads((store.dir("b") / "bundle.json").read_bytes())
    man["model_manifest"]["threshold"] = 1e9
    (store.dir("b") / "bundle.json").write_text(json.dumps(man))
    (store.dir("b") / "manifest.json").write_text(
        json.dumps(man["model_manifest"], indent=2, sort_keys=True)
    )
    evil = [Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()]
    (store.dir("b") / "bundle.sig").write_bytes(B.sign_manifest(man, evil))
    rewrite_marker(store, "b")
    assert_quarantined(check(store, keyring_of(pub)), "slot_signature", "unknown_key")
    # ... and with the genuine signatures left in place, the edit breaks them.
    (store.dir("b") / "bundle.sig").write_bytes(B.sign_manifest({"x": 1}, pub.keys[:2]))
    assert_quarantined(check(store, keyring_of(pub)), "slot_signature", "bad_signature")


def test_signer_revoked_since_install_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    fresh = [Ed25519PrivateKey.generate() for _ in range(2)]
    # Current keyring keeps only one of the two keys that signed the slot.
    kept = [pub.keys[0].public_key(), *(k.public_key() for k in fresh)]
    current = parse_keyring(
        B.keyring_bytes(B.make_keyring(kept, threshold=2, version=2, signers=[]))
    )
    assert_quarantined(check(store, current), "slot_signature", "below_threshold")


def test_no_usable_keyring_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    assert_quarantined(check(store, None), "slot_no_keyring")


def test_wrong_model_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    v = verify_slot(store.dir("b"), keyring_of(pub), model="other")
    assert_quarantined(v, "slot_wrong_model", "'m1'")


def test_planted_files_are_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    (store.dir("b") / "libevil.so").write_bytes(b"\x7fELF")
    assert_quarantined(check(store, keyring_of(pub)), "slot_file_unexpected", "libevil.so")
    os.unlink(store.dir("b") / "libevil.so")
    os.symlink("/etc/shadow", store.dir("b") / "extra")
    assert_quarantined(check(store, keyring_of(pub)), "slot_file_unexpected", "extra")


def test_symlinked_payload_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    real = tmp_path / "model.real"
    os.replace(store.dir("b") / "model.onnx", real)
    os.symlink(real, store.dir("b") / "model.onnx")
    assert_quarantined(check(store, keyring_of(pub)), "slot_file_unexpected", "model.onnx")


def test_missing_payload_and_marker(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    os.unlink(store.dir("b") / "golden-io.npz")
    rewrite_marker(store, "b")  # the entry is dropped from slot.json too
    assert_quarantined(check(store, keyring_of(pub)), "slot_file_missing", "golden-io.npz")
    os.unlink(store.dir("b") / "slot.json")
    assert_quarantined(check(store, keyring_of(pub)), "slot_marker_missing")


def test_marker_index_must_match_the_signed_hashes(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    p = store.dir("b") / "slot.json"
    mk = json.loads(p.read_bytes())
    mk["files"]["golden-io.npz"][1] = "0" * 64
    p.write_text(json.dumps(mk))
    assert_quarantined(check(store, keyring_of(pub)), "slot_marker_mismatch", "golden-io.npz")


def test_malformed_marker(pub: Publisher, tmp_path: Path) -> None:
    store = install(pub, tmp_path)
    (store.dir("b") / "slot.json").write_bytes(b"[" * 50_000)
    assert_quarantined(check(store, keyring_of(pub)), "slot_marker_malformed")


# -- a slot seeded from the packaged model -----------------------------------------------


def test_shipped_slot_verifies_against_the_package(pub: Publisher, tmp_path: Path) -> None:
    shipped = seed_dir(tmp_path / "shipped", M.affine(), version="1.0.0")
    store = SlotStore(tmp_path / "models" / "m1", "m1")
    store.seed(shipped, "a")
    v = check(store, keyring_of(pub), "a", shipped_dir=shipped)
    assert v.ok and v.bundle_id == "shipped" and v.version == "1.0.0", v.message
    assert check(store, None, "a", shipped_dir=shipped).ok  # needs no keyring
    # Without the package to compare with, an unsigned slot is not trusted.
    assert_quarantined(check(store, keyring_of(pub), "a"), "slot_unsigned")


def test_tampered_shipped_slot_is_quarantined(pub: Publisher, tmp_path: Path) -> None:
    shipped = seed_dir(tmp_path / "shipped", M.affine(), version="1.0.0")
    store = SlotStore(tmp_path / "models" / "m1", "m1")
    store.seed(shipped, "a")
    mm = store.dir("a") / "manifest.json"
    mm.write_text(json.dumps({"name": "m1", "version": "1.0.0", "threshold": 1e9}))
    rewrite_marker(store, "a")
    assert_quarantined(
        check(store, keyring_of(pub), "a", shipped_dir=shipped),
        "slot_shipped_mismatch",
        "manifest.json",
    )


def test_signed_slot_cannot_pretend_to_be_shipped(pub: Publisher, tmp_path: Path) -> None:
    # Strip the signature and claim "shipped": it must then be the packaged model itself.
    shipped = seed_dir(tmp_path / "shipped", M.affine(), version="1.0.0")
    store = install(pub, tmp_path)
    for n in ("bundle.json", "bundle.sig"):
        os.unlink(store.dir("b") / n)
    mk = msgspec.json.decode((store.dir("b") / "slot.json").read_bytes())
    mk["bundle_id"] = "shipped"
    (store.dir("b") / "slot.json").write_bytes(msgspec.json.encode(mk))
    rewrite_marker(store, "b")
    assert_quarantined(check(store, keyring_of(pub), shipped_dir=shipped), "slot_shipped_mismatch")
