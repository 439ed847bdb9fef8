"""Operator-signed envelopes: the trust decision for remote commands and desired state
(pure: bytes, keys and the clock in; the signed body or a refusal out).

Wire form (docs/twin.md §2), shared by commands and desired documents:

    {"signed": {"type": "edgerund-command", "gateway": ..., ...},
     "signatures": [{"keyid": sha256(raw key) hex, "sig": base64 Ed25519}]}

A signature is over `domain + canonical(signed)` (sorted keys, compact UTF-8; the same
canonical form as manifests and keyrings), with a domain per document type
(`edgerund-command-v1\\0`, `edgerund-desired-v1\\0`), so a signature made for one kind of
document can never be replayed as another. One valid signature by a key the verified
keyring lists with the `operator` role is required; a key with the publisher role is
refused as `wrong_role` (a bundle signer can never command a gateway), any other key as
`unknown_key`.

Commands carry the target gateway, the command name (must match the topic, so a signed
`status` cannot be re-published on `cmd/rollback`), a random nonce and a timestamp in
milliseconds. `ReplayGuard` accepts a command only when its timestamp is within
`window_s` of the gateway's clock and its nonce was not seen inside that window; the
nonce cache holds at most `capacity` entries and, when full, forgets the oldest and
raises a timestamp floor to it, so an evicted nonce can still never be replayed. The
window is the price of not needing a synchronised counter with the backend. The cache
outlives a restart: `dump`/`restore` are its persisted form (twin/nonces.py writes it
after every admitted command; without a readable copy at start-up the floor is raised to
the start instead, so a command signed before it must be signed again).

Nothing unauthenticated reaches a general-purpose parser unbounded: the caller caps the
size; here the JSON nesting is checked before parsing and duplicate keys are refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgerund.errors import TrustError
from edgerund.updates.jsonguard import check_depth
from edgerund.updates.manifest import canonical, signing_message, strict_json

COMMAND_DOMAIN = b"edgerund-command-v1\x00"
DESIRED_DOMAIN = b"edgerund-desired-v1\x00"
REPLY_DOMAIN = b"edgerund-reply-v1\x00"
REPORTED_DOMAIN = b"edgerund-reported-v1\x00"
COMMAND_TYPE = "edgerund-command"
DESIRED_TYPE = "edgerund-desired"
_NONCE_RE = re.compile(r"^[0-9a-f]{16,64}$")
MAX_SIGNATURES = 8


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified envelope: its signed body and the operator key that signed it."""

    signed: dict[str, Any]
    keyid: str


def open_envelope(
    data: bytes,
    *,
    domain: bytes,
    doc_type: str,
    gateway: str,
    operators: Mapping[str, Ed25519PublicKey],
    publishers: Mapping[str, Ed25519PublicKey] | None = None,
) -> Opened:
    """Check structure, gateway and signature; raise TrustError with a stable code."""
    check_depth(data, doc_type, "malformed", max_depth=16)
    raw = strict_json(data, doc_type, "malformed")
    if isinstance(raw, dict) and "signatures" not in raw and "signed" not in raw:
        raise TrustError("unsigned", f"{doc_type}: expected an operator-signed envelope")
    if not isinstance(raw, dict) or set(raw) - {"signed", "signatures"}:
        raise TrustError("malformed", "expected an object with `signed` and `signatures`")
    signed = raw.get("signed")
    sigs = raw.get("signatures", [])
    if not isinstance(signed, dict):
        raise TrustError("malformed", f"signed: expected an object, got {type(signed).__name__}")
    if signed.get("type") != doc_type:
        raise TrustError(
            "malformed", f"signed.type: expected {doc_type!r}, got {signed.get('type')!r}"
        )
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise TrustError("malformed", f"signatures: expected a list of <= {MAX_SIGNATURES}")
    if not sigs:
        raise TrustError("unsigned", f"{doc_type}: expected an operator signature, got none")
    message = signing_message(domain, signed)
    reason = "unknown_key"
    for s in sigs:
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str):
            raise TrustError("malformed", "signatures[]: expected {keyid, sig}")
        kid = s["keyid"]
        key = operators.get(kid)
        if key is None:
            if publishers is not None and kid in publishers and reason == "unknown_key":
                reason = "wrong_role"
            continue
        try:
            key.verify(base64.b64decode(str(s.get("sig", "")), validate=True), message)
        except (binascii.Error, ValueError, InvalidSignature):
            reason = "bad_signature"
            continue
        # Only now, signed by an operator, is the target worth comparing.
        if signed.get("gateway") != gateway:
            raise TrustError(
                "wrong_gateway",
                f"signed.gateway: expected {gateway!r}, got {signed.get('gateway')!r}",
            )
        return Opened(signed, kid)
    msg = {
        "unknown_key": "no signature by a key with the operator role in the keyring",
        "wrong_role": "signed by a publisher key: only operator keys sign commands and desired state",
        "bad_signature": "the operator signature does not verify",
    }[reason]
    raise TrustError(reason, f"{doc_type}: {msg}")


