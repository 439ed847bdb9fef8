"""Turning TSS2 return codes into actionable messages.

A TSS2_RC carries a layer (bits 16-23: 0 = the TPM itself, 0x0A = the TCTI transport,
0x07 = ESAPI) and an error. For TPM format-one codes the low 6 bits plus 0x80 are the error
and bits 8-11 name the handle/session/parameter at fault. The handful of codes a field
engineer can act on get a specific message here; everything else keeps libtss2's decoded
text. No tpm2_pytss import at module level: this also serves the pure-Python CLI paths.
"""

from __future__ import annotations

from typing import Any

from edgerund.errors import DeviceError

TCTI_LAYER = 0x000A0000
LAYER_MASK = 0x00FF0000
RC_FMT1 = 0x080

# TPM layer codes (already reduced to the format-one error when RC_FMT1 is set)
RC_INITIALIZE = 0x100
RC_NV_RATE = 0x920
RC_LOCKOUT = 0x921
RC_NV_UNAVAILABLE = 0x923
RC_OBJECT_MEMORY = 0x902
RC_SESSION_MEMORY = 0x903
RC_NV_SPACE = 0x14B
RC_NV_DEFINED = 0x14C
RC_NV_UNINITIALIZED = 0x14A
RC_AUTH_FAIL = 0x08E
RC_BAD_AUTH = 0x0A2
RC_HANDLE = 0x08B
RC_POLICY_FAIL = 0x099
RC_RETRY = 0x922
RC_YIELDED = 0x908
RC_TESTING = 0x90A

# TCTI layer
TCTI_IO_ERROR = 0x0A000A
TCTI_NOT_SUPPORTED = 0x0A0015
TCTI_BAD_VALUE = 0x0A000B
TCTI_TRY_AGAIN = 0x0A0009
TCTI_NO_CONNECTION = 0x0A0010


def base_error(rc: int) -> int:
    """The error without handle/session/parameter numbers (TPM layer), or rc for others."""
    if rc & LAYER_MASK:
        return rc
    if rc & RC_FMT1:
        return RC_FMT1 + (rc & 0x3F)
    return rc


class TpmError(DeviceError):
    """A TPM command failed. `rc` is the raw TSS2_RC, `error` the reduced one."""

    def __init__(self, message: str, rc: int = 0, what: str = "") -> None:
        self.rc = rc
        self.error = base_error(rc)
        self.what = what
        super().__init__(message)

    @classmethod
    def from_tss(cls, exc: Any, what: str, *, tcti: str = "", hint: str = "") -> TpmError:
        rc = int(getattr(exc, "rc", 0))
        return cls(message_for(rc, str(exc), what, tcti, hint), rc, what)


def _device_fix(tcti: str) -> str:
    name, _, conf = tcti.partition(":")
    if name == "device":
        dev = conf or "/dev/tpmrm0"
        return (
            f"check that {dev} exists (ls -l {dev}; enable the TPM in the firmware or, on a "
            "Raspberry Pi, add dtoverlay=tpm-slb9670 to /boot/firmware/config.txt) and that "
            f"the daemon's user may open it: it must be in the group 'tss' "
            f"(sudo usermod -aG tss edgerund, then restart). To run without a TPM set "
            "identity.fallback: software (INSECURE: keys in a file)"
        )
    if name in ("swtpm", "mssim"):
        return (
            f"is the TPM simulator running and listening on {conf or 'the default port'} "
            "(and the control port +1)? e.g. swtpm socket --tpm2 --server type=tcp,port=2321 "
            "--ctrl type=tcp,port=2322 --flags not-need-init,startup-clear"
        )
    if name == "tabrmd":
        return "is tpm2-abrmd running and reachable on that D-Bus?"
    return "check identity.tcti"


def message_for(rc: int, decoded: str, what: str, tcti: str, hint: str = "") -> str:
    err = base_error(rc)
    where = f"TPM at {tcti}" if tcti else "TPM"
    if err == TCTI_IO_ERROR or err == TCTI_NO_CONNECTION:
        return f"cannot talk to the {where} while trying to {what} ({decoded}): {_device_fix(tcti)}"
    if err == TCTI_NOT_SUPPORTED:
        name = tcti.partition(":")[0]
        return (
            f"unknown TCTI {name!r} in identity.tcti={tcti!r} ({decoded}): expected device, "
            f"swtpm, mssim or tabrmd (is libtss2-tcti-{name}0 installed?)"
        )
    if err == TCTI_BAD_VALUE:
        return (
            f"bad TCTI configuration identity.tcti={tcti!r} ({decoded}): expected e.g. "
            "'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'"
        )
    if err == TCTI_TRY_AGAIN:
        return f"the {where} did not answer in time while trying to {what} ({decoded})"
    if err == RC_LOCKOUT:
        return (
            f"the TPM is in dictionary-attack lockout while trying to {what}: too many "
            "failed authorizations (or unclean power cuts after using DA-protected keys). "
            "Wait for the lockout recovery time (tpm2_getcap properties-variable: "
            "TPM2_PT_LOCKOUT_COUNTER, TPM2_PT_LOCKOUT_RECOVERY) or reset it with the lockout "
            "password: tpm2_dictionarylockout --clear-lockout -p LOCKOUT_PASSWORD"
        )
    if err in (RC_BAD_AUTH, RC_AUTH_FAIL):
        return f"wrong password while trying to {what} ({decoded}): " + (
            hint or "check identity.owner_auth_file / identity.endorsement_auth_file"
        )
    if err == RC_OBJECT_MEMORY or err == RC_SESSION_MEMORY:
        return (
            f"the TPM has no free object/session slot while trying to {what}: another process "
            "holds (or a crashed one leaked) transient objects. Use the kernel resource manager "
            "(identity.tcti: device:/dev/tpmrm0) so slots are virtualized and freed on close"
        )
    if err == RC_INITIALIZE:
        return f"the TPM was not started (TPM2_Startup missing) while trying to {what}"
    if err in (RC_NV_RATE, RC_NV_UNAVAILABLE):
        return (
            f"the TPM's NV memory is rate-limited or unavailable while trying to {what} "
            f"({decoded}); retry later"
        )
    if err == RC_NV_SPACE:
        return f"the TPM's NV memory is full while trying to {what} ({decoded})"
    if err in (RC_RETRY, RC_YIELDED, RC_TESTING):
        return f"the TPM is busy while trying to {what} ({decoded}); retry"
    return f"TPM command failed while trying to {what}: {decoded} (rc 0x{rc:x})" + (
        f"; {hint}" if hint else ""
    )


def describe(exc: BaseException, what: str, tcti: str) -> str:
    if isinstance(exc, DeviceError):
        return str(exc)
    if hasattr(exc, "rc"):
        return message_for(int(exc.rc), str(exc), what, tcti)
    return f"{what} failed: {exc!r}"
