"""Signing of telemetry for the uplink: batches (codec trailer) and the `meta` document.

Apart from edgerund/telemetry/uplink.py so that the telemetry component can name the
gateway's key (meta.key_id) without importing the MQTT client: `aiomqtt` (with paho,
ssl and email) is imported only when an uplink is configured.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from edgerund.telemetry import codec

if TYPE_CHECKING:
    from edgerund import ports


def meta_with_ver(content: str, ver: int) -> str:
    """The published meta: the stored content plus its schema version."""
    obj = json.loads(content)
    obj["schema_ver"] = ver
    return json.dumps(obj, separators=(",", ":"))


class Signer:
    """Adapter over the identity component: digest -> 4-byte key id and r||s."""

    def __init__(self, identity: ports.Signer) -> None:
        from cryptography.hazmat.primitives import serialization

        self._identity = identity
        pem = identity.public_key_pem()
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = codec.key_id_for(spki)

    async def sign_meta(self, text: str) -> str:
        """The meta document with its `sig` member (codec.meta_signing_digest)."""
        doc = json.loads(text)
        der = await self._identity.sign_digest(codec.meta_signing_digest(doc))
        signed = codec.with_meta_signature(doc, self.key_id, codec.der_to_rs(der))
        return json.dumps(signed, separators=(",", ":"))

    async def sign(self, payload: bytes) -> bytes:
        der = await self._identity.sign_digest(codec.signing_digest(payload))
        return codec.attach_signature(
            payload,
            codec.Signature(codec.SIG_ALG_ECDSA_P256_SHA256, self.key_id, codec.der_to_rs(der)),
        )
