"""Re-verify a model slot from its stored signed manifest, never from its marker (sync,
blocking reads: the caller runs it with asyncio.to_thread).

A slot (slots.py) holds the payload files, `manifest.json` (the inference runtime's
manifest, written from the signed `model_manifest`), `bundle.json` + `bundle.sig` (the
signed bundle manifest and its signatures, byte for byte as received) and `slot.json`, the
validity marker. The marker is unsigned: anyone who can write the slot can rewrite it, so it
is a crash-consistency marker (the slot was completely written) and an index, not a trust
anchor. At start-up the slot is trusted only if, in this order:

  1. `slot.json` exists and decodes                          slot_marker_missing / _malformed
  2. `bundle.json` and `bundle.sig` exist                     slot_unsigned
     (a slot seeded from the packaged model instead matches the packaged directory file
     for file: the package is the trust anchor there)         slot_shipped_mismatch
  3. a threshold of the CURRENT keyring's keys signed it     slot_signature (code inside)
     (a key revoked since installation no longer vouches for the slot)
  4. it is the expected model                                 slot_wrong_model
  5. the marker agrees with the signed manifest (version, bundle id, counter, manifest
     hash)                                                    slot_marker_mismatch
  6. `manifest.json` is exactly the signed `model_manifest`   slot_model_manifest
  7. every listed payload file has its signed size and hash,  slot_file_missing / _hash
     and the marker lists that same size and hash             slot_marker_mismatch
  8. nothing else is in the slot (no extra file, no symlink,
     no special file: a planted library or a link out)        slot_file_unexpected
  9. a CALIBRATED slot (version `X+cal.N`: the files of `X` plus `calibration.json` and
     `calibration.sig`, edgerund.inference.overlay) passes 1-8 as model `X` (signed or
     packaged), and its overlay is signed by THIS device's identity key, bound to the
     slot's model manifest and within the signed adaptation policy
                                                              overlay_signature /
                                                              overlay_binding / _format /
                                                              overlay_inconsistent /
                                                              overlay_policy (the policy
                                                              reason in the message)

Manifest expiry is NOT checked: it bounds when a bundle may be installed (freeze attacks),
not how long an installed model may run. A failure gives a quarantine verdict with the
precise reason; the caller falls back to the other slot or the packaged model and reports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from edgerund.errors import TrustError
from edgerund.inference.calibration import CalibrationRefused
from edgerund.inference.errors import ModelError
from edgerund.inference.manifest import parse_manifest
from edgerund.inference.overlay import OVERLAY_FILES, check_overlay, overlay_seq, read_overlay
from edgerund.updates.jsonguard import check_depth
from edgerund.updates.keyring import Keyring, count_signatures, threshold_error
from edgerund.updates.manifest import (
    MANIFEST_DOMAIN,
    decode_manifest,
    decode_signatures,
    signing_message,
)

MARKER = "slot.json"
OVERLAY_MARK = "calibration.json"  # its presence makes a slot a calibrated one (9.)
SHIPPED = "shipped"
SMALL_MAX_BYTES = 1 << 20  # slot.json, bundle.json, bundle.sig, manifest.json
_CHUNK = 1 << 20


class _Marker(msgspec.Struct, kw_only=True):
    # The fields of slots.MarkerFile, decoded independently (this module does not trust
    # the store's own reader).
    version: str
    bundle_id: str
    security_counter: int
    manifest_sha256: str
    created: float | None = None
    files: dict[str, tuple[int, str]]


@dataclass(frozen=True)
class SlotVerdict:
    ok: bool
    reason: str | None  # None when ok; else the quarantine reason code
    message: str
    version: str | None = None
    bundle_id: str | None = None
    security_counter: int | None = None
    manifest_sha256: str | None = None
    signed_by: frozenset[str] = frozenset()

    @property
    def quarantine(self) -> bool:
        return not self.ok


def _bad(reason: str, message: str) -> SlotVerdict:
    return SlotVerdict(False, reason, message)


def _read_small(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise TrustError("slot_file_unexpected", f"{path.name} is not a regular file")
        data = f.read(SMALL_MAX_BYTES + 1)
    if len(data) > SMALL_MAX_BYTES:
        raise TrustError("slot_file_unexpected", f"{path.name} is larger than {SMALL_MAX_BYTES}")
    return data


def _hash(path: Path) -> tuple[int, str] | None:
    """(size, sha256) of a regular file, never through a symlink; None if missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        raise TrustError("slot_file_unexpected", f"{path.name}: {exc.strerror}") from None
    h = hashlib.sha256()
    n = 0
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise TrustError("slot_file_unexpected", f"{path.name} is not a regular file")
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _tree(root: Path) -> Iterator[str]:
    """Relative paths of every non-directory entry; symlinks and special files refused."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                rel = os.path.relpath(os.path.join(dirpath, d), root)
                raise TrustError("slot_file_unexpected", f"{rel} is a symlink")
        for fn in filenames:
            full = os.path.join(dirpath, fn)
            st = os.lstat(full)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if not stat.S_ISREG(st.st_mode):
                raise TrustError("slot_file_unexpected", f"{rel} is not a regular file")
            yield rel


def model_manifest_bytes(model_manifest: dict[str, Any]) -> bytes:
    """How slots.install_staging writes the signed model_manifest as manifest.json."""
    return json.dumps(model_manifest, indent=2, sort_keys=True).encode()


def verify_slot(
    slot_dir: Path,
    keyring: Keyring | None,
    *,
    model: str,
    shipped_dir: Path | None = None,
    device_key: str | None = None,
) -> SlotVerdict:
    """Re-verify `slot_dir` (see the module docstring). `keyring` is the keyring the chain
    verified (None when no keyring is usable: then only a slot seeded from the packaged
    model can pass). `shipped_dir` is the packaged model directory. `device_key` is this
    device's identity public key (PEM): a calibrated slot cannot pass without it."""
    try:
        verdict = _verify(slot_dir, keyring, model, shipped_dir)
        if verdict.ok and (slot_dir / OVERLAY_MARK).exists():
            return _verify_overlay(slot_dir, verdict, device_key)
        return verdict
    except TrustError as exc:
        return _bad(exc.code, f"slot {slot_dir.name}: {str(exc).split(': ', 1)[1]}")
    except OSError as exc:
        return _bad("slot_unreadable", f"slot {slot_dir.name}: {exc}")


