"""Start-up recovery of one model's slots: read its record, finish or undo what a crash cut
short, and trust a slot only after it re-verifies from its signed manifest.

Theory of operation
-------------------
For every configured model (SlotRepository.__aenter__, before the models host loads):

1. read `state.json` (a corrupt one is moved aside and the record rebuilt from the slot
   markers, keeping only slots that pass slotcheck.verify_slot, with the signed manifest's
   version, bundle id and counter); no record but a `current` link: rebuild; nothing at
   all: a fresh record;
2. first start (no active slot): seed slot `a` from the shipped model directory;
3. apply the recovery table (machine.recover): the file-system actions (PERSIST first,
   FLIP `current` to the committed slot, SYNC_SLOTS, INVALIDATE, DISCARD) run here, off the
   event loop; the actions that need running models or the counter (PRECHECK,
   RESUME_TRIAL, RATCHET) are returned as deferred work for the updates component;
4. re-verify the slots (slotcheck.verify_slot: the stored signed manifest under the
   CURRENT keyring, every file hash, nothing extra; the packaged model's seed against the
   package; a calibrated `X+cal.N` slot's overlay against THIS device's identity key, the
   model manifest and the signed adaptation policy: a failing overlay quarantines the
   slot with its reason and the previous slot, the base model, runs). The marker `slot.json` is unsigned, so it is never trusted alone. A slot that
   fails is QUARANTINED: its marker is removed (it can never be flipped to), the record
   keeps `quarantined[slot] = Failure(reason, message)` and `last_failure`, and the error
   is logged. If it was the active slot, the other slot runs if IT verifies, else the
   packaged model is seeded again (and verified). The other slot is checked too when no
   update is in flight (an in-flight candidate is checked by its precheck).

With no usable keyring (keyring below its floor) every signed slot fails
(`slot_no_keyring`) and the packaged model runs: revoked keys must not vouch for slots.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import structlog

from edgerund.ports import EventSink
from edgerund.updates import fsutil, machine
from edgerund.updates.keyring import Keyring
from edgerund.updates.slotcheck import SHIPPED, SlotVerdict, verify_slot
from edgerund.updates.slots import SLOTS, SlotStore

log = structlog.get_logger("edgerund.updates")

DEFERRED = frozenset(
    {machine.ActionKind.PRECHECK, machine.ActionKind.RESUME_TRIAL, machine.ActionKind.RATCHET}
)


def publish_state(events: EventSink, name: str, rec: machine.Record) -> None:
    """Log and publish a persisted state (update.state; update.result when terminal)."""
    d = rec.deployment
    fields: dict[str, object] = {"state": str(rec.state), "version": d.version if d else None}
    if (
        rec.state in (machine.State.REJECTED, machine.State.ROLLED_BACK)
        and rec.last_failure is not None
    ):
        fields.update(reason=rec.last_failure.reason, message=rec.last_failure.message)
    log.info("update_state", model=name, **fields)
    events.publish("update.state", name, **fields)
    if rec.state in (machine.State.COMMITTED, machine.State.ROLLED_BACK, machine.State.REJECTED):
        events.publish("update.result", name, result=str(rec.state), **fields)


class SlotChecker:
    """slotcheck.verify_slot for one model's slots, off the event loop."""

    def __init__(
        self,
        store: SlotStore,
        shipped: Path,
        keyring: Keyring | None,
        device_key: str | None = None,
    ) -> None:
        self.store = store
        self.shipped = shipped
        self.keyring = keyring
        self.device_key = device_key

    async def __call__(self, slot: str) -> SlotVerdict:
        return await asyncio.to_thread(
            verify_slot,
            self.store.dir(slot),
            self.keyring,
            model=self.store.name,
            shipped_dir=self.shipped,
            device_key=self.device_key,
        )


