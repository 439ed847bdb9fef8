"""TPM2_MakeCredential in pure Python: the verifier's half of credential activation.

Why: a quote signed by an AK proves nothing until the verifier knows that the AK lives in a
genuine TPM. The EK certificate proves that an EK (a decrypt-only key) lives in a TPM of a
known manufacturer; credential activation transfers that trust to the AK:

    verifier: seed  <- random (RSA EK)  or  ECDH(ephemeral, EK) + KDFe (ECC EK)
              encryptedSecret = RSA-OAEP_nameAlg(seed, label "IDENTITY\\0")  |  ephemeral point
              symKey  = KDFa(nameAlg, seed, "STORAGE", AK Name, "", EK symmetric keyBits)
              encId   = AES-CFB(symKey, IV=0, TPM2B_DIGEST(credential))
              hmacKey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)
              blob    = TPM2B_ID_OBJECT( TPM2B_DIGEST(HMAC(hmacKey, encId || AK Name)) || encId )
    device:   TPM2_ActivateCredential(AK, EK, blob, encryptedSecret) -> credential

(TPM 2.0 Library Part 1 §24 "Credential Protection", Annex B.10.4 / C.6.4 for the RSA and
ECC secret sharing, Part 3 TPM2_MakeCredential.) Only the TPM holding the EK's private key
recovers the seed, and it releases the credential only if the HMAC over the AK *Name*
verifies AND an object with that Name is loaded in the same TPM. The Name hashes the AK's
whole public area, attributes included, so a verifier that built the credential for the
Name of a restricted, fixedTPM signing key learns, from a device that returns the
credential, that exactly that key lives in the TPM behind the EK certificate.

No libtss2 and no TPM here: a fleet backend runs this with `cryptography` only.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 47 moved CFB (the mode the TPM uses for credentials) to "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from edgerund.identity import tpmstruct as ts

IDENTITY_LABEL = b"IDENTITY\0"
_PYCA_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    ts.ALG_SHA1: hashes.SHA1,
    ts.ALG_SHA256: hashes.SHA256,
    ts.ALG_SHA384: hashes.SHA384,
    ts.ALG_SHA512: hashes.SHA512,
}


class CredentialError(ValueError):
    """The EK or the AK Name cannot be used for MakeCredential (message says why)."""


@dataclass(frozen=True)
class Credential:
    """What the device needs for TPM2_ActivateCredential (both marshalled TPM2Bs)."""

    blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET


def _digest_size(alg: int) -> int:
    return int(ts.hash_fn(alg)().digest_size)


def kdfa(
    alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC (TPM Part 1 §11.4.10.2).

    K(i) = HMAC(key, [i]_32 || label || 0x00 || contextU || contextV || [bits]_32)
    """
    if bits <= 0 or bits % 8:
        raise CredentialError(f"KDFa: bad key length {bits} bits")
    name = ts.HASH_NAMES[alg]
    out = b""
    counter = 0
    label = label.rstrip(b"\0") + b"\0"  # the label is always NUL-terminated once
    while len(out) < bits // 8:
        counter += 1
        msg = struct.pack(">I", counter) + label + context_u + context_v + struct.pack(">I", bits)
        out += hmac.new(key, msg, name).digest()
    return out[: bits // 8]


def kdfe(alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """SP 800-56A concatenation KDF (TPM Part 1 §11.4.10.3).

    K(i) = H([i]_32 || Z || label(NUL-terminated) || partyUInfo || partyVInfo)
    """
    if bits <= 0 or bits % 8:
        raise CredentialError(f"KDFe: bad key length {bits} bits")
    h = ts.hash_fn(alg)
    label = label.rstrip(b"\0") + b"\0"
    out = b""
    counter = 0
    while len(out) < bits // 8:
        counter += 1
        out += h(struct.pack(">I", counter) + z + label + party_u + party_v).digest()
    return out[: bits // 8]


def _seed_rsa(ek: rsa.RSAPublicKey, name_alg: int, rand: bytes) -> tuple[bytes, bytes]:
    halg = _PYCA_HASHES[name_alg]()
    seed = rand[: _digest_size(name_alg)]
    enc = ek.encrypt(seed, padding.OAEP(padding.MGF1(halg), halg, IDENTITY_LABEL))
    return seed, enc


def _seed_ecc(ek: ec.EllipticCurvePublicKey, name_alg: int) -> tuple[bytes, bytes]:
    eph = ec.generate_private_key(ek.curve)
    size = (ek.curve.key_size + 7) // 8
    ep = eph.public_key().public_numbers()
    ex, ey = ep.x.to_bytes(size, "big"), ep.y.to_bytes(size, "big")
    z = eph.exchange(ec.ECDH(), ek)  # the x coordinate of the shared point, curve-sized
    ek_x = ek.public_numbers().x.to_bytes(size, "big")
    seed = kdfe(name_alg, z, IDENTITY_LABEL, ex, ek_x, _digest_size(name_alg) * 8)
    return seed, ts.b2(ex) + ts.b2(ey)  # TPMS_ECC_POINT of the ephemeral key


def check_ek(ek: ts.PublicArea) -> None:
    """The EK must be a restricted decryption key with AES-CFB (what MakeCredential needs)."""
    if not (ek.has(ts.OA_RESTRICTED) and ek.has(ts.OA_DECRYPT)) or ek.has(ts.OA_SIGN):
        raise CredentialError(
            f"the EK must be a restricted decryption key (objectAttributes 0x{ek.attributes:08x})"
        )
    if not ek.has(ts.OA_FIXEDTPM):
        raise CredentialError("the EK is not fixedTPM")
    if ek.sym_alg != ts.ALG_AES or ek.sym_mode != ts.ALG_CFB or ek.sym_bits not in (128, 256):
        raise CredentialError(
            f"the EK's symmetric algorithm is 0x{ek.sym_alg:04x}/{ek.sym_bits}/"
            f"0x{ek.sym_mode:04x}, expected AES-128/256-CFB"
        )
    if ek.name_alg not in _PYCA_HASHES:
        raise CredentialError(f"the EK's nameAlg 0x{ek.name_alg:04x} is not supported")


def make_credential(
    ek: ts.PublicArea, credential: bytes, ak_name: bytes, *, rand: bytes | None = None
) -> Credential:
    """Encrypt `credential` to `ek` so that only a TPM with an object named `ak_name` gets it.

    `rand` (tests only) fixes the RSA seed; the ECC ephemeral key is always fresh.
    """
    check_ek(ek)
    dsize = _digest_size(ek.name_alg)
    if not 1 <= len(credential) <= dsize:
        raise CredentialError(f"the credential must be 1-{dsize} bytes (the EK nameAlg size)")
    if len(ak_name) < 3 or struct.unpack(">H", ak_name[:2])[0] not in ts.HASH_NAMES:
        raise CredentialError("the AK Name must be nameAlg || digest")
    if isinstance(ek.key, rsa.RSAPublicKey):
        seed, enc_seed = _seed_rsa(ek.key, ek.name_alg, rand if rand else os.urandom(dsize))
    else:
        seed, enc_seed = _seed_ecc(ek.key, ek.name_alg)
    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", ak_name, b"", ek.sym_bits)
    enc = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = enc.update(ts.b2(credential)) + enc.finalize()
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", dsize * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, ts.HASH_NAMES[ek.name_alg]).digest()
    blob = ts.b2(ts.b2(outer) + enc_identity)
    return Credential(blob=blob, encrypted_secret=ts.b2(enc_seed))


def ak_name_of(ak_public: bytes) -> bytes:
    """The Name the verifier computes itself from the AK's TPM2B_PUBLIC (never trusted)."""
    return ts.parse_tpm2b_public(ak_public).name
