"""Device keyring: threshold Ed25519 signatures and TUF-root-style rotation (pure, no I/O).

A keyring document is `{"signed": {...}, "signatures": [{"keyid", "sig"}]}` where `signed`
holds `type` ("edgerund-keyring"), `version`, `expires`, `threshold` and `keys`
(`{"keyid": sha256(raw public key) hex, "public": base64(raw 32 bytes), "name": str}`).

Counting rule (used for manifests and keyrings alike): a signature counts when its keyid is
in the trusted key set, the keyid really is the hash of that key, and the signature verifies
over `domain + canonical(signed)`. Each keyid counts at most once, so one key listed twice
can never stand in for two keys.

Rotation rule: keyring N+1 is accepted only when its version is exactly N+1 and it is signed
by a threshold of the keys of N (the old owners agree) AND by a threshold of its own keys
(the new owners hold their keys). A lower or equal version is a keyring rollback; a jump
would let an attacker skip a revocation. The device's first keyring is provisioned (trust
on install), and must still be self-consistent (its own threshold of its own keys).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgerund.errors import TrustError
from edgerund.updates.manifest import (
    KEYRING_DOMAIN,
    SignatureEntry,
    parse_time,
    signing_message,
    strict_json,
)

KEYRING_TYPE = "edgerund-keyring"


class KeyEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keyid: str
    public: str
    name: str = ""


class KeyringSigned(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: str
    version: int
    expires: str
    threshold: int
    keys: list[KeyEntry]


class KeyringDoc(msgspec.Struct, forbid_unknown_fields=True):
    signed: dict[str, Any]
    signatures: list[SignatureEntry]


def keyid_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


@dataclass(frozen=True)
class Keyring:
    version: int
    expires: float
    threshold: int
    keys: dict[str, Ed25519PublicKey]  # keyid -> key
    signed: dict[str, Any]  # the raw signed body (to re-serialise / store)
    doc: dict[str, Any]  # the whole document


def _decode_key(i: int, k: KeyEntry) -> tuple[str, Ed25519PublicKey]:
    try:
        raw = base64.b64decode(k.public, validate=True)
    except (binascii.Error, ValueError):
        raise TrustError("keyring_malformed", f"keys[{i}].public: not base64") from None
    if len(raw) != 32:
        raise TrustError(
            "keyring_malformed", f"keys[{i}].public: expected 32 bytes, got {len(raw)}"
        )
    if keyid_of(raw) != k.keyid:
        raise TrustError(
            "keyring_malformed",
            f"keys[{i}].keyid: expected sha256 of the key {keyid_of(raw)[:16]}..., got {k.keyid[:16]}...",
        )
    return k.keyid, Ed25519PublicKey.from_public_bytes(raw)


def parse_keyring(data: bytes) -> Keyring:
    """Decode a keyring document (structure only; signatures are checked by the callers)."""
    raw = strict_json(data, "keyring", "keyring_malformed")
    try:
        doc = msgspec.convert(raw, KeyringDoc)
        body = msgspec.convert(doc.signed, KeyringSigned)
    except msgspec.ValidationError as exc:
        raise TrustError("keyring_malformed", f"keyring: {exc}") from None
    if body.type != KEYRING_TYPE:
        raise TrustError(
            "keyring_malformed", f"signed.type: expected {KEYRING_TYPE!r}, got {body.type!r}"
        )
    if body.version < 1:
        raise TrustError("keyring_malformed", f"signed.version: expected >= 1, got {body.version}")
    keys: dict[str, Ed25519PublicKey] = {}
    for i, k in enumerate(body.keys):
        kid, pub = _decode_key(i, k)
        if kid in keys:
            raise TrustError("keyring_malformed", f"keys[{i}]: key {kid[:16]}... listed twice")
        keys[kid] = pub
    if not 1 <= body.threshold <= len(keys):
        raise TrustError(
            "keyring_malformed",
            f"signed.threshold: expected 1..{len(keys)} (number of keys), got {body.threshold}",
        )
    return Keyring(
        version=body.version,
        expires=parse_time(body.expires, "keyring expires"),
        threshold=body.threshold,
        keys=keys,
        signed=doc.signed,
        doc=raw,
    )


@dataclass(frozen=True)
class SignatureCount:
    valid: frozenset[str]  # distinct keyids with a verifying signature
    unknown: tuple[str, ...]  # keyids not in the key set
    invalid: tuple[str, ...]  # known keyids whose signature did not verify
    duplicates: tuple[str, ...]  # keyids that appeared more than once


def count_signatures(
    message: bytes, sigs: Iterable[SignatureEntry], keys: dict[str, Ed25519PublicKey]
) -> SignatureCount:
    valid: set[str] = set()
    seen: set[str] = set()
    unknown: list[str] = []
    invalid: list[str] = []
    dups: list[str] = []
    for s in sigs:
        if s.keyid in seen:
            dups.append(s.keyid)
            continue
        seen.add(s.keyid)
        key = keys.get(s.keyid)
        if key is None:
            unknown.append(s.keyid)
            continue
        try:
            sig = base64.b64decode(s.sig, validate=True)
            key.verify(sig, message)
        except (binascii.Error, ValueError, InvalidSignature):
            invalid.append(s.keyid)
            continue
        valid.add(s.keyid)
    return SignatureCount(frozenset(valid), tuple(unknown), tuple(invalid), tuple(dups))


def threshold_error(
    what: str, count: SignatureCount, threshold: int, n_sigs: int
) -> TrustError | None:
    """The reason code for a signature set that misses `threshold`, else None."""
    if len(count.valid) >= threshold:
        return None
    if n_sigs == 0:
        return TrustError("unsigned", f"{what}: expected {threshold} signature(s), got none")
    detail = (
        f"expected {threshold} valid signature(s) from distinct trusted keys, got {len(count.valid)}"
        f" (unknown keys: {len(count.unknown)}, failed: {len(count.invalid)},"
        f" duplicate keyids ignored: {len(count.duplicates)})"
    )
    if count.valid or count.duplicates:
        return TrustError("below_threshold", f"{what}: {detail}")
    if count.invalid:
        return TrustError("bad_signature", f"{what}: {detail}")
    return TrustError("unknown_key", f"{what}: {detail}")


def keyring_message(k: Keyring) -> bytes:
    return signing_message(KEYRING_DOMAIN, k.signed)


def _sigs(k: Keyring) -> list[SignatureEntry]:
    return msgspec.convert(k.doc.get("signatures", []), list[SignatureEntry])


def check_self_signed(k: Keyring) -> None:
    """A provisioned keyring must carry a threshold of its own keys."""
    sigs = _sigs(k)
    err = threshold_error(
        f"keyring v{k.version} (own keys)",
        count_signatures(keyring_message(k), sigs, k.keys),
        k.threshold,
        len(sigs),
    )
    if err is not None:
        raise TrustError("keyring_" + err.code, str(err).split(": ", 1)[1])


def check_rotation(old: Keyring, new: Keyring, now: float) -> None:
    """Accept `new` as the successor of `old` or raise TrustError (see module docstring)."""
    if new.version <= old.version:
        raise TrustError(
            "keyring_rollback",
            f"keyring version: expected {old.version + 1}, got {new.version} (not newer than the installed one)",
        )
    if new.version != old.version + 1:
        raise TrustError(
            "keyring_version_jump",
            f"keyring version: expected exactly {old.version + 1}, got {new.version}",
        )
    msg = keyring_message(new)
    sigs = _sigs(new)
    for label, keys, thr in (("old", old.keys, old.threshold), ("new", new.keys, new.threshold)):
        err = threshold_error(
            f"keyring v{new.version} ({label} keys)",
            count_signatures(msg, sigs, keys),
            thr,
            len(sigs),
        )
        if err is not None:
            raise TrustError(f"keyring_{label}_" + err.code, str(err).split(": ", 1)[1])
    if new.expires <= now:
        raise TrustError(
            "keyring_expired", f"keyring v{new.version} expired at {new.signed.get('expires')}"
        )
