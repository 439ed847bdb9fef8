"""TPM 2.0 wire structures in pure Python (no libtss2): parse and marshal.

The verifier (backend/verify.py) must run on a fleet backend that has no TPM stack, and
the software identity (identity/software.py) produces results in the same format as the
TPM, so both need the few TPM structures of an attestation: TPMT_PUBLIC / TPM2B_PUBLIC
(ECC and RSA keys), TPMT_SIGNATURE (ECDSA, RSASSA, RSAPSS), TPMS_ATTEST (quote and certify) and
TPML_PCR_SELECTION. Everything is big-endian; a TPM2B is a u16 size followed by the bytes
(TPM 2.0 Library Part 2, "Structures"). Parsers take bytes and return frozen values or raise
`StructError` naming the field that was short or wrong; they never trust a length.

An object's Name is `nameAlg (u16) || H_nameAlg(TPMT_PUBLIC)`: it commits to the key AND
its attributes (restricted, fixedTPM, ...), which is why a verifier checks Names, not keys.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgerund.errors import EdgerundError

# algorithm identifiers (TPM2_ALG_*)
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ALG_CFB = 0x0043

HASH_NAMES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
HASH_IDS = {v: k for k, v in HASH_NAMES.items()}

ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004
ECC_NIST_P521 = 0x0005
CURVES: dict[int, ec.EllipticCurve] = {
    ECC_NIST_P256: ec.SECP256R1(),
    ECC_NIST_P384: ec.SECP384R1(),
    ECC_NIST_P521: ec.SECP521R1(),
}

# TPMA_OBJECT bits
OA_FIXEDTPM = 0x00000002
OA_STCLEAR = 0x00000004
OA_FIXEDPARENT = 0x00000010
OA_SENSITIVEDATAORIGIN = 0x00000020
OA_USERWITHAUTH = 0x00000040
OA_ADMINWITHPOLICY = 0x00000080
OA_NODA = 0x00000400
OA_RESTRICTED = 0x00010000
OA_DECRYPT = 0x00020000
OA_SIGN = 0x00040000

TPM_GENERATED_VALUE = 0xFF544347
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_QUOTE = 0x8018


class StructError(EdgerundError, ValueError):
    """Bytes that do not parse as the expected TPM structure."""


class Reader:
    """A bounds-checked big-endian cursor."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.off = 0
        self.what = what

    def take(self, n: int, field_name: str) -> bytes:
        if n < 0 or self.off + n > len(self.data):
            raise StructError(
                f"{self.what}: truncated at {field_name} (need {n} bytes at offset {self.off}, "
                f"have {len(self.data) - self.off})"
            )
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def u8(self, f: str) -> int:
        return self.take(1, f)[0]

    def u16(self, f: str) -> int:
        return int(struct.unpack(">H", self.take(2, f))[0])

    def u32(self, f: str) -> int:
        return int(struct.unpack(">I", self.take(4, f))[0])

    def u64(self, f: str) -> int:
        return int(struct.unpack(">Q", self.take(8, f))[0])

    def b2(self, f: str) -> bytes:
        return self.take(self.u16(f + ".size"), f)

    def done(self) -> None:
        if self.off != len(self.data):
            raise StructError(f"{self.what}: {len(self.data) - self.off} trailing bytes")


