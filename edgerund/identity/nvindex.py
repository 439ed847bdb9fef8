"""The daemon's NV indices: who may write them, and how we know they are still ours.

Two indices (docs/identity.md "NV indices"):
  - the anti-rollback counter, TPM_NT_COUNTER at identity.nv_counter_index;
  - the binding index, TPM_NT_EXTEND (sha256) at identity.nv_binding_index.

Authorization. Each index is defined with a random 32-byte authValue (the *NV secret*, kept
in `identity.nv_auth_file`, mode 0600 in the daemon's 0700 state directory, so members of
the `tss` group who can talk to the TPM cannot read it) and:
  - TPMA_NV_POLICYWRITE only (no AUTHWRITE, OWNERWRITE, PPWRITE): a write needs a policy
    session satisfying  PolicyCommandCode(NV_Increment | NV_Extend) AND PolicyAuthValue.
    PolicyAuthValue makes the session HMAC depend on the authValue, so only a holder of the
    secret can write, and the command code pins the one operation allowed;
  - TPMA_NV_AUTHREAD: reads (and TPM2_NV_Certify) are authorized by an HMAC session keyed
    with the same secret. That read is also the proof that the index at the handle is OURS:
    somebody who redefines it with the same public area (hence the same Name) cannot give
    it our authValue, and the TPM answers TPM_RC_AUTH_FAIL (NO_DA: no lockout).
All of this is plain TPM 2.0 supported by tpm2-pytss and swtpm; no external key is needed.

Pinning. At definition the index is written once (counter: first increment; binding: a
genesis extend) so TPMA_NV_WRITTEN is set, and its Name (a hash of the public area:
attributes incl. WRITTEN, policy, size) is stored in the enrolment state. At every start
the public area is compared field by field with the template (reason on mismatch), then
the Name with the stored one (an undefine + redefine clears WRITTEN, so even an identical
template is caught), then an authorized read proves the authValue. Any mismatch refuses.

Owner authorization can still UNDEFINE an index (the TPM allows it for owner indices); the
defences above turn that into a refusal, never into a silent reset (a counter read of
TPM_RC_NV_UNINITIALIZED is an error, not 0).

Every function here runs on the TPM worker thread (ectx = its ESAPI context).
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerund.errors import DeviceError
from edgerund.identity.tpm_errors import (
    RC_AUTH_FAIL,
    RC_BAD_AUTH,
    RC_HANDLE,
    RC_NV_UNINITIALIZED,
    base_error,
)

SECRET_BYTES = 32
TPMA_NV_WRITTEN = 0x20000000


@dataclass(frozen=True)
class NvSpec:
    """What one of our indices must look like."""

    index: int
    kind: str  # "counter" | "extend"
    config_key: str  # identity.<config_key>, for messages

    @property
    def size(self) -> int:
        return 8 if self.kind == "counter" else 32

    def command_code(self) -> Any:
        from tpm2_pytss.constants import TPM2_CC

        return TPM2_CC.NV_Increment if self.kind == "counter" else TPM2_CC.NV_Extend

    def attributes(self) -> int:
        from tpm2_pytss.constants import TPM2_NT, TPMA_NV

        nt = TPM2_NT.COUNTER if self.kind == "counter" else TPM2_NT.EXTEND
        return int(
            TPMA_NV.POLICYWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
            | (nt << TPMA_NV.TPM2_NT_SHIFT)
        )  # fmt: skip

    def where(self) -> str:
        return f"NV index 0x{self.index:08x} (identity.{self.config_key})"


# ------------------------------------------------------------------ the secret (loop side)


def load_or_create_secret(path: Path) -> bytes:
    """The NV secret: created once with O_EXCL, mode 0600; refused if others can read it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = secrets.token_bytes(SECRET_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return data
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DeviceError(
            f"{path} (identity.nv_auth_file) is accessible by group/others (mode {mode:04o}): "
            f"whoever read it can write the anti-rollback counter. chmod 600 {path}"
        )
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise DeviceError(
            f"{path} (identity.nv_auth_file) holds {len(data)} bytes, expected {SECRET_BYTES}"
        )
    return data


# ------------------------------------------------------------------ sessions


def _start(ectx: Any, kind: Any) -> Any:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPMT_SYM_DEF

    return ectx.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, kind, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
    )


def write_policy(ectx: Any, spec: NvSpec) -> bytes:
    """The authPolicy digest: PolicyCommandCode(cc) AND PolicyAuthValue (trial session)."""
    from tpm2_pytss.constants import TPM2_SE

    s = _start(ectx, TPM2_SE.TRIAL)
    try:
        ectx.policy_command_code(s, spec.command_code())
        ectx.policy_auth_value(s)
        return bytes(ectx.policy_get_digest(s))
    finally:
        ectx.flush_context(s)


def policy_session(ectx: Any, spec: NvSpec) -> Any:
    """A policy session satisfying the write policy (the caller flushes it)."""
    from tpm2_pytss.constants import TPM2_SE

    s = _start(ectx, TPM2_SE.POLICY)
    try:
        ectx.policy_command_code(s, spec.command_code())
        ectx.policy_auth_value(s)
    except BaseException:
        ectx.flush_context(s)
        raise
    return s


def hmac_session(ectx: Any) -> Any:
    from tpm2_pytss.constants import TPM2_SE

    return _start(ectx, TPM2_SE.HMAC)


def public_template(ectx: Any, spec: NvSpec) -> Any:
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    return TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
        nvIndex=spec.index, nameAlg=TPM2_ALG.SHA256, attributes=spec.attributes(),
        authPolicy=write_policy(ectx, spec), dataSize=spec.size,
    ))  # fmt: skip


