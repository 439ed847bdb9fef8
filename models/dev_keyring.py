"""Regenerate the DEVELOPMENT-ONLY keyring in models/dev-keys deterministically.

DEVELOPMENT-ONLY: these keys are public in the repository; a production device must be
provisioned with its own keyring (`edgerund bundle keyring create`).

The publisher key (DEVELOPMENT-ONLY.key) is kept as it is. The operator key (signs desired
state and remote commands, docs/twin.md) is derived from a fixed seed so that running this
again gives the same bytes; Ed25519 signatures are deterministic, so the keyring is too.

    python models/dev_keyring.py
"""

from __future__ import annotations

import calendar
import hashlib
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerund.publisher.build import keyring_bytes, load_private, make_keyring

DEV = Path(__file__).resolve().parent / "dev-keys"
EXPIRES = calendar.timegm(time.strptime("2036-11-26T05:57:58Z", "%Y-%m-%dT%H:%M:%SZ"))
OPERATOR_SEED = hashlib.sha256(b"edgerund DEVELOPMENT-ONLY operator key v1").digest()


def operator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(OPERATOR_SEED)


def main() -> None:
    publisher = load_private(DEV / "DEVELOPMENT-ONLY.key")
    op = operator_key()
    (DEV / "OPERATOR-DEVELOPMENT-ONLY.key").write_bytes(
        op.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (DEV / "OPERATOR-DEVELOPMENT-ONLY.pub").write_bytes(
        op.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    doc = make_keyring(
        [publisher.public_key()],
        threshold=1,
        version=1,
        signers=[publisher],
        expires=EXPIRES,
        operators=[op.public_key()],
    )
    (DEV / "keyring.dev.json").write_bytes(keyring_bytes(doc))


if __name__ == "__main__":
    main()
