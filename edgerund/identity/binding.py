"""Pure helpers shared by the device and the verifier: the nonce rule and the binding value.

The binding PCR's expected value is computed the same way on both sides, so it lives in one
I/O-free module that the daemon and the backend verifier import.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgerund.identity import tpmstruct as ts

MAX_NONCE_BYTES = 64


def parse_nonce(text: str) -> bytes:
    """A verifier nonce given as hex: 1..64 bytes. Raises ValueError with the reason."""
    t = text.strip()
    if t.startswith(("0x", "0X")):
        t = t[2:]
    try:
        nonce = bytes.fromhex(t)
    except ValueError:
        raise ValueError(f"nonce must be hex digits (got {text[:80]!r})") from None
    if not nonce:
        raise ValueError("nonce is empty: a fresh random nonce is mandatory (e.g. 32 bytes)")
    if len(nonce) > MAX_NONCE_BYTES:
        raise ValueError(f"nonce is {len(nonce)} bytes; at most {MAX_NONCE_BYTES} are allowed")
    return nonce


def binding_value(config_sha256: bytes, model_sha256s: Sequence[bytes]) -> bytes:
    """The expected binding PCR (sha256 bank) after a reset, the config and the models.

    The daemon resets the PCR, extends it with sha256(config file bytes), then with
    sha256(manifest.json bytes) of each active model in order of model name.
    """
    value = bytes(32)
    for digest in (config_sha256, *model_sha256s):
        value = ts.extend(value, digest)
    return value