def _verify(
    slot_dir: Path, keyring: Keyring | None, model: str, shipped_dir: Path | None
) -> SlotVerdict:
    raw_marker = _read_small(slot_dir / MARKER)
    if raw_marker is None:
        return _bad("slot_marker_missing", f"slot {slot_dir.name} has no {MARKER}")
    try:
        check_depth(raw_marker, MARKER, "slot_marker_malformed")
        mk = msgspec.json.decode(raw_marker, type=_Marker)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _bad("slot_marker_malformed", f"slot {slot_dir.name}: {MARKER}: {exc}")
    # A calibrated slot (9.) holds model X's files plus the overlay: 1-8 check it as X
    # (whether an overlay is there at all is decided by the file, never by the marker).
    cal = overlay_seq(mk.version)
    overlay = frozenset(OVERLAY_FILES) if (slot_dir / OVERLAY_MARK).exists() else frozenset()
    if cal is not None and overlay:
        mk = msgspec.structs.replace(mk, version=cal[0])
    bundle = _read_small(slot_dir / "bundle.json")
    sig = _read_small(slot_dir / "bundle.sig")
    if bundle is None and sig is None and mk.bundle_id == SHIPPED:
        return _verify_shipped(slot_dir, mk, shipped_dir, overlay)
    if bundle is None or sig is None:
        missing = "bundle.json" if bundle is None else "bundle.sig"
        return _bad(
            "slot_unsigned",
            f"slot {slot_dir.name}: {missing} is missing, the slot cannot be re-verified",
        )
    if keyring is None:
        return _bad(
            "slot_no_keyring", f"slot {slot_dir.name}: no verified keyring to check it against"
        )
    # -- 3. signature threshold under the current keyring
    check_depth(bundle, "bundle.json", "slot_manifest_malformed")
    check_depth(sig, "bundle.sig", "slot_manifest_malformed")
    try:
        man, raw = decode_manifest(bundle)
        sigs = decode_signatures(sig).signatures
    except TrustError as exc:
        return _bad(
            "slot_manifest_malformed", f"slot {slot_dir.name}: {str(exc).split(': ', 1)[1]}"
        )
    message = signing_message(MANIFEST_DOMAIN, raw)
    count = count_signatures(message, sigs, keyring.keys)
    err = threshold_error("bundle.json", count, keyring.threshold, len(sigs))
    if err is not None:
        return _bad(
            "slot_signature",
            f"slot {slot_dir.name}: {err} (keyring v{keyring.version})",
        )
    msha = hashlib.sha256(message).hexdigest()
    # -- 4. the expected model
    if man.model_name != model:
        return _bad(
            "slot_wrong_model",
            f"slot {slot_dir.name}: expected model {model!r}, signed manifest says {man.model_name!r}",
        )
    # -- 5. the marker agrees with what is signed
    for field, got, want in (
        ("version", mk.version, man.version),
        ("bundle_id", mk.bundle_id, man.bundle_id),
        ("security_counter", mk.security_counter, man.security_counter),
        ("manifest_sha256", mk.manifest_sha256, msha),
    ):
        if got != want:
            return _bad(
                "slot_marker_mismatch",
                f"slot {slot_dir.name}: {MARKER} {field} is {got!r}, the signed manifest says {want!r}",
            )
    # -- 6. manifest.json is the signed model_manifest, byte for byte
    allowed = {f.path for f in man.files} | {MARKER, "bundle.json", "bundle.sig"} | overlay
    mm = _read_small(slot_dir / "manifest.json")
    if man.model_manifest is not None:
        allowed.add("manifest.json")
        if mm != model_manifest_bytes(man.model_manifest):
            return _bad(
                "slot_model_manifest",
                f"slot {slot_dir.name}: manifest.json "
                + ("is missing" if mm is None else "differs from the signed model_manifest"),
            )
    # -- 7. every payload file
    for f in man.files:
        d = _hash(slot_dir / f.path)
        if d is None:
            return _bad("slot_file_missing", f"slot {slot_dir.name}: {f.path} is missing")
        if d != (f.size, f.sha256):
            return _bad(
                "slot_file_hash",
                f"slot {slot_dir.name}: {f.path}: expected {f.size} bytes sha256 {f.sha256[:16]}...,"
                f" got {d[0]} bytes sha256 {d[1][:16]}...",
            )
    # The marker's index agrees too (it is what the store's quick re-hash uses).
    for f in man.files:
        if tuple(mk.files.get(f.path, ())) != (f.size, f.sha256):
            return _bad(
                "slot_marker_mismatch",
                f"slot {slot_dir.name}: {MARKER} entry for {f.path} differs from the signed manifest",
            )
    # -- 8. nothing else
    extra = sorted(set(_tree(slot_dir)) - allowed)
    if extra:
        return _bad("slot_file_unexpected", f"slot {slot_dir.name}: unexpected files {extra}")
    return SlotVerdict(
        True,
        None,
        f"slot {slot_dir.name}: {man.model_name} {man.version} verified under keyring v{keyring.version}",
        version=man.version,
        bundle_id=man.bundle_id,
        security_counter=man.security_counter,
        manifest_sha256=msha,
        signed_by=count.valid,
    )