# ------------------------------------------------------------------ operations


def read(ectx: Any, h: Any, spec: NvSpec) -> bytes:
    """Authorized read (HMAC session keyed with the secret set by tr_set_auth)."""
    from tpm2_pytss import TSS2_Exception

    s = hmac_session(ectx)
    try:
        return bytes(ectx.nv_read(h, spec.size, 0, auth_handle=h, session1=s))
    except TSS2_Exception as exc:
        err = base_error(int(exc.rc))
        if err == RC_NV_UNINITIALIZED:
            raise DeviceError(
                f"{spec.where()} reads TPM_RC_NV_UNINITIALIZED: it was never written, so it is "
                "not the index edgerund defined (that one is written at definition); it was "
                "undefined and redefined. Refusing to treat it as 0"
            ) from None
        if err in (RC_AUTH_FAIL, RC_BAD_AUTH):
            raise DeviceError(
                f"{spec.where()} does not accept edgerund's NV secret (identity.nv_auth_file): "
                "the index was replaced by somebody else's (same public area, other authValue)"
            ) from None
        raise
    finally:
        ectx.flush_context(s)


def write(ectx: Any, h: Any, spec: NvSpec, data: bytes = b"") -> None:
    """NV_Increment (counter) or NV_Extend(data) through the write policy."""
    s = policy_session(ectx, spec)
    try:
        if spec.kind == "counter":
            ectx.nv_increment(h, auth_handle=h, session1=s)
        else:
            ectx.nv_extend(h, data, auth_handle=h, session1=s)
    finally:
        ectx.flush_context(s)


def certify(ectx: Any, ak: Any, h: Any, spec: NvSpec, nonce: bytes) -> tuple[bytes, bytes]:
    """TPM2_NV_Certify of the whole index by the AK: (raw TPMS_ATTEST, TPMT_SIGNATURE)."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPM2B_DATA, TPMT_SIG_SCHEME

    s = hmac_session(ectx)
    try:
        att, sig = ectx.nv_certify(
            ak, h, TPM2B_DATA(nonce), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), spec.size, 0,
            auth_handle=h, session1=ESYS_TR.PASSWORD, session2=s,
        )  # fmt: skip
    finally:
        ectx.flush_context(s)
    return bytes(att.marshal())[2:], bytes(sig.marshal())


def lookup(ectx: Any, index: int) -> Any | None:
    from tpm2_pytss import TSS2_Exception

    try:
        return ectx.tr_from_tpmpublic(index)
    except TSS2_Exception as exc:
        if base_error(int(exc.rc)) == RC_HANDLE:
            return None
        raise


def define(ectx: Any, spec: NvSpec, secret: bytes, initial_extend: bytes) -> tuple[Any, str]:
    """Define the index with owner authorization, write it once, return (handle, Name hex)."""
    from tpm2_pytss.constants import ESYS_TR

    h = ectx.nv_define_space(secret, public_template(ectx, spec), auth_handle=ESYS_TR.OWNER)
    ectx.tr_set_auth(h, secret)
    # written now so that WRITTEN is part of the pinned Name: a redefined index reads
    # NV_UNINITIALIZED / has another Name until somebody writes it, which needs the secret
    write(ectx, h, spec, initial_extend)
    return h, bytes(ectx.tr_get_name(h)).hex()


def check(ectx: Any, h: Any, spec: NvSpec, secret: bytes, pinned_name: str) -> bytes:
    """Refuse unless the index at `h` is the one we defined; returns its current contents."""
    pub, name = ectx.nv_read_public(h)
    p = pub.nvPublic
    want = public_template(ectx, spec).nvPublic
    found_attrs = int(p.attributes)
    problems = []
    if found_attrs & ~TPMA_NV_WRITTEN != int(want.attributes):
        problems.append(
            f"attributes 0x{found_attrs & ~TPMA_NV_WRITTEN:08x}, expected "
            f"0x{int(want.attributes):08x}"
        )
    if bytes(p.authPolicy) != bytes(want.authPolicy):
        problems.append("another write policy")
    if int(p.dataSize) != spec.size or int(p.nameAlg) != int(want.nameAlg):
        problems.append(f"size {int(p.dataSize)}, expected {spec.size}")
    if problems:
        raise DeviceError(
            f"{spec.where()} is not edgerund's: {'; '.join(problems)}. Somebody redefined it "
            "(with owner authorization). Refusing it: restore the TPM, or re-enrol (move the "
            "enrolment state away) so a new index is defined and pinned"
        )
    if not found_attrs & TPMA_NV_WRITTEN:
        raise DeviceError(
            f"{spec.where()} was never written (TPM_RC_NV_UNINITIALIZED): it was undefined and "
            "redefined since enrolment. Refusing it rather than reading it as 0"
        )
    if bytes(name).hex() != pinned_name:
        raise DeviceError(
            f"{spec.where()} has Name {bytes(name).hex()}, but {pinned_name} was pinned at "
            "enrolment: the index was redefined. Refusing it"
        )
    ectx.tr_set_auth(h, secret)
    return read(ectx, h, spec)


def legacy_counter(ectx: Any, h: Any) -> bool:
    """True for the pre-policy counter (AUTHWRITE with an empty authValue)."""
    from tpm2_pytss.constants import TPMA_NV

    pub, _ = ectx.nv_read_public(h)
    attrs = int(pub.nvPublic.attributes)
    return bool(attrs & TPMA_NV.AUTHWRITE) and not bytes(pub.nvPublic.authPolicy)
