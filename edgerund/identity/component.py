"""The `identity` component: builds the TPM or software identity and serves it.

Start-up (`__aenter__`, first component the daemon enters):
  1. `kind: tpm`: open the TPM through the TCTI on the identity's worker thread, enrol on
     the first start or re-attach and Name-check the enrolled keys. When the TPM cannot be
     reached at all (no device node, no permission, simulator down, tpm2-pytss missing;
     the transport is retried for TPM_OPEN_WAIT_S first, a resource manager or simulator
     may be restarting): `fallback: none` refuses start-up with a DeviceError naming the
     device, the `tss` group and the fix; `fallback: software` continues with the software
     identity, loudly.
     A TPM that answers but refuses (wrong hierarchy password, lockout, foreign keys at our
     handles) never falls back: degrading silently would hide an attack or a misconfig.
  2. Measure sha256(config file bytes) into the binding PCR (models add theirs through
     `bind_model` at every swap).
Shutdown sends an orderly TPM2_Shutdown and closes the context on its thread.

Socket commands: `identity` (public facts), `attest` (args {"nonce": hex}, rate-limited
per client uid: `rate_limited`; a full TPM queue answers `busy`) and the privileged
`attest-activate` (credential activation, identity/credential.py); status key `identity`.
`reload` (SIGHUP) re-binds the config digest into the NV binding and the binding PCR.
The component implements `ports.IdentityPort` (and so `Signer` and `Measurer`); the
composition root hands it to peers under the narrowest of those ports each one needs. Its
properties are valid once it has been entered (the root enters it first).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import msgspec
import structlog

from edgerund.component import Command, CommandError, Peer
from edgerund.errors import ConfigError, DeviceError
from edgerund.identity.base import Identity
from edgerund.identity.binding import parse_nonce
from edgerund.identity.credential import handle_activate
from edgerund.identity.ratelimit import PerKeyBuckets
from edgerund.identity.software import SoftwareIdentity
from edgerund.identity.tpm_errors import LAYER_MASK, TCTI_LAYER, TpmError
from edgerund.identity.worker import TpmBusy

if TYPE_CHECKING:
    from edgerund.config.schema import Config

# The `identity` section when no identity runs (the daemon always builds one; kept so every
# component module answers the same question the same way).
EMPTY_STATUS: dict[str, object] = {"identity": {"kind": "none", "key_id": None}}

log = structlog.get_logger("edgerund.identity")

# How long start-up keeps trying a TPM it cannot reach before refusing (or falling back).
TPM_OPEN_WAIT_S = 5.0
TPM_OPEN_RETRY_S = 0.5


def _tpm_absent(exc: BaseException) -> bool:
    """True when the TPM could not be reached at all (transport), not when it refused."""
    return isinstance(exc, TpmError) and (exc.rc & LAYER_MASK) == TCTI_LAYER


async def open_identity(cfg: Config, state_dir: Path) -> Identity:
    """Open the configured identity, applying `identity.fallback`."""
    ident_cfg = cfg.identity
    if ident_cfg.kind == "software":
        ident: Identity = SoftwareIdentity(ident_cfg, state_dir)
        await ident.open()
        return ident
    try:
        from edgerund.identity.tpm import TpmIdentity
    except ImportError as exc:  # pragma: no cover - packaging problem
        reason = f"tpm2-pytss is not installed ({exc}): pip install 'edgerund[tpm]'"
        if ident_cfg.fallback == "software":
            return await _fallback(cfg, state_dir, reason)
        raise ConfigError(reason, path="identity.kind") from None
    # A TPM that cannot be reached at all may be restarting (resource manager, simulator):
    # wait a little before refusing or degrading, since a refusal (exit 2) is not retried
    # by systemd and a fallback lasts until the next start.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TPM_OPEN_WAIT_S
    logged = False
    while True:
        tpm = TpmIdentity(ident_cfg, state_dir)
        try:
            await tpm.open()
            return tpm
        except DeviceError as exc:
            if not _tpm_absent(exc):
                raise
            await tpm.worker.close()  # a failed open can leave its thread: one per attempt
            if loop.time() >= deadline:
                if ident_cfg.fallback == "software":
                    return await _fallback(cfg, state_dir, str(exc))
                raise DeviceError(
                    "identity.kind is 'tpm' and identity.fallback is 'none', "
                    f"refusing to start: {exc}"
                ) from exc
            if not logged:
                logged = True
                log.warning("tpm_unreachable_waiting", tcti=ident_cfg.tcti, error=str(exc))
        await asyncio.sleep(TPM_OPEN_RETRY_S)


async def _fallback(cfg: Config, state_dir: Path, reason: str) -> Identity:
    log.error("tpm_absent_falling_back_to_INSECURE_software_identity", reason=reason)
    ident = SoftwareIdentity(cfg.identity, state_dir, reason=f"TPM unavailable: {reason}")
    await ident.open()
    return ident


def config_sha256(cfg: Config, config_path: Path) -> bytes:
    """sha256 of the config file bytes as deployed (else of the canonical JSON)."""
    try:
        return hashlib.sha256(Path(config_path).read_bytes()).digest()
    except OSError:
        return hashlib.sha256(msgspec.json.encode(cfg)).digest()


class IdentityComponent:
    name = "identity"

    def __init__(self, cfg: Config, *, config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path)
        self._ident: Identity | None = None
        ic = cfg.identity
        self._attest_buckets = PerKeyBuckets(ic.attest_rate_per_s, ic.attest_burst)

    @property
    def identity(self) -> Identity:
        if self._ident is None:
            raise RuntimeError("identity component is not started")
        return self._ident

    # -- lifecycle

    async def __aenter__(self) -> Self:
        self._ident = await open_identity(self.cfg, Path(self.cfg.paths.state_dir))
        try:
            await self._ident.bind_config(config_sha256(self.cfg, self.config_path))
        except BaseException:
            await self._ident.close()
            self._ident = None
            raise
        log.info(
            "identity_ready", kind=self._ident.kind, key_id=self._ident.key_id,
            ak_name=self._ident.ak_name, insecure=self._ident.insecure,
        )  # fmt: skip
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ident, self._ident = self._ident, None
        if ident is not None:
            await ident.close()

    # -- public API (team contract)

    @property
    def kind(self) -> str:
        return self.identity.kind

    @property
    def key_id(self) -> str:
        return self.identity.key_id

    @property
    def insecure(self) -> bool:
        return self.identity.insecure

    async def sign_digest(self, digest: bytes) -> bytes:
        return await self.identity.sign_digest(digest)

    def public_key_pem(self) -> str:
        return self.identity.public_key_pem()

    @property
    def counter_refusal(self) -> str | None:
        return self.identity.counter_refusal

    async def counter_read(self) -> int:
        return await self.identity.counter_read()

    async def counter_increment(self) -> int:
        return await self.identity.counter_increment()

    async def bind_model(
        self,
        manifest_sha256: bytes,
        name: str,
        *,
        overlay_sha256: bytes | None = None,
        overlay_version: str | None = None,
    ) -> None:
        await self.identity.bind_model(
            manifest_sha256, name, overlay_sha256=overlay_sha256, overlay_version=overlay_version
        )

    async def attest(self, nonce: bytes) -> dict[str, object]:
        return await self.identity.attest(nonce)

    # -- daemon integration

    async def reload(self, config: Config) -> None:
        """SIGHUP: the config file changed, so the binding must attest the new one."""
        self.cfg = config
        if self._ident is None:
            return
        digest = await asyncio.to_thread(config_sha256, config, self.config_path)  # file read
        if digest != self._ident.config_sha256:
            await self._ident.bind_config(digest)
            log.info("identity_config_rebound", config_sha256=digest.hex())

    def status(self) -> dict[str, Any]:
        if self._ident is None:
            return {
                "identity": {"kind": self.cfg.identity.kind, "key_id": None, "state": "stopped"}
            }
        return {"identity": self._ident.status()}

    def commands(self) -> Mapping[str, Command]:
        return {
            "identity": Command(self._cmd_identity, help="device identity: keys, AK Name, EK"),
            "attest": Command(
                self._cmd_attest, help="TPM quote for a verifier nonce: args {nonce: HEX}"
            ),
            "attest-activate": Command(
                lambda args, peer: handle_activate(self.identity, args),
                mutating=True,
                help="AK enrolment: TPM2_ActivateCredential, args {credential_blob, "
                "encrypted_secret} (edgerund attest enroll)",
            ),
        }

    async def _cmd_identity(self, args: dict[str, Any], peer: Peer) -> Any:
        ident = self.identity
        out = ident.status()
        static = ident.public_fields()
        out.update(
            {
                "signing_key_pem": ident.public_key_pem(),
                "ak_pem": static["ak_pem"],
                "ak_public": static["ak_public"],
                "ek_pem": static["ek_pem"],
                "ek_public": static.get("ek_public"),
                "ek_certificate": static.get("ek_certificate"),
            }
        )
        return out

    async def _cmd_attest(self, args: dict[str, Any], peer: Peer) -> Any:
        raw = args.get("nonce")
        if raw is None:
            raise CommandError(
                "bad_request",
                "attest needs args.nonce: a fresh random value from the verifier, hex, 1-64 "
                "bytes (edgerunctl attest --nonce $(openssl rand -hex 32))",
            )
        if not isinstance(raw, str):
            raise CommandError("bad_nonce", f"nonce must be a hex string, got {type(raw).__name__}")
        try:
            nonce = parse_nonce(raw)
        except ValueError as exc:
            raise CommandError("bad_nonce", str(exc)) from None
        wait_s = self._attest_buckets.take(peer.uid)
        if wait_s:
            raise CommandError(
                "rate_limited",
                f"too many attest requests from uid {peer.uid} (identity.attest_rate_per_s="
                f"{self._attest_buckets.rate:g}, attest_burst={self._attest_buckets.burst:g}); "
                f"retry in {wait_s:.1f} s",
            )
        try:
            return await self.identity.attest(nonce)
        except TpmBusy as exc:
            raise CommandError("busy", str(exc)) from None
        except DeviceError as exc:
            raise CommandError("tpm_error", str(exc)) from None


def build(cfg: Config, *, config_path: Path) -> IdentityComponent:
    """The identity component is always built (software when no TPM is configured)."""
    return IdentityComponent(cfg, config_path=config_path)