def _verify_shipped(
    slot_dir: Path, mk: _Marker, shipped_dir: Path | None, overlay: frozenset[str] = frozenset()
) -> SlotVerdict:
    """A slot seeded from the packaged model: the package is the anchor. Every file must
    be the packaged file (same set, same bytes); the marker's version must be the one the
    packaged manifest.json names."""
    if shipped_dir is None or not shipped_dir.is_dir():
        return _bad(
            "slot_unsigned",
            f"slot {slot_dir.name} claims to hold the packaged model, but there is no packaged"
            " model directory to compare it with",
        )
    want = {rel: _hash(shipped_dir / rel) for rel in _tree(shipped_dir) if rel != MARKER}
    have = set(_tree(slot_dir)) - {MARKER} - overlay
    if have != set(want):
        return _bad(
            "slot_shipped_mismatch",
            f"slot {slot_dir.name}: files {sorted(have ^ set(want))} differ from the packaged model",
        )
    for rel, d in want.items():
        if _hash(slot_dir / rel) != d:
            return _bad(
                "slot_shipped_mismatch",
                f"slot {slot_dir.name}: {rel} differs from the packaged model's",
            )
    version = "0"
    mm = _read_small(shipped_dir / "manifest.json")
    if mm is not None:
        try:
            v = json.loads(mm).get("version")
            version = str(v) if v is not None else "0"
        except (ValueError, AttributeError):
            pass
    if mk.version != version or mk.security_counter != 0:
        return _bad(
            "slot_marker_mismatch",
            f"slot {slot_dir.name}: {MARKER} says version {mk.version!r} counter"
            f" {mk.security_counter}, the packaged model is version {version!r} counter 0",
        )
    return SlotVerdict(
        True,
        None,
        f"slot {slot_dir.name}: the packaged model {version}, identical to {shipped_dir}",
        version=version,
        bundle_id=SHIPPED,
        security_counter=0,
        manifest_sha256="",
    )


