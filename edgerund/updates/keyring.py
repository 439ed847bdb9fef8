"""Device keyring: threshold Ed25519 signatures and TUF-root-style rotation (pure, no I/O).

A keyring document is `{"signed": {...}, "signatures": [{"keyid", "sig"}]}` where `signed`
holds `type` ("edgerund-keyring"), `version`, `expires`, `threshold` and `keys`
(`{"keyid": sha256(raw public key) hex, "public": base64(raw 32 bytes), "name": str,
"role": "publisher" | "operator"}`).

Roles (DESIGN.md "Keyring roles"): each key holds exactly one role, and the role is inside
`signed`, so it is covered by the keyring's own signatures. `publisher` keys (the default
when a key carries no `role`, which keeps keyrings written before roles valid as they
were) sign model bundles and the keyring itself; `threshold` counts publisher keys only.
`operator` keys sign desired state and remote commands (edgerund/twin/auth.py) and never
count towards a manifest's or a keyring's threshold, so a stolen operator key can neither
ship a model nor rotate the keyring, and a publisher key can never command a gateway.

Counting rule (used for manifests and keyrings alike): a signature counts when its keyid is
in the trusted key set, the keyid really is the hash of that key, and the signature verifies
over `domain + canonical(signed)`. Each keyid counts at most once, so one key listed twice
can never stand in for two keys.

Rotation rule: keyring N+1 is accepted only when its version is exactly N+1 and it is signed
by a threshold of the keys of N (the old owners agree) AND by a threshold of its own keys
(the new owners hold their keys). A lower or equal version is a keyring rollback; a jump
would let an attacker skip a revocation. The device's first keyring is provisioned (trust
on install), and must still be self-consistent (its own threshold of its own keys).

Chain rule (start-up): nothing stored on disk is trusted because it is there. The device
keeps every rotation document it accepted (keyringstore.py) and `verify_chain` re-checks
each link from the provisioned root, version by version, with the rotation rule (expiry is
checked only for the keyring finally used, as in TUF: an expired intermediate is still a
valid link). A stored document that does not chain is refused with its reason and the last
verified keyring is used. A version floor, raised every time a higher keyring verifies,
makes revocation survive the deletion of stored documents: if the chain that can be
verified ends below the floor, the verdict is not usable (`keyring_below_floor`) rather than
silently falling back to the root's (possibly revoked) keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgerund.errors import TrustError
from edgerund.updates.jsonguard import check_depth
from edgerund.updates.manifest import (
    KEYRING_DOMAIN,
    SignatureEntry,
    parse_time,
    signing_message,
    strict_json,
)

KEYRING_TYPE = "edgerund-keyring"


ROLE_PUBLISHER = "publisher"
ROLE_OPERATOR = "operator"
ROLES = (ROLE_PUBLISHER, ROLE_OPERATOR)


class KeyEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keyid: str
    public: str
    name: str = ""
    role: str = ROLE_PUBLISHER


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
    keys: dict[str, Ed25519PublicKey]  # keyid -> key, publisher role only
    signed: dict[str, Any]  # the raw signed body (to re-serialise / store)
    doc: dict[str, Any]  # the whole document
    operators: dict[str, Ed25519PublicKey] = field(default_factory=dict)  # operator role


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
    check_depth(data, "keyring", "keyring_malformed")
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
    operators: dict[str, Ed25519PublicKey] = {}
    for i, k in enumerate(body.keys):
        if k.role not in ROLES:
            raise TrustError(
                "keyring_malformed", f"keys[{i}].role: expected one of {ROLES}, got {k.role!r}"
            )
        kid, pub = _decode_key(i, k)
        if kid in keys or kid in operators:
            raise TrustError("keyring_malformed", f"keys[{i}]: key {kid[:16]}... listed twice")
        (keys if k.role == ROLE_PUBLISHER else operators)[kid] = pub
    if not 1 <= body.threshold <= len(keys):
        raise TrustError(
            "keyring_malformed",
            f"signed.threshold: expected 1..{len(keys)} (number of publisher keys),"
            f" got {body.threshold}",
        )
    return Keyring(
        version=body.version,
        expires=parse_time(body.expires, "keyring expires"),
        threshold=body.threshold,
        keys=keys,
        signed=doc.signed,
        doc=raw,
        operators=operators,
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


def check_link(old: Keyring, new: Keyring) -> None:
    """`new` is the successor of `old`: version exactly +1, a threshold of the old keys and
    a threshold of the new keys (the rotation rule without expiry)."""
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
    try:
        sigs = _sigs(new)
    except msgspec.ValidationError as exc:
        raise TrustError("keyring_malformed", f"signatures: {exc}") from None
    for label, keys, thr in (("old", old.keys, old.threshold), ("new", new.keys, new.threshold)):
        err = threshold_error(
            f"keyring v{new.version} ({label} keys)",
            count_signatures(msg, sigs, keys),
            thr,
            len(sigs),
        )
        if err is not None:
            raise TrustError(f"keyring_{label}_" + err.code, str(err).split(": ", 1)[1])


def check_rotation(old: Keyring, new: Keyring, now: float) -> None:
    """Accept `new` as the successor of `old` or raise TrustError (see module docstring)."""
    check_link(old, new)
    if new.expires <= now:
        raise TrustError(
            "keyring_expired", f"keyring v{new.version} expired at {new.signed.get('expires')}"
        )


MAX_CHAIN = 256  # links verified at start-up (python-tuf's max_root_rotations)


@dataclass(frozen=True)
class Refused:
    """A stored keyring document that was not accepted, and why."""

    version: int | None  # None: the document could not be parsed
    reason: str  # TrustError code
    message: str


@dataclass(frozen=True)
class ChainVerdict:
    """The outcome of `verify_chain`.

    `keyring` is the last keyring that verified along the chain from the root: the base
    for the next rotation in every case. It may sign bundles and vouch for slots only when
    `usable` (its version is at least the floor); otherwise `reason`/`message` say why the
    device must refuse updates until the missing rotations are delivered again."""

    keyring: Keyring
    chain: tuple[Keyring, ...]  # root, root+1, ..., keyring
    floor: int
    refused: tuple[Refused, ...]
    reason: str | None = None
    message: str = ""

    @property
    def usable(self) -> bool:
        return self.reason is None


def _key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_chain(root: Keyring, stored: Sequence[bytes], *, floor: int) -> ChainVerdict:
    """Re-verify stored rotation documents from the provisioned `root` (pure).

    `root` must already have passed `check_self_signed`. `stored` is every keyring document
    the device kept (any order; unparseable, stale, forged and duplicate ones included).
    `floor` is the highest keyring version ever verified on this device (0 if unknown).
    Documents at or below the root's version are ignored (the root outranks them); each
    next version is taken from the first candidate (in a fixed order) that links."""
    refused: list[Refused] = []
    by_version: dict[int, list[tuple[str, Keyring]]] = {}
    for data in stored:
        try:
            k = parse_keyring(data)
        except TrustError as exc:
            refused.append(Refused(None, exc.code, str(exc).split(": ", 1)[1]))
            continue
        if k.version <= root.version:
            continue
        by_version.setdefault(k.version, []).append((_key(data), k))
    chain = [root]
    cur = root
    while len(chain) <= MAX_CHAIN:
        cands = sorted(by_version.pop(cur.version + 1, []), key=lambda c: c[0])
        if not cands:
            break
        nxt: Keyring | None = None
        for _, k in cands:
            try:
                check_link(cur, k)
            except TrustError as exc:
                refused.append(Refused(k.version, exc.code, str(exc).split(": ", 1)[1]))
                continue
            if nxt is None:
                nxt = k
            else:
                refused.append(
                    Refused(
                        k.version,
                        "keyring_duplicate_version",
                        f"a second valid keyring v{k.version} was stored; the first one is used",
                    )
                )
        if nxt is None:
            break
        chain.append(nxt)
        cur = nxt
    # Whatever is left did not connect to the verified chain (a gap, or a link refused).
    for v in sorted(by_version):
        for _ in by_version[v]:
            refused.append(
                Refused(
                    v,
                    "keyring_chain_gap",
                    f"keyring v{v} does not chain: the last verified keyring is v{cur.version}",
                )
            )
    if cur.version < floor:
        return ChainVerdict(
            keyring=cur,
            chain=tuple(chain),
            floor=floor,
            refused=tuple(refused),
            reason="keyring_below_floor",
            message=(
                f"keyring v{floor} was verified on this device before, but only v{cur.version}"
                " can be verified now (stored rotations deleted or damaged); refusing to fall"
                f" back to older keys: deliver keyrings v{cur.version + 1}..v{floor} again"
            ),
        )
    return ChainVerdict(keyring=cur, chain=tuple(chain), floor=floor, refused=tuple(refused))
