"""What every identity (TPM or software) offers, and the parts they share.

The public API other components use (docs/identity.md, team contract):

    identity.kind -> "tpm" | "software";  identity.key_id -> hex sha256 of the telemetry
    key's SubjectPublicKeyInfo;  await identity.sign_digest(digest) -> DER ECDSA P-256;
    identity.public_key_pem();  await identity.counter_read() / counter_increment();
    await identity.bind_model(manifest_sha256, name=..., overlay_sha256=..., overlay_version=...)
    await identity.attest(nonce)

The binding PCR (default 23) always holds
    extend(extend(...extend(0, sha256(config file)), sha256(manifest A)), sha256(manifest B))
with the active models' manifests in order of model name; a model running a device
calibration (`X+cal.N`) adds sha256(its calibration.json) right after its manifest
(binding.ModelBinding). At start-up and at every swap the PCR is reset and re-measured in
ONE TPM job (so no quote sees a half-measured PCR); a swap binds the model's calibration
afresh, so a rollback from `X+cal.N` to `X` measures the manifest alone again. The
attestation result carries that log (`binding`) so a verifier can replay it, or compute the
value it expects from the manifest and config it deployed (verify.binding_value).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import time
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgerund.identity.binding import ModelBinding, model_digests, parse_nonce

Kind = Literal["tpm", "software"]


def spki_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def pem(key: Any) -> str:
    return str(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    )


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def check_nonce(nonce: bytes) -> bytes:
    if not isinstance(nonce, (bytes, bytearray)):
        raise ValueError("nonce must be bytes")
    return parse_nonce(bytes(nonce).hex() if nonce else "")


class Identity(abc.ABC):
    kind: Kind
    insecure: bool = False

    def __init__(self, pcr_binding: int, pcr_selection: str) -> None:
        self.pcr_binding = pcr_binding
        self.pcr_selection = pcr_selection
        self.config_sha256 = bytes(32)
        self.models: dict[str, bytes] = {}  # name -> manifest sha256
        self.overlays: dict[str, tuple[bytes, str]] = {}  # name -> (overlay sha256, X+cal.N)
        self.last_quote_time: float | None = None
        self.quotes = 0
        self._bind_lock = asyncio.Lock()
        self._measured = False  # the binding PCR holds what binding_log() says

    # -- identity facts (valid after open())

    @property
    @abc.abstractmethod
    def key_id(self) -> str: ...

    @property
    @abc.abstractmethod
    def ak_name(self) -> str: ...

    @property
    def ek_certificate_found(self) -> bool:
        return False

    @property
    def counter_refusal(self) -> str | None:
        """Why the anti-rollback counter must not be used (updates are then refused)."""
        return None

    @abc.abstractmethod
    def public_key_pem(self) -> str: ...

    # -- lifecycle

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- operations

    @abc.abstractmethod
    async def sign_digest(self, digest: bytes) -> bytes: ...

    @abc.abstractmethod
    async def counter_read(self) -> int: ...

    @abc.abstractmethod
    async def counter_increment(self) -> int: ...

    @abc.abstractmethod
    async def _measure(self, digests: list[bytes]) -> None:
        """Reset the binding PCR and extend it with `digests`, atomically w.r.t. quotes."""

    @abc.abstractmethod
    async def _quote(self, nonce: bytes) -> dict[str, Any]:
        """attest, signature, pcrs, certify_attest, certify_signature (+ kind specifics)."""

    @abc.abstractmethod
    def public_fields(self) -> dict[str, Any]:
        """ak_public, ak_pem, ek_public, ek_certificate, signing_key_public/pem."""

    # -- shared

    def model_bindings(self) -> list[ModelBinding]:
        """The bound models in order of name, each with its calibration if it runs one."""
        out = []
        for n, d in sorted(self.models.items()):
            ov = self.overlays.get(n)
            out.append(ModelBinding(n, d, *(ov if ov is not None else (None, None))))
        return out

    def binding_log(self) -> dict[str, Any]:
        return {
            "pcr": self.pcr_binding,
            "config_sha256": self.config_sha256.hex(),
            "models": [m.as_log() for m in self.model_bindings()],
        }

    async def _remeasure(self) -> None:
        digests = [self.config_sha256, *model_digests(self.model_bindings())]
        await self._measure(digests)
        self._measured = True

    async def bind_config(self, config_sha256: bytes) -> None:
        """Start-up: measure the config (and the models bound so far) into the binding PCR."""
        if len(config_sha256) != 32:
            raise ValueError("config digest must be 32 bytes (sha256)")
        async with self._bind_lock:
            self.config_sha256 = bytes(config_sha256)
            await self._remeasure()

    async def bind_model(
        self,
        manifest_sha256: bytes,
        name: str = "",
        *,
        overlay_sha256: bytes | None = None,
        overlay_version: str | None = None,
    ) -> None:
        """A model swap: re-measure the binding PCR with this model's manifest digest and,
        when the model runs a device calibration, its overlay digest (None: the model runs
        uncalibrated, e.g. after a rollback from `X+cal.N` to `X`)."""
        if len(manifest_sha256) != 32:
            raise ValueError("manifest digest must be 32 bytes (sha256 of manifest.json)")
        if overlay_sha256 is not None and len(overlay_sha256) != 32:
            raise ValueError("overlay digest must be 32 bytes (sha256 of calibration.json)")
        async with self._bind_lock:
            self.models[name] = bytes(manifest_sha256)
            if overlay_sha256 is None:
                self.overlays.pop(name, None)
            else:
                self.overlays[name] = (bytes(overlay_sha256), overlay_version or "")
            await self._remeasure()

    async def attest(self, nonce: bytes) -> dict[str, Any]:
        """The attestation result (docs/identity.md, "Attestation result") for a nonce."""
        nonce = check_nonce(nonce)
        async with self._bind_lock:  # the binding log must match the quoted PCR
            if not self._measured:  # quoted before bind_config: measure "no config"
                await self._remeasure()
            raw = await self._quote(nonce)
            binding = self.binding_log()
        self.last_quote_time = time.time()
        self.quotes += 1
        result: dict[str, Any] = {
            "version": 1,
            "kind": self.kind,
            "nonce": nonce.hex(),
            "pcr_selection": self.pcr_selection,
        }
        result.update(raw)
        result.update(self.public_fields())
        result["binding"] = binding
        result["time"] = self.last_quote_time
        return result

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "key_id": self.key_id,
            "ak_name": self.ak_name,
            "ek_certificate_found": self.ek_certificate_found,
            "last_quote_time": self.last_quote_time,
            "quotes": self.quotes,
            "insecure": self.insecure,
            "binding_pcr": self.pcr_binding,
        }
        if self.counter_refusal:
            out["counter_refused"] = self.counter_refusal
        if self.insecure:
            out["warning"] = (
                "INSECURE software identity: keys are in files, not in a TPM; quotes prove "
                "nothing about the software running"
            )
        return out
