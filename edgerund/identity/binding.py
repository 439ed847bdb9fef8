"""Pure helpers shared by the device and the verifier: the nonce rule and the binding value.

The binding PCR's expected value is computed the same way on both sides, so it lives in one
I/O-free module that the daemon and the backend verifier import.

A model's binding entry (`ModelBinding`, one row of `binding.models` and of the NV binding
events' `models`) is its name, the SHA-256 of its signed manifest.json and, when it runs
a device calibration (a `X+cal.N` slot, edgerund.inference.overlay), the SHA-256 of the
overlay document (calibration.json, the bytes as installed) and the overlay's version.
Measured per model: the manifest digest, then the overlay digest when there is one
(`ModelBinding.digests`); an entry without an overlay measures exactly what it did before
calibrations were attested, so old results replay unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgerund.identity import tpmstruct as ts

MAX_NONCE_BYTES = 64


def parse_nonce(text: str) -> bytes:
    """A verifier nonce given as hex: 1..64 bytes. Raises ValueError with the reason."""
    t = text.strip()
    if t.startswith(("0x", "0X")):
        t = t[2:]
    try:
        nonce = bytes.fromhex(t)
    except ValueError:
        raise ValueError(f"nonce must be hex digits (got {text[:80]!r})") from None
    if not nonce:
        raise ValueError("nonce is empty: a fresh random nonce is mandatory (e.g. 32 bytes)")
    if len(nonce) > MAX_NONCE_BYTES:
        raise ValueError(f"nonce is {len(nonce)} bytes; at most {MAX_NONCE_BYTES} are allowed")
    return nonce


@dataclass(frozen=True)
class ModelBinding:
    """What is bound for one model: its manifest and the calibration overlay in force."""

    name: str
    manifest_sha256: bytes
    overlay_sha256: bytes | None = None  # sha256(calibration.json bytes); None: uncalibrated
    overlay_version: str | None = None  # "X+cal.N" (informative in the PCR log)

    def __post_init__(self) -> None:
        if len(self.manifest_sha256) != 32:
            raise ValueError(f"manifest digest of model {self.name!r} must be 32 bytes")
        if self.overlay_sha256 is not None and len(self.overlay_sha256) != 32:
            raise ValueError(f"overlay digest of model {self.name!r} must be 32 bytes")

    @property
    def digests(self) -> list[bytes]:
        """What this model extends into the binding PCR, in order."""
        out = [self.manifest_sha256]
        if self.overlay_sha256 is not None:
            out.append(self.overlay_sha256)
        return out

    def calibration(self) -> dict[str, str | None] | None:
        """{"version", "overlay_sha256"} of the calibration in force, None without one."""
        if self.overlay_sha256 is None:
            return None
        return {"version": self.overlay_version, "overlay_sha256": self.overlay_sha256.hex()}

    def as_log(self) -> dict[str, str | None]:
        """The log entry (binding.models[] and nv_binding.log.events[].models[])."""
        return {
            "name": self.name,
            "manifest_sha256": self.manifest_sha256.hex(),
            "overlay_sha256": None if self.overlay_sha256 is None else self.overlay_sha256.hex(),
            "overlay_version": self.overlay_version,
        }


def parse_model_entry(entry: object) -> ModelBinding:
    """A log entry back into a ModelBinding; ValueError when malformed. A missing or null
    `overlay_sha256` is an uncalibrated model (results made before calibrations were
    attested have neither key)."""
    if not isinstance(entry, Mapping):
        raise ValueError("a binding model entry must be an object")
    try:
        manifest = bytes.fromhex(str(entry["manifest_sha256"]))
    except KeyError:
        raise ValueError("a binding model entry has no manifest_sha256") from None
    overlay_hex = entry.get("overlay_sha256")
    version = entry.get("overlay_version")
    if overlay_hex is not None and not isinstance(overlay_hex, str):
        raise ValueError("overlay_sha256 must be a hex string or null")
    if version is not None and not isinstance(version, str):
        raise ValueError("overlay_version must be a string or null")
    return ModelBinding(
        name=str(entry.get("name", "")),
        manifest_sha256=manifest,
        overlay_sha256=None if overlay_hex is None else bytes.fromhex(overlay_hex),
        overlay_version=version if overlay_hex is not None else None,
    )


def model_digests(models: Sequence[ModelBinding]) -> list[bytes]:
    """The PCR extends of the models, in order of model name."""
    return [d for m in sorted(models, key=lambda m: m.name) for d in m.digests]


def binding_value(config_sha256: bytes, model_sha256s: Sequence[bytes]) -> bytes:
    """The expected binding PCR (sha256 bank) after a reset, the config and the models.

    The daemon resets the PCR, extends it with sha256(config file bytes), then for each
    active model in order of model name with sha256(manifest.json bytes) and, for a model
    running a calibration, with sha256(calibration.json bytes) right after its manifest
    (`model_digests` gives that list from the models' entries).
    """
    value = bytes(32)
    for digest in (config_sha256, *model_sha256s):
        value = ts.extend(value, digest)
    return value


ANY_MODEL = "*"  # expected_overlays key: every bound model


def overlay_mismatch(
    models: Sequence[ModelBinding], expected: Mapping[str, bytes | None]
) -> str | None:
    """Why the bound calibrations differ from what a verifier expects, None if they agree.

    `expected` maps a model name (or ANY_MODEL: every bound model) to the overlay digest
    that must be in force, None meaning "no calibration"."""
    by_name = {m.name: m for m in models}
    for key, want in sorted(expected.items()):
        if key == ANY_MODEL:
            targets = list(by_name.values())
        elif key in by_name:
            targets = [by_name[key]]
        else:
            return f"model {key!r} is not bound"
        for m in targets:
            if m.overlay_sha256 == want:
                continue
            got = (
                "no calibration"
                if m.overlay_sha256 is None
                else f"calibration {m.overlay_version} (overlay {m.overlay_sha256.hex()})"
            )
            wanted = "no calibration" if want is None else f"overlay {want.hex()}"
            return f"model {m.name!r} runs {got}, expected {wanted}"
    return None