class ReplayGuard:
    """Timestamp window + nonce cache for commands (see the module docstring)."""

    def __init__(self, window_s: float = 300.0, capacity: int = 4096) -> None:
        self.window_ms = int(window_s * 1000)
        self.capacity = capacity
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> ts, oldest first
        self.floor_ms = 0
        self.changes = 0  # accepted nonces so far: the persisted copy is stale when it moves

    def check(self, nonce: object, ts: object, now_ms: int) -> None:
        """Accept (and remember) or raise TrustError("replay" | "expired" | ...)."""
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise TrustError("malformed", "signed.nonce: expected 16..64 lowercase hex digits")
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise TrustError("malformed", f"signed.ts: expected integer milliseconds, got {ts!r}")
        if abs(now_ms - ts) > self.window_ms:
            raise TrustError(
                "expired",
                f"signed.ts: expected within {self.window_ms // 1000} s of the gateway clock,"
                f" got {(ts - now_ms) / 1000:+.1f} s",
            )
        if nonce in self._seen:
            raise TrustError("replay", f"nonce {nonce[:16]}... was already used")
        if ts <= self.floor_ms:
            raise TrustError(
                "replay",
                f"signed.ts: expected after {self.floor_ms} (the replay floor: older nonces"
                " are no longer remembered), got {ts}; sign the command again",
            )
        self._prune(now_ms)
        self._remember(nonce, ts)
        self.changes += 1

    def _remember(self, nonce: str, ts: int) -> None:
        self._seen[nonce] = ts
        while len(self._seen) > self.capacity:
            _, old_ts = self._seen.popitem(last=False)
            self.floor_ms = max(self.floor_ms, old_ts)

    def dump(self) -> dict[str, Any]:
        """The persisted form: the floor and the nonces still inside the window."""
        return {
            "v": 1,
            "floor_ms": self.floor_ms,
            # (nonce, ts) pairs: cheap to take on the loop, serialised in the writer thread.
            "nonces": list(self._seen.items()),
        }

    def restore(self, data: object, now_ms: int) -> int:
        """Take back a `dump` (unauthenticated file content: every item is checked; what
        does not parse is skipped). Returns the number of nonces taken back."""
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("expected a nonce cache document {v: 1, ...}")
        floor = data.get("floor_ms")
        if isinstance(floor, int) and not isinstance(floor, bool):
            self.floor_ms = max(self.floor_ms, floor)
        items = data.get("nonces")
        horizon = now_ms - self.window_ms
        n = 0
        for it in items[-self.capacity :] if isinstance(items, list) else []:
            if (
                isinstance(it, list | tuple)
                and len(it) == 2
                and isinstance(it[0], str)
                and _NONCE_RE.match(it[0])
                and isinstance(it[1], int)
                and not isinstance(it[1], bool)
                and it[1] >= horizon
            ):
                self._remember(it[0], it[1])
                n += 1
        return n

    def raise_floor(self, floor_ms: int) -> None:
        """Refuse every command with a timestamp at or before `floor_ms`."""
        self.floor_ms = max(self.floor_ms, floor_ms)

    def _prune(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        stale = [n for n, t in self._seen.items() if t < horizon]
        for n in stale:
            del self._seen[n]

    def __len__(self) -> int:
        return len(self._seen)


def open_command(
    data: bytes,
    *,
    name: str,
    gateway: str,
    operators: Mapping[str, Ed25519PublicKey],
    publishers: Mapping[str, Ed25519PublicKey] | None,
    guard: ReplayGuard,
    now_ms: int,
) -> tuple[Opened, dict[str, Any]]:
    """A verified command for `cmd/{name}`: (envelope, args). Raises TrustError."""
    op = open_envelope(
        data,
        domain=COMMAND_DOMAIN,
        doc_type=COMMAND_TYPE,
        gateway=gateway,
        operators=operators,
        publishers=publishers,
    )
    if op.signed.get("cmd") != name:
        raise TrustError(
            "wrong_command", f"signed.cmd: expected {name!r}, got {op.signed.get('cmd')!r}"
        )
    args = op.signed.get("args", {})
    if not isinstance(args, dict):
        raise TrustError("malformed", f"signed.args: expected an object, got {type(args).__name__}")
    guard.check(op.signed.get("nonce"), op.signed.get("ts"), now_ms)
    return op, args


def reply_message(body: Mapping[str, Any]) -> bytes:
    """What the gateway signs (SHA-256 of this, ECDSA) for a reply."""
    return signing_message(REPLY_DOMAIN, body)


def reported_message(body: Mapping[str, Any]) -> bytes:
    return signing_message(REPORTED_DOMAIN, body)


__all__ = ["Opened", "ReplayGuard", "canonical", "open_command", "open_envelope"]
