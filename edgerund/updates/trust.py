"""The trust decision for a model bundle: one pure function, no I/O, in a fixed order.

    1. size cap              (before a single byte of the bundle is read)
    2. signature threshold   (distinct trusted keyids over the canonical manifest)
    3. expiry                (the manifest's and the device keyring's)
    4. compatibility         (model name configured, hardware id, daemon version, opset,
                              the model manifest's version is the bundle's)
    5. anti-rollback         (counter >= stored, version > installed, no fast-forward,
                              created not older than the installed bundle's)
    6. every file's hash     (size and SHA-256 of each payload file, none missing or extra)

The order matters: nothing about an unauthenticated manifest is believed before step 2
(an attacker must not be able to steer the device with, say, a fake expiry), and the
relatively expensive hashing is only reported after the metadata is trusted. Each step
has its own reason codes (TrustError.code) so a rejection says exactly why.

The I/O layer (bundle.py) calls `check_size` before opening the file, `verify_manifest`
(or `verify_document`, when the job has parsed manifest.json once already) as soon as
manifest.json and manifest.sig are read (before any payload byte is extracted)
and `verify_files` with the digests it computed while extracting; `decide` chains all
three for callers that have everything at hand (tests, `edgerund bundle verify`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from edgerund.errors import TrustError
from edgerund.updates.keyring import Keyring, count_signatures, threshold_error
from edgerund.updates.manifest import (
    MANIFEST_DOMAIN,
    BundleManifest,
    decode_signatures,
    manifest_from_json,
    parse_manifest_json,
    parse_time,
    parse_version,
    signing_message,
)


@dataclass(frozen=True)
class Device:
    """What the device is: checked against `compatibility`."""

    hardware_id: str
    daemon_version: str
    max_opset: int
    models: Collection[str]  # configured model names


@dataclass(frozen=True)
class Installed:
    """What is installed now: the anti-rollback reference."""

    counter: int  # stored security counter (TPM NV counter or file)
    version: str | None  # version of the model in the active slot (None: nothing installed)
    bundle_id: str | None = None
    created: float | None = None  # `created` of the installed bundle


@dataclass(frozen=True)
class Limits:
    bundle_max_bytes: int
    file_max_bytes: int
    max_counter_jump: int
    max_version_jump: int = 0  # 0 = unlimited


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


@dataclass(frozen=True)
class Verdict:
    manifest: BundleManifest
    manifest_sha256: str  # of the canonical signed message (what a TPM binding extends)
    signed_by: frozenset[str]


def check_size(bundle_bytes: int, limits: Limits) -> None:
    """Step 1."""
    if bundle_bytes > limits.bundle_max_bytes:
        raise TrustError(
            "too_large",
            f"bundle size: expected at most {limits.bundle_max_bytes} bytes, got {bundle_bytes}",
        )


def verify_manifest(
    manifest_bytes: bytes,
    sig_bytes: bytes | None,
    keyring: Keyring,
    *,
    now: float,
    device: Device,
    installed: Installed,
    limits: Limits,
) -> Verdict:
    """Steps 2 to 5 on the bytes of manifest.json."""
    return verify_document(
        parse_manifest_json(manifest_bytes),
        sig_bytes,
        keyring,
        now=now,
        device=device,
        installed=installed,
        limits=limits,
    )


def verify_document(
    raw: dict[str, Any],
    sig_bytes: bytes | None,
    keyring: Keyring,
    *,
    now: float,
    device: Device,
    installed: Installed,
    limits: Limits,
) -> Verdict:
    """Steps 2 to 5 on manifest.json parsed once (`parse_manifest_json`): validated into
    the struct here, signatures checked over the canonical form of this same value."""
    manifest = manifest_from_json(raw)
    message = signing_message(MANIFEST_DOMAIN, raw)
    # -- 2. signature threshold
    if sig_bytes is None:
        raise TrustError("unsigned", "bundle has no manifest.sig")
    sigs = decode_signatures(sig_bytes).signatures
    count = count_signatures(message, sigs, keyring.keys)
    err = threshold_error("manifest", count, keyring.threshold, len(sigs))
    if err is not None:
        raise err
    # -- 3. expiry
    if keyring.expires <= now:
        raise TrustError(
            "keyring_expired",
            f"device keyring v{keyring.version} expired at {keyring.signed.get('expires')}; rotate it",
        )
    expires = parse_time(manifest.expires, "expires")
    created = parse_time(manifest.created, "created")
    if expires <= now:
        raise TrustError("expired", f"manifest expired at {manifest.expires}")
    if created > expires:
        raise TrustError("manifest_malformed", "created is after expires")
    # -- 4. compatibility
    c = manifest.compatibility
    if manifest.model_name not in device.models:
        raise TrustError(
            "unknown_model",
            f"model_name: expected one of {sorted(device.models)}, got {manifest.model_name!r}",
        )
    if "*" not in c.hardware_ids and device.hardware_id not in c.hardware_ids:
        raise TrustError(
            "incompatible_hardware",
            f"hardware id: bundle supports {c.hardware_ids}, this gateway is {device.hardware_id!r}",
        )
    if parse_version(device.daemon_version) < parse_version(c.min_daemon):
        raise TrustError(
            "incompatible_daemon",
            f"daemon version: bundle needs >= {c.min_daemon}, this daemon is {device.daemon_version}",
        )
    if c.opset_min > c.opset_max or c.opset_max > device.max_opset:
        raise TrustError(
            "incompatible_opset",
            f"opset: bundle needs {c.opset_min}..{c.opset_max}, the runtime supports up to {device.max_opset}",
        )
    mm_version = (manifest.model_manifest or {}).get("version")
    if mm_version is not None and str(mm_version) != manifest.version:
        # The runtime (loops, PCR binding) reports the model manifest's version and the
        # updates component the bundle's: they must be one signed version.
        raise TrustError(
            "version_mismatch",
            f"version: the bundle says {manifest.version}, its model_manifest says {mm_version}",
        )
    # -- 5. anti-rollback
    if manifest.security_counter < installed.counter:
        raise TrustError(
            "counter_rollback",
            f"security_counter: expected >= {installed.counter} (stored), got {manifest.security_counter}",
        )
    if manifest.security_counter > installed.counter + limits.max_counter_jump:
        raise TrustError(
            "fast_forward",
            f"security_counter: expected at most {installed.counter + limits.max_counter_jump}"
            f" (stored {installed.counter} + max_counter_jump {limits.max_counter_jump}),"
            f" got {manifest.security_counter}",
        )
    if installed.version is not None:
        new_v, old_v = parse_version(manifest.version), parse_version(installed.version)
        if new_v == old_v:
            raise TrustError(
                "replay",
                f"version {manifest.version} is already installed (bundle {installed.bundle_id or '?'})",
            )
        if new_v < old_v:
            raise TrustError(
                "version_rollback",
                f"version: expected newer than {installed.version}, got {manifest.version}",
            )
        if limits.max_version_jump and new_v[0] > old_v[0] + limits.max_version_jump:
            raise TrustError(
                "fast_forward",
                f"major version: expected at most {old_v[0] + limits.max_version_jump}, got {new_v[0]}",
            )
    if installed.created is not None and created < installed.created:
        raise TrustError(
            "stale_created",
            f"created: the installed bundle is newer ({installed.created:.0f} > {created:.0f})",
        )
    for f in manifest.files:
        if f.size > limits.file_max_bytes:
            raise TrustError(
                "file_too_large",
                f"{f.path}: expected at most {limits.file_max_bytes} bytes, manifest says {f.size}",
            )
    return Verdict(manifest, hashlib.sha256(message).hexdigest(), count.valid)


def verify_files(manifest: BundleManifest, digests: Mapping[str, FileDigest]) -> None:
    """Step 6: exactly the listed files, each with its size and hash."""
    listed = {f.path for f in manifest.files}
    extra = sorted(set(digests) - listed)
    if extra:
        raise TrustError("file_unexpected", f"files not listed in the manifest: {extra}")
    for f in manifest.files:
        d = digests.get(f.path)
        if d is None:
            raise TrustError(
                "file_missing", f"{f.path}: listed in the manifest, missing from the bundle"
            )
        if d.size != f.size:
            raise TrustError("file_size", f"{f.path}: expected {f.size} bytes, got {d.size}")
        if d.sha256 != f.sha256:
            raise TrustError(
                "file_hash", f"{f.path}: expected sha256 {f.sha256[:16]}..., got {d.sha256[:16]}..."
            )


def decide(
    bundle_bytes: int,
    manifest_bytes: bytes,
    sig_bytes: bytes | None,
    digests: Mapping[str, FileDigest],
    keyring: Keyring,
    *,
    now: float,
    device: Device,
    installed: Installed,
    limits: Limits,
) -> Verdict:
    """The whole decision, steps 1 to 6 in order."""
    check_size(bundle_bytes, limits)
    v = verify_manifest(
        manifest_bytes,
        sig_bytes,
        keyring,
        now=now,
        device=device,
        installed=installed,
        limits=limits,
    )
    verify_files(v.manifest, digests)
    return v