def b2(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def hash_fn(alg: int) -> Any:
    name = HASH_NAMES.get(alg)
    if name is None:
        raise StructError(f"unsupported hash algorithm 0x{alg:04x}")
    return getattr(hashlib, name)


# ---------------------------------------------------------------- public areas


@dataclass(frozen=True)
class PublicArea:
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    scheme: int
    scheme_hash: int
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    raw: bytes  # the marshalled TPMT_PUBLIC
    # parameters.symmetric of a storage/decrypt key (the EK: AES-128-CFB); ALG_NULL if none
    sym_alg: int = ALG_NULL
    sym_bits: int = 0
    sym_mode: int = ALG_NULL

    @property
    def name(self) -> bytes:
        return struct.pack(">H", self.name_alg) + bytes(hash_fn(self.name_alg)(self.raw).digest())

    def has(self, attr: int) -> bool:
        return bool(self.attributes & attr)


def parse_tpmt_public(raw: bytes) -> PublicArea:
    r = Reader(raw, "TPMT_PUBLIC")
    typ = r.u16("type")
    name_alg = r.u16("nameAlg")
    attrs = r.u32("objectAttributes")
    policy = r.b2("authPolicy")
    sym = r.u16("parameters.symmetric.algorithm")
    sym_bits = sym_mode = 0
    if sym != ALG_NULL:
        sym_bits = r.u16("parameters.symmetric.keyBits")
        sym_mode = r.u16("parameters.symmetric.mode")
    scheme = r.u16("parameters.scheme")
    scheme_hash = ALG_NULL
    if scheme != ALG_NULL:
        scheme_hash = r.u16("parameters.scheme.hashAlg")
        if scheme == ALG_ECDAA:
            r.u16("parameters.scheme.count")
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    if typ == ALG_ECC:
        curve_id = r.u16("parameters.curveID")
        kdf = r.u16("parameters.kdf")
        if kdf != ALG_NULL:
            r.u16("parameters.kdf.hashAlg")
        x = r.b2("unique.x")
        y = r.b2("unique.y")
        curve = CURVES.get(curve_id)
        if curve is None:
            raise StructError(f"TPMT_PUBLIC: unsupported ECC curve 0x{curve_id:04x}")
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError as exc:
            raise StructError(f"TPMT_PUBLIC: ECC point is not on the curve: {exc}") from exc
    elif typ == ALG_RSA:
        r.u16("parameters.keyBits")
        exponent = r.u32("parameters.exponent") or 65537
        modulus = r.b2("unique.rsa")
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as exc:
            raise StructError(f"TPMT_PUBLIC: invalid RSA public key: {exc}") from exc
    else:
        raise StructError(f"TPMT_PUBLIC: unsupported key type 0x{typ:04x} (want ECC or RSA)")
    r.done()
    return PublicArea(
        typ, name_alg, attrs, policy, scheme, scheme_hash, key, raw,
        sym_alg=sym, sym_bits=sym_bits, sym_mode=sym_mode or ALG_NULL,
    )  # fmt: skip


def parse_tpm2b_public(data: bytes) -> PublicArea:
    r = Reader(data, "TPM2B_PUBLIC")
    inner = r.b2("publicArea")
    r.done()
    return parse_tpmt_public(inner)


def marshal_ecc_public(
    key: ec.EllipticCurvePublicKey, attributes: int, *, scheme: int = ALG_ECDSA
) -> bytes:
    """A TPM2B_PUBLIC for a P-256 key (used by the software identity)."""
    nums = key.public_numbers()
    body = struct.pack(">HHI", ALG_ECC, ALG_SHA256, attributes) + b2(b"")
    body += struct.pack(">H", ALG_NULL)  # symmetric
    body += (
        struct.pack(">HH", scheme, ALG_SHA256)
        if scheme != ALG_NULL
        else struct.pack(">H", ALG_NULL)
    )
    body += struct.pack(">HH", ECC_NIST_P256, ALG_NULL)  # curve, kdf
    body += b2(nums.x.to_bytes(32, "big")) + b2(nums.y.to_bytes(32, "big"))
    return b2(body)


# ---------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Signature:
    alg: int
    hash_alg: int
    r: int = 0
    s: int = 0
    rsa_sig: bytes = b""


def parse_signature(data: bytes) -> Signature:
    r = Reader(data, "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    if alg == ALG_ECDSA:
        h = r.u16("signature.hash")
        sr = int.from_bytes(r.b2("signature.r"), "big")
        ss = int.from_bytes(r.b2("signature.s"), "big")
        r.done()
        return Signature(alg, h, r=sr, s=ss)
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        h = r.u16("signature.hash")
        sig = r.b2("signature.sig")
        r.done()
        return Signature(alg, h, rsa_sig=sig)
    raise StructError(f"TPMT_SIGNATURE: unsupported signature algorithm 0x{alg:04x}")


def marshal_ecdsa_signature(r_int: int, s_int: int, size: int = 32) -> bytes:
    return (
        struct.pack(">HH", ALG_ECDSA, ALG_SHA256)
        + b2(r_int.to_bytes(size, "big"))
        + b2(s_int.to_bytes(size, "big"))
    )


# ---------------------------------------------------------------- PCR selections


PcrSelection = list[tuple[int, list[int]]]  # [(hash alg, [pcr indices ascending])]


def parse_pcr_selection_string(text: str) -> PcrSelection:
    """`"sha256:0,1,2+sha1:7"` (tpm2-tools syntax) -> [(ALG_SHA256, [0, 1, 2]), ...]."""
    out: PcrSelection = []
    if not text.strip():
        raise ValueError("empty PCR selection")
    for bank in text.split("+"):
        name, sep, idx = bank.strip().partition(":")
        if not sep or name not in HASH_IDS:
            raise ValueError(
                f"bad PCR bank {bank!r}: expected BANK:N,N,... with BANK one of "
                f"{', '.join(sorted(HASH_IDS))}"
            )
        try:
            pcrs = sorted({int(i) for i in idx.split(",") if i.strip()})
        except ValueError:
            raise ValueError(f"bad PCR index list {idx!r}: expected numbers 0-23") from None
        if not pcrs or any(p < 0 or p > 23 for p in pcrs):
            raise ValueError(f"bad PCR index list {idx!r}: expected numbers 0-23")
        out.append((HASH_IDS[name], pcrs))
    return out


def format_pcr_selection(sel: PcrSelection) -> str:
    return "+".join(f"{HASH_NAMES[h]}:{','.join(map(str, ix))}" for h, ix in sel)


def marshal_pcr_selection(sel: PcrSelection) -> bytes:
    out = struct.pack(">I", len(sel))
    for h, ix in sel:
        bitmap = bytearray(3)
        for i in ix:
            bitmap[i // 8] |= 1 << (i % 8)
        out += struct.pack(">HB", h, 3) + bytes(bitmap)
    return out


def _parse_pcr_selection(r: Reader) -> PcrSelection:
    sel: PcrSelection = []
    count = r.u32("pcrSelect.count")
    if count > 16:
        raise StructError(f"TPMS_ATTEST: implausible PCR bank count {count}")
    for _ in range(count):
        h = r.u16("pcrSelect.hash")
        n = r.u8("pcrSelect.sizeofSelect")
        bitmap = r.take(n, "pcrSelect.pcrSelect")
        sel.append((h, [i for i in range(8 * n) if bitmap[i // 8] >> (i % 8) & 1]))
    return sel


# ---------------------------------------------------------------- attestation


@dataclass(frozen=True)
class Attest:
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: int
    firmware_version: int
    pcr_select: PcrSelection = field(default_factory=list)
    pcr_digest: bytes = b""
    certified_name: bytes = b""
    certified_qualified_name: bytes = b""


def read_attest_header(r: Reader) -> Attest:
    """The fields every TPMS_ATTEST starts with (up to the `attested` union), as an Attest
    with empty union fields; the caller reads the union for `type` from `r`."""
    magic = r.u32("magic")
    typ = r.u16("type")
    signer = r.b2("qualifiedSigner")
    extra = r.b2("extraData")
    clock = r.u64("clockInfo.clock")
    reset = r.u32("clockInfo.resetCount")
    restart = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    fw = r.u64("firmwareVersion")
    return Attest(magic, typ, signer, extra, clock, reset, restart, safe, fw)


def parse_attest(data: bytes) -> Attest:
    r = Reader(data, "TPMS_ATTEST")
    head = read_attest_header(r)
    if head.type == ST_ATTEST_QUOTE:
        sel = _parse_pcr_selection(r)
        digest = r.b2("quote.pcrDigest")
        r.done()
        return replace(head, pcr_select=sel, pcr_digest=digest)
    if head.type == ST_ATTEST_CERTIFY:
        name = r.b2("certify.name")
        qname = r.b2("certify.qualifiedName")
        r.done()
        return replace(head, certified_name=name, certified_qualified_name=qname)
    return head


def marshal_attest(a: Attest) -> bytes:
    out = struct.pack(">IH", a.magic, a.type) + b2(a.qualified_signer) + b2(a.extra_data)
    out += struct.pack(">QIIBQ", a.clock, a.reset_count, a.restart_count, a.safe,
                       a.firmware_version)  # fmt: skip
    if a.type == ST_ATTEST_QUOTE:
        out += marshal_pcr_selection(a.pcr_select) + b2(a.pcr_digest)
    elif a.type == ST_ATTEST_CERTIFY:
        out += b2(a.certified_name) + b2(a.certified_qualified_name)
    return out


def pcr_digest(sel: PcrSelection, values: dict[tuple[int, int], bytes], alg: int) -> bytes:
    """H_alg(concatenation of the selected PCR values in selection order)."""
    h = hash_fn(alg)()
    for bank, ix in sel:
        for i in ix:
            h.update(values[(bank, i)])
    return bytes(h.digest())


def extend(value: bytes, digest: bytes, alg: int = ALG_SHA256) -> bytes:
    """PCR extend: new = H(old || digest)."""
    return bytes(hash_fn(alg)(value + digest).digest())