async def recover_model(
    store: SlotStore,
    shipped: Path,
    *,
    attempts: int,
    events: EventSink,
    keyring: Keyring | None,
    device_key: str | None = None,
) -> tuple[machine.Record, list[machine.Action]]:
    """The recovered record of `store`'s model and the deferred actions (see module doc)."""
    name = store.name
    check = SlotChecker(store, shipped, keyring, device_key)
    rec, note = await asyncio.to_thread(store.load_record)
    if note and rec is not None:
        log.error("update_state_corrupt", model=name, action="moved to state.json.broken, rebuilt")
        rec = await _reverify_rebuilt(store, rec, check)
    if rec is None:
        if fsutil.read_link(store.current) is not None:
            rebuilt = await asyncio.to_thread(store.rebuild_record)
            rec = await _reverify_rebuilt(store, rebuilt, check)
        else:
            rec = machine.Record(model=name)
    if rec.active is None:
        rec = await seed(store, shipped, rec)
    new, actions = machine.recover(rec, max_attempts=attempts, now=time.time())
    if new.state != rec.state:
        log.warning(
            "update_recovered",
            model=name,
            found=str(rec.state),
            now=str(new.state),
            table=machine.RECOVERY[rec.state],
        )
    deferred: list[machine.Action] = []
    for action in actions:
        if action.kind in DEFERRED:
            deferred.append(action)
        else:
            await _apply(store, new, action, events)
    active = new.active
    if active is not None:
        verdict = await check(active)
        if not verdict.ok:
            new = await _active_quarantined(store, shipped, new, active, verdict, check)
    if new.state not in machine.IN_FLIGHT and new.active is not None:
        other = machine.other(new.active)
        if new.slots.get(other) is not None:
            verdict = await check(other)
            if not verdict.ok:
                new = _quarantine(new, other, verdict)
                await asyncio.to_thread(store.invalidate, other)
                await asyncio.to_thread(store.save_record, new)
                _log_quarantine(name, other, verdict, now_active=new.active)
    return new, deferred


def _quarantine(rec: machine.Record, slot: str, verdict: SlotVerdict) -> machine.Record:
    fail = machine.Failure(
        reason=verdict.reason or "slot_corrupt",
        message=verdict.message,
        state=str(rec.state),
        version=(rec.slots.get(slot) or _NO_INFO).version,
        at=time.time(),
    )
    slots = dict(rec.slots)
    slots[slot] = None
    q = dict(rec.quarantined)
    q[slot] = fail
    return msgspec.structs.replace(rec, slots=slots, quarantined=q, last_failure=fail)


def _log_quarantine(name: str, slot: str, v: SlotVerdict, *, now_active: str | None) -> None:
    log.error(
        "update_slot_quarantined",
        model=name,
        slot=slot,
        reason=v.reason,
        message=v.message,
        now_active=now_active,
    )


async def _reverify_rebuilt(
    store: SlotStore, rec: machine.Record, check: SlotChecker
) -> machine.Record:
    """A record rebuilt from the (unsigned) markers keeps only the slots that verify, with
    what the signed manifest says rather than what the marker says."""
    slots = dict(rec.slots)
    quarantined = dict(rec.quarantined)
    for s in SLOTS:
        mk = await asyncio.to_thread(store.marker, s)
        if mk is None:
            slots[s] = None
            continue
        v = await check(s)
        if not v.ok:
            slots[s] = None
            quarantined[s] = machine.Failure(
                reason=v.reason or "slot_corrupt", message=v.message, state="IDLE", at=time.time()
            )
            await asyncio.to_thread(store.invalidate, s)
            _log_quarantine(store.name, s, v, now_active=None)
            continue
        slots[s] = machine.SlotInfo(
            version=v.version or mk.version,
            bundle_id=v.bundle_id or mk.bundle_id,
            security_counter=v.security_counter or 0,
            manifest_sha256=v.manifest_sha256 or "",
            created=mk.created,
        )
    active = rec.active if rec.active is not None and slots.get(rec.active) else None
    if active is None:
        valid = [s for s in SLOTS if slots.get(s) is not None]
        active = valid[0] if valid else None
    new = msgspec.structs.replace(rec, slots=slots, active=active, quarantined=quarantined)
    if active is not None:
        await asyncio.to_thread(store.flip, active)
    await asyncio.to_thread(store.save_record, new)
    return new


_NO_INFO = machine.SlotInfo(version="", bundle_id="", security_counter=0, manifest_sha256="")


