"""The software identity: keys in files. INSECURE, and says so.

For development, `--simulate`, and gateways without a TPM (`kind: software`, or
`kind: tpm` + `fallback: software` when the TPM is absent). It offers the same API and the
same attestation result format as the TPM identity, so the rest of the daemon and the
fleet backend run unchanged, but nothing protects the keys: anyone who can read the state
directory can impersonate the gateway and forge "quotes". The status carries
`insecure: true` with a warning, start-up logs it at WARNING, and the verifier rejects
software results unless told `--allow-software`.

Files (under paths.state_dir, created with mode 0600 and refused if group/other can read
them): the telemetry signing key and a separate attestation key (P-256, PKCS#8 PEM; separate
so that `sign_digest` can never produce a valid "quote"), a counter file (written
atomically and fsync'ed, so a power cut leaves the old or the new value, never less), and a
boot counter standing in for the TPM's resetCount. The binding PCR is emulated in memory.

As a FALLBACK for an absent TPM (`reason` set) the counter is refused: the real
anti-rollback counter lives in the TPM, and a file counter starting at 0 would accept
every old bundle. `counter_read`/`counter_increment` raise a DeviceError with the reason
(visible in status as `counter_refused`), so updates are refused until the TPM is back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import time
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from edgerund.errors import ConfigError, DeviceError
from edgerund.identity import tpmstruct as ts
from edgerund.identity.base import Identity, pem, spki_fingerprint
from edgerund.identity.config import IdentityConfig
from edgerund.identity.tpm import write_private_file

log = structlog.get_logger("edgerund.identity")

AK_ATTRS = (
    ts.OA_RESTRICTED | ts.OA_SIGN | ts.OA_FIXEDTPM | ts.OA_FIXEDPARENT
    | ts.OA_SENSITIVEDATAORIGIN | ts.OA_USERWITHAUTH | ts.OA_NODA
)  # fmt: skip
SK_ATTRS = (
    ts.OA_SIGN | ts.OA_FIXEDTPM | ts.OA_FIXEDPARENT | ts.OA_SENSITIVEDATAORIGIN
    | ts.OA_USERWITHAUTH | ts.OA_NODA
)  # fmt: skip


def _resolve(state_dir: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else state_dir / p


def load_or_create_key(path: Path, config_key: str) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 key file, or create it with O_EXCL and mode 0600."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("software_key_created", path=str(path))
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"key file {path} is accessible by group/others (mode {mode:04o}); expected 0600: "
            f"chmod 600 {path}",
            path=f"identity.{config_key}",
        )
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"key file {path} is not an unencrypted PEM private key: {exc}",
            path=f"identity.{config_key}",
        ) from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise ConfigError(
            f"key file {path} must hold an ECDSA P-256 key", path=f"identity.{config_key}"
        )
    return loaded


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"counter file {path} is corrupt (expected an integer, got {text[:40]!r}); "
            "restore it: a lower value would allow a rollback",
            path="identity.counter_file",
        ) from None


class SoftwareIdentity(Identity):
    kind = "software"
    insecure = True

    def __init__(self, cfg: IdentityConfig, state_dir: Path, reason: str = "") -> None:
        super().__init__(cfg.pcr_binding, cfg.pcr_selection)
        self.cfg = cfg
        self.reason = reason
        self.key_path = _resolve(state_dir, cfg.key_file)
        self.ak_path = _resolve(state_dir, cfg.ak_key_file)
        self.counter_path = _resolve(state_dir, cfg.counter_file)
        self.boots_path = self.counter_path.with_name(self.counter_path.name + ".boots")
        self._sel = ts.parse_pcr_selection_string(cfg.pcr_selection)
        self._pcrs: dict[tuple[int, int], bytes] = {
            (h, i): bytes(ts.hash_fn(h)().digest_size) for h, ix in self._sel for i in ix
        }
        self._lock = asyncio.Lock()
        self._opened_mono = time.monotonic()
        self.reset_count = 0

    async def open(self) -> None:
        await asyncio.to_thread(self._open)
        log.warning(
            "INSECURE_software_identity",
            detail=f"keys are stored in {self.key_path.parent}, not in a TPM; quotes prove nothing",
            reason=self.reason or None,
        )

    def _open(self) -> None:
        self._sk = load_or_create_key(self.key_path, "key_file")
        self._ak = load_or_create_key(self.ak_path, "ak_key_file")
        self._sk_public = ts.marshal_ecc_public(self._sk.public_key(), SK_ATTRS)
        self._ak_public = ts.marshal_ecc_public(self._ak.public_key(), AK_ATTRS)
        self._sk_name = ts.parse_tpm2b_public(self._sk_public).name
        self._ak_name = ts.parse_tpm2b_public(self._ak_public).name
        self.reset_count = _read_int(self.boots_path) + 1
        write_private_file(self.boots_path, f"{self.reset_count}\n".encode())
        self._opened_mono = time.monotonic()

    async def close(self) -> None:
        return None

    @property
    def key_id(self) -> str:
        return spki_fingerprint(self._sk.public_key())

    @property
    def ak_name(self) -> str:
        return self._ak_name.hex()

    def public_key_pem(self) -> str:
        return pem(self._sk.public_key())

    def status(self) -> dict[str, Any]:
        out = super().status()
        if self.reason:
            out["fallback_reason"] = self.reason
        return out

    async def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        return self._sk.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    @property
    def counter_refusal(self) -> str | None:
        if not self.reason:
            return None
        return (
            f"the anti-rollback counter lives in the TPM, which was missing at start-up "
            f"({self.reason}); updates are refused until the TPM is back (restart the daemon)"
        )

    def _check_counter(self) -> None:
        if self.counter_refusal:
            raise DeviceError(self.counter_refusal)

    async def counter_read(self) -> int:
        self._check_counter()
        return await asyncio.to_thread(_read_int, self.counter_path)

    async def counter_increment(self) -> int:
        self._check_counter()
        async with self._lock:
            return await asyncio.to_thread(self._increment)

    def _increment(self) -> int:
        value = _read_int(self.counter_path) + 1
        write_private_file(self.counter_path, f"{value}\n".encode())
        return value

    async def _measure(self, digests: list[bytes]) -> None:
        value = bytes(32)
        for d in digests:
            value = ts.extend(value, d)
        self._pcrs[(ts.ALG_SHA256, self.cfg.pcr_binding)] = value

    def _attest(self, typ: int, nonce: bytes, **kw: Any) -> tuple[str, str]:
        att = ts.Attest(
            magic=ts.TPM_GENERATED_VALUE, type=typ, qualified_signer=self._ak_name,
            extra_data=nonce, clock=int((time.monotonic() - self._opened_mono) * 1000) + 1,
            reset_count=self.reset_count, restart_count=0, safe=1, firmware_version=0, **kw,
        )  # fmt: skip
        raw = ts.marshal_attest(att)
        r, s = decode_dss_signature(self._ak.sign(raw, ec.ECDSA(hashes.SHA256())))
        return base64.b64encode(raw).decode(), base64.b64encode(
            ts.marshal_ecdsa_signature(r, s)
        ).decode()

    async def _quote(self, nonce: bytes) -> dict[str, Any]:
        digest = ts.pcr_digest(self._sel, self._pcrs, ts.ALG_SHA256)
        attest, sig = self._attest(
            ts.ST_ATTEST_QUOTE, nonce, pcr_select=self._sel, pcr_digest=digest
        )
        c_att, c_sig = self._attest(
            ts.ST_ATTEST_CERTIFY, nonce, certified_name=self._sk_name,
            certified_qualified_name=self._sk_name,
        )  # fmt: skip
        return {
            "attest": attest,
            "signature": sig,
            "pcrs": {
                f"{ts.HASH_NAMES[b]}:{i}": v.hex() for (b, i), v in sorted(self._pcrs.items())
            },
            "certify_attest": c_att,
            "certify_signature": c_sig,
            "insecure": True,
        }

    def public_fields(self) -> dict[str, Any]:
        return {
            "ak_public": base64.b64encode(self._ak_public).decode(),
            "ak_name": self._ak_name.hex(),
            "ak_pem": pem(self._ak.public_key()),
            "ek_public": None,
            "ek_pem": None,
            "ek_certificate": None,
            "signing_key_public": base64.b64encode(self._sk_public).decode(),
            "signing_key_pem": pem(self._sk.public_key()),
        }