# A policy refusal of an overlay is reported as overlay_policy (the calibration's own
# reason, e.g. shift_out_of_bounds, leads the message); the overlay_* reasons as they are.
def _overlay_reason(exc: CalibrationRefused) -> tuple[str, str]:
    if exc.reason.startswith("overlay_"):
        return exc.reason, exc.detail
    return "overlay_policy", f"{exc.reason}: {exc.detail}"


def _verify_overlay(slot_dir: Path, base: SlotVerdict, device_key: str | None) -> SlotVerdict:
    """9. of the module docstring, once the slot passed 1-8 as its base model."""
    name = slot_dir.name
    raw_marker = _read_small(slot_dir / MARKER) or b""
    mk = msgspec.json.decode(raw_marker, type=_Marker)
    if overlay_seq(mk.version) is None:
        return _bad(
            "overlay_binding",
            f"slot {name} holds a calibration overlay but its version {mk.version!r} is not X+cal.N",
        )
    for rel in sorted(OVERLAY_FILES):
        d = _hash(slot_dir / rel)
        if d is None:
            return _bad("overlay_format", f"slot {name}: {rel} is missing")
        if tuple(mk.files.get(rel, ())) != d:
            return _bad("slot_marker_mismatch", f"slot {name}: {MARKER} entry for {rel} differs")
    mm = _read_small(slot_dir / "manifest.json")
    if mm is None:
        return _bad("slot_model_manifest", f"slot {name}: manifest.json is missing")
    try:
        manifest = parse_manifest(mm, f"slot {name}/manifest.json")
        found = read_overlay(slot_dir)
        if found is None:
            raise CalibrationRefused("overlay_format", "the overlay files are missing")
        doc, sig = found
        seq = check_overlay(doc, sig, manifest, device_key, slot_dir)
    except CalibrationRefused as exc:
        reason, detail = _overlay_reason(exc)
        return _bad(reason, f"slot {name}: calibration {mk.version}: {detail}")
    except ModelError as exc:
        return _bad("slot_model_manifest", f"slot {name}: {exc}")
    if doc.get("version") != mk.version or overlay_seq(mk.version) != (manifest.version, seq):
        return _bad(
            "overlay_binding",
            f"slot {name}: {MARKER} says {mk.version!r}, the signed overlay {doc.get('version')!r}",
        )
    return dataclasses.replace(
        base,
        version=mk.version,
        message=f"{base.message}; calibration {mk.version} signed by this device",
    )
