"""Schema of the `identity` section (owned by the identity component).

`kind: tpm` talks to a TPM 2.0 through a TCTI string in tpm2-tools syntax
(`device:/dev/tpmrm0`, the kernel resource manager; `swtpm:host=127.0.0.1,port=2321` for
the simulator). `kind: software` keeps the keys in files under the state directory (mode
0600) and is reported as insecure. `fallback` decides what happens when a configured TPM is
absent: `none` (default) refuses to start, `software` degrades loudly.

Relative file names are relative to `paths.state_dir`. Handles and NV indices may be
written in YAML as hex (`0x81000001`).
"""

from __future__ import annotations

from typing import Literal, Protocol

from edgerund.config.base import Section

RESETTABLE_PCRS = (16, 23)  # resettable from locality 0 (PC Client platform profile)


class IdentityConfig(Section):
    kind: Literal["tpm", "software"] = "software"
    tcti: str = "device:/dev/tpmrm0"
    fallback: Literal["software", "none"] = "none"
    # EK choice: auto = ECC P-256, unless only the RSA 2048 EK has a certificate in NV
    ek_type: Literal["auto", "ecc256", "rsa2048"] = "auto"
    pcr_binding: int = 23  # extended with sha256(config) and sha256(model manifests)
    pcr_selection: str = "sha256:0,1,2,3,4,5,6,7,23"  # quoted PCRs (tpm2-tools syntax)
    state_file: str = "identity/tpm-enrolment.json"  # enrolled Names + key blobs (no secrets)
    key_file: str = "identity/software-key.pem"  # software identity: telemetry signing key
    ak_key_file: str = "identity/software-ak.pem"  # software identity: attestation key
    counter_file: str = "identity/software-counter"  # software identity: monotonic counter
    owner_auth_file: str = ""  # file holding the owner hierarchy password ("" = none)
    endorsement_auth_file: str = ""  # file holding the endorsement hierarchy password
    call_timeout_ms: int = 10000  # every TPM command (real chips: ECDSA ~50-600 ms)
    enrol_timeout_ms: int = 120000  # enrolment (RSA EK generation can take a minute)
    srk_handle: int = 0x81000001  # persistent storage root key (ECC P-256, noDA)
    ak_handle: int = 0x81010020  # persistent attestation key (under the EK)
    signing_key_handle: int = 0x81000020  # persistent telemetry signing key (under the SRK)
    nv_counter_index: int = 0x01500100  # TPM_NT_COUNTER, NO_DA: anti-rollback counter
    nv_binding_index: int = 0x01500101  # TPM_NT_EXTEND: config + model binding (extend log)
    nv_auth_file: str = "identity/nv-auth"  # secret authorizing our NV indices (mode 0600)
    max_queued_calls: int = 32  # TPM calls queued or running; one more answers `busy`
    attest_rate_per_s: float = 1.0  # socket `attest` per client uid: sustained rate
    attest_burst: int = 5  # ... and burst (token bucket)
    shutdown_on_exit: bool = True  # orderly TPM2_Shutdown(CLEAR) when the daemon stops


class _Identity(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def identity(self) -> IdentityConfig: ...


def cross_check(cfg: _Identity) -> list[tuple[str, str]]:
    """Checks of the identity section that msgspec's types cannot express."""
    from edgerund.identity.tpmstruct import HASH_IDS, parse_pcr_selection_string

    ident = cfg.identity
    errors: list[tuple[str, str]] = []
    if ident.pcr_binding not in RESETTABLE_PCRS:
        errors.append(
            (
                "identity.pcr_binding",
                f"expected one of {list(RESETTABLE_PCRS)} (PCRs resettable at locality 0, so the "
                f"binding can be re-measured at every model swap), got {ident.pcr_binding}",
            )
        )
    try:
        sel = parse_pcr_selection_string(ident.pcr_selection)
    except ValueError as exc:
        errors.append(("identity.pcr_selection", str(exc)))
    else:
        banks = {h for h, _ in sel}
        if len(banks) != len(sel):
            errors.append(("identity.pcr_selection", "a PCR bank is listed twice"))
        sha256 = [ix for h, ix in sel if h == HASH_IDS["sha256"]]
        if ident.pcr_binding in RESETTABLE_PCRS and (
            not sha256 or ident.pcr_binding not in sha256[0]
        ):
            errors.append(
                (
                    "identity.pcr_selection",
                    f"expected the sha256 bank to include the binding PCR {ident.pcr_binding} "
                    f"(else quotes do not prove the model), got {ident.pcr_selection!r}",
                )
            )
    if ident.kind == "tpm":
        name, _, _conf = ident.tcti.partition(":")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            errors.append(
                (
                    "identity.tcti",
                    f"expected NAME[:CONF] like 'device:/dev/tpmrm0' or "
                    f"'swtpm:host=127.0.0.1,port=2321', got {ident.tcti!r}",
                )
            )
    for key, value, lo, hi in (
        ("srk_handle", ident.srk_handle, 0x81000000, 0x817FFFFF),
        ("ak_handle", ident.ak_handle, 0x81000000, 0x817FFFFF),
        ("signing_key_handle", ident.signing_key_handle, 0x81000000, 0x817FFFFF),
        ("nv_counter_index", ident.nv_counter_index, 0x01000000, 0x01BFFFFF),
        ("nv_binding_index", ident.nv_binding_index, 0x01000000, 0x01BFFFFF),
    ):
        if not lo <= value <= hi:
            errors.append(
                (
                    f"identity.{key}",
                    f"expected a handle in 0x{lo:08x}..0x{hi:08x}, got 0x{value:08x}",
                )
            )
    handles = [ident.srk_handle, ident.ak_handle, ident.signing_key_handle]
    if len(set(handles)) != len(handles):
        errors.append(
            (
                "identity.ak_handle",
                "srk_handle, ak_handle and signing_key_handle must be three different handles",
            )
        )
    if ident.nv_binding_index == ident.nv_counter_index:
        errors.append(("identity.nv_binding_index", "must differ from identity.nv_counter_index"))
    for key in ("call_timeout_ms", "enrol_timeout_ms", "max_queued_calls", "attest_burst"):
        if getattr(ident, key) <= 0:
            errors.append((f"identity.{key}", f"expected > 0, got {getattr(ident, key)}"))
    if ident.attest_rate_per_s <= 0:
        errors.append(
            ("identity.attest_rate_per_s", f"expected > 0, got {ident.attest_rate_per_s}")
        )
    return errors