async def _apply(
    store: SlotStore, rec: machine.Record, action: machine.Action, events: EventSink
) -> None:
    kind = action.kind
    if kind is machine.ActionKind.PERSIST:
        await asyncio.to_thread(store.save_record, rec)
        publish_state(events, store.name, rec)
    elif kind is machine.ActionKind.FLIP:
        assert action.slot is not None
        await asyncio.to_thread(store.flip, action.slot)
    elif kind is machine.ActionKind.SYNC_SLOTS:
        dep = rec.deployment
        keep = dep.target if (dep is not None and rec.state in machine.IN_FLIGHT) else None
        await asyncio.to_thread(store.sync_slots, rec, keep)
    elif kind is machine.ActionKind.INVALIDATE:
        assert action.slot is not None
        await asyncio.to_thread(store.invalidate, action.slot)
    elif kind is machine.ActionKind.DISCARD:
        await asyncio.to_thread(store.clean_staging)
    else:
        raise AssertionError(f"recovery does not run {action}")


async def seed(store: SlotStore, shipped: Path, rec: machine.Record) -> machine.Record:
    """Copy the shipped model into slot `a` (first start, or nothing valid is left)."""
    if not await asyncio.to_thread(shipped.is_dir):
        log.warning("update_no_shipped_model", model=store.name, path=str(shipped))
        return rec
    info = await asyncio.to_thread(store.seed, shipped, "a")
    slots = dict(rec.slots)
    slots["a"] = info
    # The seeded slot holds the package now: a quarantine of its old content is history
    # (last_failure keeps the reason).
    quarantined = {k: v for k, v in rec.quarantined.items() if k != "a"}
    rec = machine.Record(
        model=store.name,
        active="a",
        slots=slots,
        last_failure=rec.last_failure,
        quarantined=quarantined,
    )
    await asyncio.to_thread(store.save_record, rec)
    log.info("update_seeded", model=store.name, version=info.version, source=str(shipped))
    return rec


async def _active_quarantined(
    store: SlotStore,
    shipped: Path,
    rec: machine.Record,
    active: str,
    verdict: SlotVerdict,
    check: SlotChecker,
) -> machine.Record:
    """The active slot failed verification: quarantine it, run the other slot if it
    verifies, else seed the packaged model again."""
    info = rec.slots.get(active)
    q = _quarantine(rec, active, verdict)
    fail = q.last_failure
    await asyncio.to_thread(store.invalidate, active)
    other = machine.other(active)
    new: machine.Record | None = None
    if rec.slots.get(other) is not None:
        ov = await check(other)
        if ov.ok:
            new = msgspec.structs.replace(
                q, active=other, last_result="ROLLED_BACK", state=machine.State.ROLLED_BACK
            )
        else:
            q = _quarantine(q, other, ov)
            await asyncio.to_thread(store.invalidate, other)
            _log_quarantine(store.name, other, ov, now_active=None)
            fail = machine.Failure(
                reason=verdict.reason or "slot_corrupt",
                message=f"{verdict.message}; {ov.message}",
                state=str(rec.state),
                at=time.time(),
            )
    if new is None:
        fresh = machine.Record(
            model=store.name,
            slots={"a": None, "b": None},
            last_failure=fail,
            quarantined=q.quarantined,
        )
        new = await seed(store, shipped, fresh)
        if new.active is not None:
            sv = await check(new.active)
            if not sv.ok:  # the package itself is unreadable: nothing trustworthy to run
                log.error("update_shipped_unverifiable", model=store.name, message=sv.message)
    await asyncio.to_thread(store.save_record, new)
    if new.active:
        await asyncio.to_thread(store.flip, new.active)
    await asyncio.to_thread(store.sync_slots, new)
    package_changed = (
        verdict.reason == "slot_shipped_mismatch"
        and info is not None
        and info.bundle_id == SHIPPED
        and new.active is not None
        and (new.slots.get(new.active) or _NO_INFO).bundle_id == SHIPPED
    )
    if package_changed:
        # The packaged model changed (a package upgrade): re-seeding is routine.
        log.info("update_shipped_reseeded", model=store.name, slot=active, message=verdict.message)
    else:
        _log_quarantine(store.name, active, verdict, now_active=new.active)
    return new
