"""The TPM 2.0 identity: enrolment, persistence checks, quote, certify, sign, NV counter.

Key hierarchy (docs/identity.md has the picture):

    endorsement: EK (TCG template: ECC P-256, or RSA 2048) -- re-derived, never stored
                  `- AK   restricted ECDSA P-256 signing key, created under the EK with a
                          PolicySecret(endorsement) session; persistent at ak_handle
    owner:       SRK (ECC P-256 storage primary, noDA) -- persistent at srk_handle
                  `- telemetry key: non-restricted ECDSA P-256, persistent at
                          signing_key_handle; certified by the AK at every attestation
    NV:          counter at nv_counter_index (TPM_NT_COUNTER) and binding index at
                 nv_binding_index (TPM_NT_EXTEND): written only through a policy that
                 needs the daemon's NV secret, Names pinned (nvindex.py)

Every password-less object has noDA (the EK template is fixed by the TCG and is only used
through policy sessions, which are not DA-checked): an unclean power cut after using a
DA-protected key adds one to the TPM's failedTries, and a few power cuts would lock an
unattended gateway out of its own keys (tpm2-tss #2400).

Enrolment runs on the first start, i.e. when the state file does not exist. The state
file records the Names and the key blobs (public + TPM-encrypted private parts: useless
outside this TPM) and is written BEFORE the keys are made persistent. Every later start
reads each persistent handle, and:
  - Name equals the enrolled Name -> use it;
  - handle empty -> restore it from the blob (re-derive the parent, load, EvictControl),
    which also finishes an enrolment interrupted by a crash;
  - Name differs -> refuse (another tool took the handle or the TPM was cleared).
`tr_from_tpmpublic` trusts whatever sits at a handle, so the Name check is essential.

The NV binding index is extended with a binding event (nvbinding.py) whenever the config, a
model or a model's calibration changes, and every attestation carries its TPM2_NV_Certify by the AK plus the event
log since start-up. The PCR binding is kept for compatibility, but a PCR resettable at
locality 0 proves nothing against a local attacker; the NV binding does.

When the worker abandons a hung context (worker.py) `_reattach` runs on the new context:
the persistent handles are looked up and Name-checked again.

Transient objects and sessions are flushed in `finally` blocks inside the worker jobs. On
a raw TCTI (no resource manager) objects leaked by a killed predecessor are flushed at
start-up: the daemon assumes it is the TPM's only user there (production uses tpmrm0).

One cohesive thing (the TPM identity: every ESAPI call runs on the one worker thread that
owns the context, so the calls live together), hence one module of ~900 lines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgerund.errors import ConfigError, DeviceError
from edgerund.identity import nvbinding, nvindex
from edgerund.identity import tpmstruct as ts
from edgerund.identity.base import Identity, pem, spki_fingerprint
from edgerund.identity.config import IdentityConfig
from edgerund.identity.tpm_errors import (
    RC_HANDLE,
    TpmError,
    base_error,
)
from edgerund.identity.worker import TpmWorker

if TYPE_CHECKING:
    from cryptography import x509

log = structlog.get_logger("edgerund.identity")

STATE_VERSION = 1
QUOTE_RETRIES = 5  # PCRs extended by others (IMA) can change between quote and read
NV_LOG_KEEP = 32  # binding events kept in the log (older ones fold into `initial`)


def _read_auth(path: str, what: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} password file {path!r}: {exc.strerror}",
            path=f"identity.{what}_auth_file",
        ) from None
    return data.rstrip(b"\r\n")


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600, durable (fsync file and dir)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class _Handles:
    srk: Any = None
    ak: Any = None
    sk: Any = None
    nv: Any = None
    nvb: Any = None


class TpmIdentity(Identity):
    kind = "tpm"

    def __init__(self, cfg: IdentityConfig, state_dir: Path) -> None:
        super().__init__(cfg.pcr_binding, cfg.pcr_selection)
        self.cfg = cfg
        sf = Path(cfg.state_file)
        self.state_path = sf if sf.is_absolute() else state_dir / sf
        self.worker = TpmWorker(
            cfg.tcti, cfg.call_timeout_ms, max_queued=cfg.max_queued_calls,
            on_reopen=self._reattach,
        )  # fmt: skip
        nf = Path(cfg.nv_auth_file)
        self.nv_secret_path = nf if nf.is_absolute() else state_dir / nf
        self._nv_secret = b""
        self._counter_spec = nvindex.NvSpec(cfg.nv_counter_index, "counter", "nv_counter_index")
        self._binding_spec = nvindex.NvSpec(cfg.nv_binding_index, "extend", "nv_binding_index")
        self._nv_found = bytes(32)  # binding index contents found at open
        self._nv_initial: bytes | None = None
        self._nv_events: list[dict[str, Any]] = []
        self.counter_migrated = False
        self._owner_auth = _read_auth(cfg.owner_auth_file, "owner")
        self._endorsement_auth = _read_auth(cfg.endorsement_auth_file, "endorsement")
        self._h = _Handles()
        self.state: dict[str, Any] = {}
        self.enrolled_now = False
        self._enrolling = False
        self.restored: list[str] = []
        self.flushed_stale = 0
        self.lockout: dict[str, int] = {}
        self._sk_key: ec.EllipticCurvePublicKey | None = None
        self._static: dict[str, Any] | None = None
        self._sel = ts.parse_pcr_selection_string(cfg.pcr_selection)

    # ------------------------------------------------------------ facts

    @property
    def key_id(self) -> str:
        assert self._sk_key is not None
        return spki_fingerprint(self._sk_key)

    @property
    def ak_name(self) -> str:
        return str(self.state["ak"]["name"])

    @property
    def ek_certificate_found(self) -> bool:
        return bool(self.state.get("ek", {}).get("certificate"))

    def public_key_pem(self) -> str:
        assert self._sk_key is not None
        return pem(self._sk_key)

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(
            {
                "tcti": self.cfg.tcti,
                "ek_type": self.state.get("ek", {}).get("template"),
                **self.worker.status(),
                "nv_binding_index": f"0x{self.cfg.nv_binding_index:08x}",
                "nv_binding_events": len(self._nv_events),
                "da_lockout_counter": self.lockout.get("counter"),
                "da_in_lockout": bool(self.lockout.get("in_lockout")),
            }
        )
        return out

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self._nv_secret = await asyncio.to_thread(
            nvindex.load_or_create_secret, self.nv_secret_path
        )
        await self.worker.open()
        try:
            await self.worker.call(self._prepare, what="inspect the TPM")
            if self.state_path.exists():
                self.state = self._load_state()
                await self.worker.call(
                    self._attach, what="load the enrolled keys",
                    timeout_ms=self.cfg.enrol_timeout_ms,
                )  # fmt: skip
            else:
                await self.worker.call(
                    self._enrol, what="enrol (create EK, AK, SRK, telemetry key, NV counter)",
                    timeout_ms=self.cfg.enrol_timeout_ms,
                )  # fmt: skip
                self.enrolled_now = True
            sk_pub = ts.parse_tpm2b_public(base64.b64decode(self.state["signing_key"]["public"]))
            assert isinstance(sk_pub.key, ec.EllipticCurvePublicKey)
            self._sk_key = sk_pub.key
            if self._nv_initial is None:
                self._nv_initial = self._nv_found
        except BaseException:
            await self.worker.close()
            raise
        if self.lockout.get("in_lockout"):
            log.warning(
                "tpm_in_da_lockout",
                detail="the TPM is in dictionary-attack lockout; edgerund's keys are noDA and "
                "keep working, other DA-protected keys do not",
                **self.lockout,
            )

    async def close(self) -> None:
        if self.cfg.shutdown_on_exit:
            with contextlib.suppress(DeviceError):
                await self.worker.call(self._shutdown, what="send TPM2_Shutdown")
        await self.worker.close()

    # ------------------------------------------------------------ worker jobs (TPM thread)

    def _prepare(self, ectx: Any) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_HC, TPM2_PT

        if self._owner_auth is not None:
            ectx.tr_set_auth(ESYS_TR.OWNER, self._owner_auth)
        if self._endorsement_auth is not None:
            ectx.tr_set_auth(ESYS_TR.ENDORSEMENT, self._endorsement_auth)
        name = self.cfg.tcti.partition(":")[0]
        raw_tcti = name in ("swtpm", "mssim") or self.cfg.tcti.startswith("device:/dev/tpm0")
        if raw_tcti:
            # no resource manager: leftovers of a killed predecessor hold the ~3 slots
            for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
                _, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
                for h in list(data.data.handles):
                    with contextlib.suppress(Exception):
                        ectx.flush_context(ectx.tr_from_tpmpublic(h))
                        self.flushed_stale += 1
            if self.flushed_stale:
                log.warning("tpm_flushed_stale_handles", count=self.flushed_stale)
        _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.PERMANENT, 1)
        perm = int(data.data.tpmProperties[0].value)
        _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 4)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
        self.lockout = {
            "counter": props.get(int(TPM2_PT.LOCKOUT_COUNTER), 0),
            "max_tries": props.get(int(TPM2_PT.MAX_AUTH_FAIL), 0),
            "in_lockout": 1 if perm & 0x200 else 0,  # TPMA_PERMANENT.inLockout
        }

    # -- templates

    def _ak_template(self) -> Any:
        from tpm2_pytss.constants import TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

        attrs = (
            TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
        )  # fmt: skip
        # ":null": a restricted signing key must have no symmetric algorithm
        return TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs))

    def _srk_template(self) -> Any:
        from tpm2_pytss.constants import TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

        attrs = TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS | TPMA_OBJECT.NODA
        return TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs))

    def _sk_template(self) -> Any:
        from tpm2_pytss.constants import TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

        attrs = (
            TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
        )  # fmt: skip
        return TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs))

    # -- primaries

    def _create_ek(self, ectx: Any, template_name: str) -> tuple[Any, Any, bytes | None]:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        cert, tmpl = create_ek_template(template_name, NVReadEK(ectx))
        try:
            ek, ek_pub, *_ = ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), tmpl, ESYS_TR.ENDORSEMENT
            )
        except Exception as exc:
            if hasattr(exc, "rc"):
                raise TpmError.from_tss(
                    exc,
                    f"create the endorsement key ({template_name})",
                    tcti=self.cfg.tcti,
                    hint="check identity.endorsement_auth_file",
                ) from exc
            raise
        return ek, ek_pub, (bytes(cert) if cert else None)

    def _choose_ek(self, ectx: Any) -> tuple[Any, Any, bytes | None, str]:
        """EK per identity.ek_type; auto prefers ECC P-256, but a certified EK over none."""
        order = {"ecc256": ["EK-ECC256"], "rsa2048": ["EK-RSA2048"],
                 "auto": ["EK-ECC256", "EK-RSA2048"]}[self.cfg.ek_type]  # fmt: skip
        fallback: tuple[Any, Any, bytes | None, str] | None = None
        last_exc: Exception | None = None
        for name in order:
            try:
                ek, pub, cert = self._create_ek(ectx, name)
            except TpmError as exc:
                if base_error(exc.rc) in (0x0A2, 0x08E):  # wrong password: no point retrying
                    raise
                last_exc = exc
                continue
            if cert is not None or len(order) == 1:
                if fallback is not None:
                    ectx.flush_context(fallback[0])
                return ek, pub, cert, name
            if fallback is None:
                fallback = (ek, pub, cert, name)
            else:
                ectx.flush_context(ek)
        if fallback is not None:
            return fallback
        assert last_exc is not None
        raise last_exc

    def _create_srk(self, ectx: Any) -> tuple[Any, Any]:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

        try:
            srk, srk_pub, *_ = ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), self._srk_template(), ESYS_TR.OWNER
            )
        except Exception as exc:
            if hasattr(exc, "rc"):
                raise TpmError.from_tss(
                    exc,
                    "create the storage root key in the owner hierarchy",
                    tcti=self.cfg.tcti,
                    hint="check identity.owner_auth_file",
                ) from exc
            raise
        return srk, srk_pub

    def _ek_session(self, ectx: Any) -> Any:
        """A policy session satisfying the EK's PolicySecret(TPM_RH_ENDORSEMENT)."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
        from tpm2_pytss.types import TPMT_SYM_DEF

        s = ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
        )  # fmt: skip
        try:
            ectx.policy_secret(ESYS_TR.ENDORSEMENT, s)
        except Exception as exc:
            ectx.flush_context(s)
            if hasattr(exc, "rc"):
                raise TpmError.from_tss(
                    exc,
                    "authorize the endorsement hierarchy (PolicySecret)",
                    tcti=self.cfg.tcti,
                    hint="check identity.endorsement_auth_file",
                ) from exc
            raise
        return s

    # -- persistence helpers

    def _read_persistent(self, ectx: Any, handle: int) -> Any | None:
        """The ESYS_TR for a persistent handle, or None when nothing is there."""
        from tpm2_pytss import TSS2_Exception

        try:
            return ectx.tr_from_tpmpublic(handle)
        except TSS2_Exception as exc:
            if base_error(int(exc.rc)) == RC_HANDLE:
                return None
            raise

    def _persist(self, ectx: Any, transient: Any, handle: int) -> Any:
        from tpm2_pytss.constants import ESYS_TR

        try:
            return ectx.evict_control(ESYS_TR.OWNER, transient, handle)
        except Exception as exc:
            if hasattr(exc, "rc"):
                raise TpmError.from_tss(
                    exc,
                    f"make a key persistent at 0x{handle:08x}",
                    tcti=self.cfg.tcti,
                    hint="check identity.owner_auth_file",
                ) from exc
            raise

    def _occupied_error(self, handle: int, key: str, found: bytes) -> DeviceError:
        return DeviceError(
            f"persistent handle 0x{handle:08x} (identity.{key}) holds another object "
            f"(Name {found.hex()}) than the one enrolled in {self.state_path}: another tool "
            "took the handle or the TPM was cleared. Choose a free handle for "
            f"identity.{key}, or evict it (tpm2_evictcontrol -C o -c 0x{handle:08x}); to "
            f"start a NEW identity, move {self.state_path} away (the fleet must re-register "
            "the new AK)"
        )

    def _load_blob(self, ectx: Any, parent: Any, blob: dict[str, str], session: Any) -> Any:
        from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

        priv, _ = TPM2B_PRIVATE.unmarshal(base64.b64decode(blob["private"]))
        pub, _ = TPM2B_PUBLIC.unmarshal(base64.b64decode(blob["public"]))
        return ectx.load(parent, priv, pub, session1=session)

    # -- enrolment

    def _enrol(self, ectx: Any) -> None:
        from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

        def in_use(handle: int, key: str, found: bytes) -> DeviceError:
            return DeviceError(
                f"cannot enrol: persistent handle 0x{handle:08x} (identity.{key}) is already "
                f"in use by another object (Name {found.hex()}) and {self.state_path} does "
                f"not exist. Choose a free handle for identity.{key} or evict it: "
                f"tpm2_evictcontrol -C o -c 0x{handle:08x}"
            )

        for key in ("ak_handle", "signing_key_handle"):
            handle = getattr(self.cfg, key)
            existing = self._read_persistent(ectx, handle)
            if existing is not None:
                found = bytes(ectx.tr_get_name(existing))
                ectx.tr_close(existing)
                raise in_use(handle, key, found)

        state: dict[str, Any] = {"version": STATE_VERSION, "tcti": self.cfg.tcti}
        # EK -> AK
        ek, ek_pub, cert, ek_name = self._choose_ek(ectx)
        try:
            state["ek"] = {
                "template": ek_name,
                "name": bytes(ectx.tr_get_name(ek)).hex(),
                "public": base64.b64encode(ek_pub.marshal()).decode(),
                "certificate": base64.b64encode(cert).decode() if cert else None,
            }
            s = self._ek_session(ectx)
            try:
                ak_priv, ak_pub, *_ = ectx.create(
                    ek, TPM2B_SENSITIVE_CREATE(), self._ak_template(), session1=s
                )
            finally:
                ectx.flush_context(s)
        finally:
            ectx.flush_context(ek)
        state["ak"] = {
            "handle": self.cfg.ak_handle,
            "name": ts.parse_tpm2b_public(ak_pub.marshal()).name.hex(),
            "public": base64.b64encode(ak_pub.marshal()).decode(),
            "private": base64.b64encode(ak_priv.marshal()).decode(),
        }
        # SRK -> telemetry key
        srk, _ = self._create_srk(ectx)
        try:
            srk_name = bytes(ectx.tr_get_name(srk))
            existing = self._read_persistent(ectx, self.cfg.srk_handle)
            if existing is not None:  # an SRK made from the same template is the same key
                found = bytes(ectx.tr_get_name(existing))
                ectx.tr_close(existing)
                if found != srk_name:
                    raise in_use(self.cfg.srk_handle, "srk_handle", found)
            state["srk"] = {"handle": self.cfg.srk_handle, "name": srk_name.hex()}
            sk_priv, sk_pub, *_ = ectx.create(srk, TPM2B_SENSITIVE_CREATE(), self._sk_template())
        finally:
            ectx.flush_context(srk)
        state["signing_key"] = {
            "handle": self.cfg.signing_key_handle,
            "name": ts.parse_tpm2b_public(sk_pub.marshal()).name.hex(),
            "public": base64.b64encode(sk_pub.marshal()).decode(),
            "private": base64.b64encode(sk_priv.marshal()).decode(),
        }
        state["nv_counter"] = {"index": self.cfg.nv_counter_index, "auth": "policy"}
        state["nv_binding"] = {"index": self.cfg.nv_binding_index}
        # written BEFORE the keys are made persistent: a crash from here on is repaired by
        # _attach (restore from blobs) instead of leaving orphans in the TPM
        self.state = state
        self._save_state()
        self._enrolling = True
        try:
            self._attach(ectx)
        finally:
            self._enrolling = False

    # -- later starts (and the second half of enrolment)

    def _attach(self, ectx: Any) -> None:
        if self.state.get("tcti") and self.state["tcti"] != self.cfg.tcti:
            log.info("tpm_tcti_changed", enrolled=self.state["tcti"], now=self.cfg.tcti)
        self._h.srk = self._ensure_srk(ectx)
        self._h.ak = self._ensure_key(ectx, "ak", "ak_handle")
        self._h.sk = self._ensure_key(ectx, "signing_key", "signing_key_handle")
        self._h.nv = self._ensure_counter(ectx)
        self._h.nvb = self._ensure_binding(ectx)

    def _reattach(self, ectx: Any) -> None:
        """On a context re-opened after a hang: hierarchy auth, then handles + Name checks."""
        from tpm2_pytss.constants import ESYS_TR

        if self._owner_auth is not None:
            ectx.tr_set_auth(ESYS_TR.OWNER, self._owner_auth)
        if self._endorsement_auth is not None:
            ectx.tr_set_auth(ESYS_TR.ENDORSEMENT, self._endorsement_auth)
        self._attach(ectx)

    def _ensure_srk(self, ectx: Any) -> Any:
        want = bytes.fromhex(self.state["srk"]["name"])
        handle = int(self.state["srk"]["handle"])
        h = self._read_persistent(ectx, handle)
        if h is not None:
            found = bytes(ectx.tr_get_name(h))
            if found != want:
                raise self._occupied_error(handle, "srk_handle", found)
            return h
        srk, _ = self._create_srk(ectx)  # primaries are re-derivable from the seed
        try:
            if bytes(ectx.tr_get_name(srk)) != want:
                raise DeviceError(
                    "the storage root key re-derived from the owner seed has a different Name "
                    "than enrolled: the TPM was cleared (TPM2_Clear) and the enrolled keys are "
                    f"gone. Move {self.state_path} away to enrol a NEW identity"
                )
            persistent = self._persist(ectx, srk, handle)
        finally:
            ectx.flush_context(srk)
        self._note_restored("srk", handle)
        return persistent

    def _ensure_key(self, ectx: Any, key: str, cfg_key: str) -> Any:
        entry = self.state[key]
        want = bytes.fromhex(entry["name"])
        handle = int(entry["handle"])
        h = self._read_persistent(ectx, handle)
        if h is not None:
            found = bytes(ectx.tr_get_name(h))
            if found != want:
                raise self._occupied_error(handle, cfg_key, found)
            return h
        # restore from the blob under a re-derived parent
        if key == "ak":
            parent, _, _ = self._create_ek(ectx, self.state["ek"]["template"])
            if bytes(ectx.tr_get_name(parent)).hex() != self.state["ek"]["name"]:
                ectx.flush_context(parent)
                raise DeviceError(
                    "the endorsement key re-derived now differs from the enrolled one: this is "
                    f"not the TPM that was enrolled in {self.state_path}"
                )
        else:
            parent = None
        try:
            if key == "ak":
                s = self._ek_session(ectx)
                try:
                    obj = self._load_blob(ectx, parent, entry, s)
                finally:
                    ectx.flush_context(s)
            else:
                from tpm2_pytss.constants import ESYS_TR

                obj = self._load_blob(ectx, self._h.srk, entry, ESYS_TR.PASSWORD)
        finally:
            if parent is not None:
                ectx.flush_context(parent)
        try:
            if bytes(ectx.tr_get_name(obj)) != want:
                raise DeviceError(f"the {key} blob in {self.state_path} does not match its Name")
            persistent = self._persist(ectx, obj, handle)
        finally:
            ectx.flush_context(obj)
        self._note_restored(key, handle)
        return persistent

    def _note_restored(self, key: str, handle: int) -> None:
        if self._enrolling:  # the second half of enrolment, not a repair
            return
        self.restored.append(key)
        log.warning("tpm_key_restored", key=key, handle=f"0x{handle:08x}")

    # -- NV indices (policy-written, Name-pinned: nvindex.py)

    def _ensure_counter(self, ectx: Any) -> Any:
        spec = self._counter_spec
        entry = self.state["nv_counter"]
        h = nvindex.lookup(ectx, spec.index)
        if entry.get("auth") != "policy":  # enrolled before the counter had a write policy
            return self._migrate_counter(ectx, h)
        return self._ensure_nv(ectx, spec, entry, h, b"")

    def _ensure_binding(self, ectx: Any) -> Any:
        spec = self._binding_spec
        entry = self.state.setdefault("nv_binding", {"index": spec.index})
        h = nvindex.lookup(ectx, spec.index)
        h = self._ensure_nv(ectx, spec, entry, h, nvbinding.GENESIS)
        self._nv_found = nvindex.read(ectx, h, spec)
        return h

    def _ensure_nv(
        self, ectx: Any, spec: nvindex.NvSpec, entry: dict[str, Any], h: Any, first: bytes
    ) -> Any:
        pinned = entry.get("name")
        if h is None:
            if pinned:
                raise DeviceError(
                    f"{spec.where()} was undefined since enrolment (pinned Name {pinned}). "
                    "Refusing to define a fresh one silently; restore the TPM state or "
                    f"re-enrol (move {self.state_path} away)"
                )
            try:
                h, name = nvindex.define(ectx, spec, self._nv_secret, first)
            except Exception as exc:
                if hasattr(exc, "rc"):
                    raise TpmError.from_tss(
                        exc,
                        f"define {spec.where()}",
                        tcti=self.cfg.tcti,
                        hint="check identity.owner_auth_file, or choose a free index",
                    ) from exc
                raise
            entry["name"] = name
            self._save_state()
            return h
        # a crash between definition and saving the Name leaves no pin: the template
        # check plus the authorized read (our secret) still prove the index is ours
        nvindex.check(ectx, h, spec, self._nv_secret, pinned or "")
        if not pinned:
            entry["name"] = bytes(ectx.tr_get_name(h)).hex()
            self._save_state()
        return h

    def _migrate_counter(self, ectx: Any, h: Any) -> Any:
        """Replace the pre-policy (empty auth) counter by a policy-written one.

        An NV counter is defined at the highest value any counter in this TPM ever had, so
        undefine + define never goes back below the old value (checked).
        """
        from tpm2_pytss.constants import ESYS_TR

        spec = self._counter_spec
        old = 0
        if h is not None:
            if not nvindex.legacy_counter(ectx, h):
                raise DeviceError(
                    f"{spec.where()} is not the counter edgerund enrolled (attributes or "
                    "policy changed); refusing it"
                )
            old = int.from_bytes(bytes(ectx.nv_read(h, 8, 0, auth_handle=h)), "big")
            ectx.nv_undefine_space(h, ESYS_TR.OWNER)
        h, name = nvindex.define(ectx, spec, self._nv_secret, b"")
        new = int.from_bytes(nvindex.read(ectx, h, spec), "big")
        if new < old:  # pragma: no cover - the TPM guarantees it
            raise DeviceError(f"{spec.where()}: migrated counter went back ({old} -> {new})")
        self.state["nv_counter"] = {"index": spec.index, "auth": "policy", "name": name}
        self._save_state()
        self.counter_migrated = True
        log.warning("tpm_nv_counter_migrated", index=f"0x{spec.index:08x}", old=old, new=new)
        return h

    # -- state file

    def _save_state(self) -> None:
        write_private_file(
            self.state_path, (json.dumps(self.state, indent=2, sort_keys=True) + "\n").encode()
        )

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise DeviceError(
                f"cannot read the TPM enrolment state {self.state_path}: {exc}. Restore it "
                "from backup, or move it away to enrol a NEW identity"
            ) from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DeviceError(
                f"{self.state_path}: unsupported enrolment state (want version {STATE_VERSION})"
            )
        for key in ("ek", "ak", "srk", "signing_key", "nv_counter"):
            if key not in state:
                raise DeviceError(f"{self.state_path}: enrolment state lacks {key!r}")
        return state

    # -- operations (TPM thread)

    def _sign(self, ectx: Any, digest: bytes) -> bytes:
        from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
        from tpm2_pytss.types import TPM2B_DIGEST, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        sig = ectx.sign(self._h.sk, TPM2B_DIGEST(digest), scheme, ticket)
        parsed = ts.parse_signature(sig.marshal())
        return encode_dss_signature(parsed.r, parsed.s)

    def _pcr_values(self, ectx: Any) -> dict[tuple[int, int], bytes]:
        from tpm2_pytss.types import TPML_PCR_SELECTION

        values: dict[tuple[int, int], bytes] = {}
        for bank, indices in self._sel:
            want = list(indices)
            while want:  # TPM2_PCR_Read returns at most 8 digests per call
                text = f"{ts.HASH_NAMES[bank]}:{','.join(map(str, want))}"
                _, out, digests = ectx.pcr_read(TPML_PCR_SELECTION.parse(text))
                got: list[int] = []
                for s in out.pcrSelections:
                    if int(s.hash) != bank:
                        continue
                    bm = bytes(s.pcrSelect)[: int(s.sizeofSelect)]
                    got += [i for i in want if i // 8 < len(bm) and bm[i // 8] >> (i % 8) & 1]
                if not got:
                    raise DeviceError(f"the TPM does not implement PCRs {text}")
                for i, d in zip(sorted(got), digests, strict=False):
                    values[(bank, i)] = bytes(d)
                want = [i for i in want if i not in got]
        return values

    def _quote_job(self, ectx: Any, nonce: bytes) -> dict[str, Any]:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPM2B_DATA, TPML_PCR_SELECTION, TPMT_SIG_SCHEME

        sel = TPML_PCR_SELECTION.parse(self.cfg.pcr_selection)
        null_scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        for attempt in range(QUOTE_RETRIES):
            quoted, sig = ectx.quote(self._h.ak, sel, TPM2B_DATA(nonce), null_scheme)
            attest = bytes(quoted.marshal())[2:]  # TPM2B_ATTEST -> raw TPMS_ATTEST
            values = self._pcr_values(ectx)
            parsed = ts.parse_attest(attest)
            if ts.pcr_digest(self._sel, values, ts.ALG_SHA256) == parsed.pcr_digest:
                break
            log.info("tpm_quote_pcr_race", attempt=attempt + 1)
        else:
            raise DeviceError(
                f"PCRs kept changing between TPM2_Quote and TPM2_PCR_Read "
                f"({QUOTE_RETRIES} attempts); retry the attestation"
            )
        c_att, c_sig = ectx.certify(
            self._h.sk, self._h.ak, TPM2B_DATA(nonce), null_scheme,
            session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD,
        )  # fmt: skip
        nv_att, nv_sig = nvindex.certify(ectx, self._h.ak, self._h.nvb, self._binding_spec, nonce)
        return {
            "nv_binding": {
                "index": f"0x{self._binding_spec.index:08x}",
                "name": self.state["nv_binding"]["name"],
                "attest": base64.b64encode(nv_att).decode(),
                "signature": base64.b64encode(nv_sig).decode(),
                "log": self.nv_binding_log(),
            },
            "attest": base64.b64encode(attest).decode(),
            "signature": base64.b64encode(sig.marshal()).decode(),
            "pcrs": {f"{ts.HASH_NAMES[b]}:{i}": v.hex() for (b, i), v in sorted(values.items())},
            "certify_attest": base64.b64encode(bytes(c_att.marshal())[2:]).decode(),
            "certify_signature": base64.b64encode(c_sig.marshal()).decode(),
        }

    def _measure_job(self, ectx: Any, digests: list[bytes]) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA

        pcr = ESYS_TR.PCR0 + self.cfg.pcr_binding
        ectx.pcr_reset(pcr)
        for d in digests:
            ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
            ha.digest.sha256 = d
            ectx.pcr_extend(pcr, TPML_DIGEST_VALUES([ha]))

    def _counter_read_job(self, ectx: Any) -> int:
        # NV_UNINITIALIZED is an error (nvindex.read): our counter is written at definition
        return int.from_bytes(nvindex.read(ectx, self._h.nv, self._counter_spec), "big")

    def _counter_increment_job(self, ectx: Any) -> int:
        nvindex.write(ectx, self._h.nv, self._counter_spec)
        return self._counter_read_job(ectx)

    def _shutdown(self, ectx: Any) -> None:
        from tpm2_pytss.constants import TPM2_SU

        # orderly: the next power cut does not count as unorderly (DA failedTries) and the
        # TPM clock's `safe` flag stays set
        ectx.shutdown(TPM2_SU.CLEAR)

    # ------------------------------------------------------------ async API

    async def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")
        return await self.worker.call(lambda e: self._sign(e, digest), what="sign a digest")

    async def counter_read(self) -> int:
        return await self.worker.call(self._counter_read_job, what="read the NV counter")

    async def counter_increment(self) -> int:
        return await self.worker.call(self._counter_increment_job, what="increment the NV counter")

    async def _measure(self, digests: list[bytes]) -> None:
        # called by Identity._remeasure under the bind lock, config/models already updated
        models = self.model_bindings()
        record = {
            "config_sha256": self.config_sha256.hex(),
            "models": [m.as_log() for m in models],
        }
        event = nvbinding.binding_event(self.config_sha256, models)
        log_value = self._log_value()

        def job(e: Any) -> bytes:
            self._measure_job(e, digests)
            before = nvindex.read(e, self._h.nvb, self._binding_spec)
            nvindex.write(e, self._h.nvb, self._binding_spec, event)
            return before

        try:
            before = await self.worker.call(
                job, what=f"measure config/models into PCR {self.cfg.pcr_binding} and NV binding"
            )
        except BaseException:
            # the extend may still land (a hung call completes later): the next attest
            # re-measures, and the read above re-synchronises the log
            self._measured = False
            raise
        if before != log_value:
            log.warning("tpm_nv_binding_log_resync", found=before.hex(), log=log_value.hex())
            self._nv_initial, self._nv_events = before, []
        self._nv_events.append(record)
        if len(self._nv_events) > NV_LOG_KEEP:  # fold the oldest events into `initial`
            drop = self._nv_events[:-NV_LOG_KEEP]
            initial, digests_dropped, _ = nvbinding.log_events(
                {"initial": (self._nv_initial or bytes(32)).hex(), "events": drop}
            )
            self._nv_initial = nvbinding.replay(initial, digests_dropped)
            self._nv_events = self._nv_events[-NV_LOG_KEEP:]

    def _log_value(self) -> bytes:
        """What the NV binding index holds if our log is complete."""
        initial, digests, _ = nvbinding.log_events(self.nv_binding_log())
        return nvbinding.replay(initial, digests)

    def nv_binding_log(self) -> dict[str, Any]:
        return {
            "initial": (self._nv_initial or bytes(32)).hex(),
            "events": [dict(e) for e in self._nv_events],
        }

    async def _quote(self, nonce: bytes) -> dict[str, Any]:
        return await self.worker.call(lambda e: self._quote_job(e, nonce), what="quote PCRs")

    # ------------------------------------------------------------ credential activation

    async def activate_credential(self, blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential(AK, EK): the device half of AK enrolment (credential.py)."""
        return await self.worker.call(
            lambda e: self._activate_job(e, blob, encrypted_secret),
            what="activate a credential with the AK and EK (enrolment)",
        )

    def _activate_job(self, ectx: Any, blob: bytes, encrypted_secret: bytes) -> bytes:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT

        cred, _ = TPM2B_ID_OBJECT.unmarshal(blob)
        enc, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        ek, _, _ = self._create_ek(ectx, self.state["ek"]["template"])
        try:
            if bytes(ectx.tr_get_name(ek)).hex() != self.state["ek"]["name"]:
                raise DeviceError("the EK re-derived now differs from the enrolled one")
            s = self._ek_session(ectx)
            try:  # AK: empty password; EK: PolicySecret(endorsement)
                out = ectx.activate_credential(
                    self._h.ak, ek, cred, enc, session1=ESYS_TR.PASSWORD, session2=s
                )
            finally:
                ectx.flush_context(s)
        finally:
            ectx.flush_context(ek)
        return bytes(out)

    def public_fields(self) -> dict[str, Any]:
        if self._static is None:
            self._static = self._make_public_fields()
        return dict(self._static)

    def _make_public_fields(self) -> dict[str, Any]:
        ak_pub = base64.b64decode(self.state["ak"]["public"])
        ek_pub = base64.b64decode(self.state["ek"]["public"])
        sk_pub = base64.b64decode(self.state["signing_key"]["public"])
        return {
            "ak_public": self.state["ak"]["public"],
            "ak_name": self.state["ak"]["name"],
            "ak_pem": pem(ts.parse_tpm2b_public(ak_pub).key),
            "ek_public": self.state["ek"]["public"],
            "ek_pem": pem(ts.parse_tpm2b_public(ek_pub).key),
            "ek_certificate": self.state["ek"].get("certificate"),
            "signing_key_public": self.state["signing_key"]["public"],
            "signing_key_pem": pem(ts.parse_tpm2b_public(sk_pub).key),
        }

    def ek_certificate(self) -> x509.Certificate | None:
        # x509 (with email.utils and its dependencies) only when a certificate is read:
        # not at every start-up, software identity included (README "Start-up")
        from cryptography import x509

        raw = self.state.get("ek", {}).get("certificate")
        return x509.load_der_x509_certificate(base64.b64decode(raw)) if raw else None
