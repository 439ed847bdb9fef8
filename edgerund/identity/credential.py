"""The device half of credential activation: the `attest-activate` socket command.

A verifier proves that the gateway's AK lives in the TPM its EK certificate names by
sending a credential made with TPM2_MakeCredential (edgerund/backend/makecredential.py)
for the EK public key and the AK Name; the daemon runs TPM2_ActivateCredential(AK, EK) and
returns what the TPM released:

    request  {"cmd": "attest-activate", "args": {"credential_blob": B64 TPM2B_ID_OBJECT,
              "encrypted_secret": B64 TPM2B_ENCRYPTED_SECRET}}
    response {"secret": HEX, "ak_name": HEX}
    errors   bad_request (malformed/oversized args), not_supported (software identity),
             activation_failed (the TPM refused: credential for another EK or AK Name),
             tpm_error (the TPM could not be reached)

Why this is not an oracle: the TPM decrypts only credentials bound to the Name of the
object loaded at activateHandle, and the daemon always passes its own AK there, so the
command can prove only the daemon's own AK; a credential made for any other key Name fails
the TPM's integrity check. It is still a privileged (mutating) command: it uses the
endorsement hierarchy, costs TPM time, and enrolment is an administrator's act.

Sizes are capped before anything reaches libtss2's unmarshalling: TPM2B_ID_OBJECT holds an
HMAC and an encrypted TPM2B_DIGEST (< 200 bytes for SHA-512), TPM2B_ENCRYPTED_SECRET an
RSA-4096 OAEP block or an ECC point (<= 514 bytes).
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from edgerund.component import CommandError
from edgerund.errors import DeviceError
from edgerund.identity.base import Identity
from edgerund.identity.tpm_errors import LAYER_MASK, TpmError

MAX_ID_OBJECT = 256
MAX_ENCRYPTED_SECRET = 514


def _tpm2b(args: dict[str, Any], key: str, cap: int) -> bytes:
    v = args.get(key)
    if not isinstance(v, str):
        raise CommandError("bad_request", f"attest-activate needs args.{key}: base64 string")
    if len(v) > 4 * (cap + 2) // 3 + 4:
        raise CommandError("bad_request", f"args.{key} is larger than {cap} bytes")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_request", f"args.{key} is not valid base64") from None
    if len(raw) < 3 or len(raw) > cap + 2 or struct.unpack(">H", raw[:2])[0] != len(raw) - 2:
        raise CommandError(
            "bad_request", f"args.{key} is not a marshalled TPM2B of at most {cap} bytes"
        )
    return raw


def parse_request(args: dict[str, Any]) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) from the command's args, size-checked."""
    if not isinstance(args, dict):
        raise CommandError("bad_request", "args must be an object")
    return (
        _tpm2b(args, "credential_blob", MAX_ID_OBJECT),
        _tpm2b(args, "encrypted_secret", MAX_ENCRYPTED_SECRET),
    )


async def handle_activate(ident: Identity, args: dict[str, Any]) -> dict[str, Any]:
    blob, secret = parse_request(args)
    if ident.kind != "tpm":
        raise CommandError(
            "not_supported",
            "the software identity has no TPM: credential activation needs identity.kind: tpm",
        )
    from edgerund.identity.tpm import TpmIdentity

    if not isinstance(ident, TpmIdentity):
        raise CommandError("not_supported", "this identity cannot activate credentials")
    try:
        out = await ident.activate_credential(blob, secret)
    except TpmError as exc:
        if exc.rc & LAYER_MASK == 0:  # the TPM itself answered: it refused the credential
            raise CommandError(
                "activation_failed",
                f"the TPM refused the credential (TPM error 0x{exc.rc:03x}): it was not made "
                f"for this TPM's EK and this daemon's AK Name {ident.ak_name}",
            ) from None
        raise CommandError("tpm_error", str(exc)) from None
    except DeviceError as exc:
        raise CommandError("tpm_error", str(exc)) from None
    return {"secret": out.hex(), "ak_name": ident.ak_name}
