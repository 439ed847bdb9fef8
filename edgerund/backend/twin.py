"""Backend side of the twin (docs/twin.md): build operator-signed commands and desired
documents, check gateway-signed replies and reported documents. Pure but for the clock
and the random nonce; `twin_cli.py` does the MQTT."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edgerund.twin.auth import (
    COMMAND_DOMAIN,
    COMMAND_TYPE,
    DESIRED_DOMAIN,
    DESIRED_TYPE,
    reply_message,
    reported_message,
)
from edgerund.updates.keyring import keyid_of
from edgerund.updates.manifest import signing_message


def _keyid(key: Ed25519PrivateKey) -> str:
    return keyid_of(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def _envelope(domain: bytes, signed: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    sig = base64.b64encode(key.sign(signing_message(domain, signed))).decode()
    return json.dumps(
        {"signed": signed, "signatures": [{"keyid": _keyid(key), "sig": sig}]},
        separators=(",", ":"),
    ).encode()


def command(
    name: str,
    gateway: str,
    args: Mapping[str, Any],
    key: Ed25519PrivateKey,
    *,
    ts_ms: int | None = None,
    nonce: str | None = None,
) -> bytes:
    signed = {
        "type": COMMAND_TYPE,
        "cmd": name,
        "gateway": gateway,
        "nonce": nonce or os.urandom(16).hex(),
        "ts": ts_ms if ts_ms is not None else int(time.time() * 1000),
        "args": dict(args),
    }
    return _envelope(COMMAND_DOMAIN, signed, key)


def desired(
    gateway: str,
    version: int,
    config: Mapping[str, Any],
    key: Ed25519PrivateKey,
    *,
    models: Mapping[str, Any] | None = None,
    expires_s: float = 7 * 86400,
) -> bytes:
    now = int(time.time() * 1000)
    signed = {
        "type": DESIRED_TYPE,
        "gateway": gateway,
        "version": version,
        "issued": now,
        "expires": now + int(expires_s * 1000),
        "config": dict(config),
        "models": dict(models or {}),
    }
    return _envelope(DESIRED_DOMAIN, signed, key)


def _verify(public_pem: bytes, message: bytes, sig_b64: str) -> bool:
    pub = serialization.load_pem_public_key(public_pem)
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return False
    try:
        pub.verify(
            base64.b64decode(sig_b64),
            hashlib.sha256(message).digest(),
            ec.ECDSA(Prehashed(hashes.SHA256())),
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_reply(data: bytes, public_pem: bytes, *, nonce: str) -> dict[str, Any]:
    """The reply body of a gateway-signed reply to the command with `nonce`, or ValueError."""
    doc = json.loads(data)
    signed = doc.get("signed") if isinstance(doc, dict) else None
    if not isinstance(signed, dict):
        raise ValueError(f"not a signed reply: {data[:200]!r}")
    if signed.get("nonce") != nonce:
        raise ValueError(f"reply to another request (nonce {signed.get('nonce')!r})")
    if not _verify(public_pem, reply_message(signed), str(doc.get("sig", ""))):
        raise ValueError("the gateway signature of the reply does not verify")
    body = signed.get("reply")
    return body if isinstance(body, dict) else {}


def verify_reported(data: bytes, public_pem: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    signed = doc.get("signed") if isinstance(doc, dict) else None
    if not isinstance(signed, dict):
        raise ValueError("not a reported document")
    if not _verify(public_pem, reported_message(signed), str(doc.get("sig", ""))):
        raise ValueError("the gateway signature of the reported state does not verify")
    return signed
