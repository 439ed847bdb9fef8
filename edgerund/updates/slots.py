"""The A/B slot store of one model (blocking I/O; the component calls it off the loop).

On disk, under `<state_dir>/models/<name>/`:

    a/ b/          the two slots; each holds the payload files, manifest.json (the
                   inference runtime's manifest), bundle.json + bundle.sig (the signed
                   bundle manifest, kept for audit) and, LAST, slot.json (the validity
                   marker listing every file's size and sha256)
    current        symlink -> "a" or "b": the single commit point, flipped by rename
    state.json     the update record (edgerund.updates.machine.Record)
    staging/       extraction area of the bundle being installed

A device calibration (edgerund.inference.overlay) is installed the same way: the active
slot's files are copied into staging with `calibration.json` + `calibration.sig` beside
them (`prepare_calibration`), then moved into the inactive slot with a marker whose
version is `X+cal.N` (`install_calibration`); the publisher-signed files are unchanged.

Rules: the active slot is never written; the inactive slot loses its marker (fsync) before
anything in it changes; a slot is used only when its marker exists and every file re-hashes
to the marker (re-hash at load, so a corrupted or tampered slot is never run).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import msgspec

from edgerund.errors import TrustError
from edgerund.updates import fsutil
from edgerund.updates.bundle import hash_file
from edgerund.updates.machine import Failure, Record, SlotInfo
from edgerund.updates.manifest import BundleManifest

SLOTS = ("a", "b")
MARKER = "slot.json"


class MarkerFile(msgspec.Struct, kw_only=True):
    version: str
    bundle_id: str
    security_counter: int
    manifest_sha256: str
    created: float | None = None
    files: dict[str, list[Any]]  # path -> [size, sha256]


class SlotStore:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.current = root / "current"
        self.state_path = root / "state.json"
        self.staging = root / "staging"

    def dir(self, slot: str) -> Path:
        assert slot in SLOTS, slot
        return self.root / slot

    # -- record -------------------------------------------------------------------------
    def load_record(self) -> tuple[Record | None, str | None]:
        """(record, note). A corrupt state.json is moved to state.json.broken and the record
        rebuilt from the slot markers and `current`; note says so."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            rec = msgspec.json.decode(data, type=Record)
            if rec.model != self.name or set(rec.slots) != set(SLOTS):
                raise msgspec.ValidationError("record belongs to another model or has bad slots")
            return rec, None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            broken = self.state_path.with_name("state.json.broken")
            os.replace(self.state_path, broken)
            fsutil.fsync_dir(self.root)
            rec = self.rebuild_record()
            rec.last_failure = Failure(
                reason="state_corrupt",
                message=f"state.json was unreadable ({exc}); moved to {broken.name}, rebuilt from the slots",
                state="IDLE",
                at=time.time(),
            )
            self.save_record(rec)
            return rec, "state_corrupt"

    def rebuild_record(self) -> Record:
        rec = Record(model=self.name)
        for s in SLOTS:
            mk = self.marker(s)
            if mk is not None and self.verify_slot(s, quiet=True):
                rec.slots[s] = SlotInfo(
                    version=mk.version,
                    bundle_id=mk.bundle_id,
                    security_counter=mk.security_counter,
                    manifest_sha256=mk.manifest_sha256,
                    created=mk.created,
                )
        cur = fsutil.read_link(self.current)
        if cur in SLOTS and rec.slots.get(cur) is not None:
            rec.active = cur
        else:
            valid = [s for s in SLOTS if rec.slots.get(s) is not None]
            rec.active = valid[0] if valid else None
        return rec

    def save_record(self, rec: Record) -> None:
        fsutil.make_dirs(self.root)
        fsutil.atomic_write(
            self.state_path, msgspec.json.format(msgspec.json.encode(rec), indent=2)
        )

    # -- markers ------------------------------------------------------------------------
    def marker(self, slot: str) -> MarkerFile | None:
        try:
            return msgspec.json.decode((self.dir(slot) / MARKER).read_bytes(), type=MarkerFile)
        except (OSError, msgspec.ValidationError, msgspec.DecodeError):
            return None

    def invalidate(self, slot: str) -> None:
        p = self.dir(slot) / MARKER
        try:
            os.unlink(p)
        except FileNotFoundError:
            return
        fsutil.fsync_dir(p.parent)

    def verify_slot(self, slot: str, *, quiet: bool = False) -> bool:
        """Re-hash every file of the slot against its marker."""
        mk = self.marker(slot)
        try:
            if mk is None:
                raise TrustError("slot_invalid", f"slot {slot} has no valid {MARKER}")
            for rel, (size, sha) in mk.files.items():
                d = hash_file(self.dir(slot) / rel)
                if d.size != size or d.sha256 != sha:
                    raise TrustError(
                        "slot_corrupt", f"slot {slot}: {rel} does not match its marker"
                    )
        except (TrustError, OSError):
            if quiet:
                return False
            raise
        return True

    # -- writing ------------------------------------------------------------------------
    def reset_staging(self) -> Path:
        fsutil.remove_tree(self.staging)
        self.staging.mkdir(parents=True)
        return self.staging

    def clean_staging(self) -> None:
        fsutil.remove_tree(self.staging)

    def install_staging(
        self,
        slot: str,
        manifest: BundleManifest,
        manifest_sha256: str,
        manifest_bytes: bytes,
        sig_bytes: bytes,
        created: float | None,
    ) -> None:
        """Move the verified staging directory into `slot` (the inactive one)."""
        cur = fsutil.read_link(self.current)
        if cur == slot:
            raise RuntimeError(f"refusing to write the active slot {slot}")
        self.invalidate(slot)
        fsutil.abort_point("STAGE.invalidated")
        st = self.staging
        extras = {"bundle.json": manifest_bytes, "bundle.sig": sig_bytes}
        if manifest.model_manifest is not None:
            extras["manifest.json"] = json.dumps(
                manifest.model_manifest, indent=2, sort_keys=True
            ).encode()
        for rel, data in extras.items():
            fsutil.atomic_write(st / rel, data)
        files = {f.path: [f.size, f.sha256] for f in manifest.files}
        for rel in extras:
            d = hash_file(st / rel)
            files[rel] = [d.size, d.sha256]
        fsutil.remove_tree(self.dir(slot))
        os.replace(st, self.dir(slot))
        fsutil.fsync_dir(self.root)
        fsutil.abort_point("STAGE.moved")
        mk = MarkerFile(
            version=manifest.version,
            bundle_id=manifest.bundle_id,
            security_counter=manifest.security_counter,
            manifest_sha256=manifest_sha256,
            created=created,
            files=files,
        )
        fsutil.atomic_write(self.dir(slot) / MARKER, msgspec.json.encode(mk))

    def prepare_calibration(self, src_slot: str, overlay: dict[str, bytes]) -> None:
        """Staging := the files of `src_slot` (the running model, less its marker and any
        previous overlay) + the overlay files `overlay` (name -> bytes), every file and
        directory fsynced (blocking)."""
        src = self.dir(src_slot)
        st = self.reset_staging()
        holders = {st}
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            if p.is_symlink() or not p.is_file() or rel == MARKER or rel in overlay:
                continue
            fsutil.make_dirs((st / rel).parent)
            shutil.copyfile(p, st / rel)
            with open(st / rel, "rb") as fh:
                os.fsync(fh.fileno())
            holders.add((st / rel).parent)
        for rel, data in overlay.items():
            fsutil.atomic_write(st / rel, data)
        for holder in holders:
            fsutil.fsync_dir(holder)

    def install_calibration(self, slot: str, src_slot: str, version: str) -> None:
        """Move the prepared staging into `slot` (the inactive one) under a marker naming
        `version` (X+cal.N) and the signed identity of `src_slot`'s model."""
        cur = fsutil.read_link(self.current)
        if cur == slot:
            raise RuntimeError(f"refusing to write the active slot {slot}")
        src = self.marker(src_slot)
        if src is None:
            raise RuntimeError(f"slot {src_slot} has no marker to calibrate from")
        self.invalidate(slot)
        fsutil.abort_point("STAGE.invalidated")
        st = self.staging
        files: dict[str, list[Any]] = {}
        for p in sorted(st.rglob("*")):
            if p.is_file():
                d = hash_file(p)
                files[p.relative_to(st).as_posix()] = [d.size, d.sha256]
        fsutil.remove_tree(self.dir(slot))
        os.replace(st, self.dir(slot))
        fsutil.fsync_dir(self.root)
        fsutil.abort_point("STAGE.moved")
        mk = MarkerFile(
            version=version,
            bundle_id=src.bundle_id,
            security_counter=src.security_counter,
            manifest_sha256=src.manifest_sha256,
            created=src.created,
            files=files,
        )
        fsutil.atomic_write(self.dir(slot) / MARKER, msgspec.json.encode(mk))

    def seed(self, src: Path, slot: str = "a") -> SlotInfo:
        """First start: copy the shipped model directory into `slot` and point `current`
        at it. Its version is read from its manifest.json (`version`), counter 0."""
        if not src.is_dir():
            raise FileNotFoundError(f"shipped model directory {src} does not exist")
        fsutil.make_dirs(self.root)
        st = self.reset_staging()
        files: dict[str, list[Any]] = {}
        for p in sorted(src.rglob("*")):
            if not p.is_file() or p.name == MARKER:
                continue
            rel = p.relative_to(src).as_posix()
            fsutil.make_dirs((st / rel).parent)
            shutil.copyfile(p, st / rel)
            with open(st / rel, "rb") as fh:
                os.fsync(fh.fileno())
            d = hash_file(st / rel)
            files[rel] = [d.size, d.sha256]
        # Every directory holding a copied file (not only the top): their entries must be
        # durable before the slot marker says the slot is complete.
        for holder in {st, *((st / rel).parent for rel in files)}:
            fsutil.fsync_dir(holder)
        version = "0"
        try:
            mm = json.loads((st / "manifest.json").read_text())
            if isinstance(mm, dict) and mm.get("version") is not None:
                version = str(mm["version"])
        except (OSError, ValueError):
            pass
        if self.dir(slot).exists():
            self.invalidate(slot)
        fsutil.remove_tree(self.dir(slot))
        os.replace(st, self.dir(slot))
        fsutil.fsync_dir(self.root)
        mk = MarkerFile(
            version=version,
            bundle_id="shipped",
            security_counter=0,
            manifest_sha256="",
            created=None,
            files=files,
        )
        fsutil.atomic_write(self.dir(slot) / MARKER, msgspec.json.encode(mk))
        fsutil.flip_symlink(self.current, slot)
        return SlotInfo(
            version=version,
            bundle_id="shipped",
            security_counter=0,
            manifest_sha256="",
            created=None,
            installed_at=time.time(),
        )

    def flip(self, slot: str) -> None:
        fsutil.flip_symlink(self.current, slot)

    def sync_slots(self, rec: Record, keep: str | None = None) -> list[str]:
        """Remove markers of slots the record calls invalid (never the active one, nor
        `keep`: the staged candidate of a deployment being resumed)."""
        removed = []
        for s in SLOTS:
            if s in (rec.active, keep):
                continue
            if rec.slots.get(s) is None and self.marker(s) is not None:
                self.invalidate(s)
                removed.append(s)
        return removed
