"""Start-up recovery of one model's slots: read its record, finish or undo what a crash cut
short, and trust the active slot only after it re-hashes.

Theory of operation
-------------------
For every configured model (SlotRepository.__aenter__, before the models host loads):

1. read `state.json` (a corrupt one is moved aside and the record rebuilt from the slot
   markers); no record but a `current` link: rebuild; nothing at all: a fresh record;
2. first start (no active slot): seed slot `a` from the shipped model directory;
3. apply the recovery table (machine.recover): the file-system actions (PERSIST first,
   FLIP `current` to the committed slot, SYNC_SLOTS, INVALIDATE, DISCARD) run here, off the
   event loop; the actions that need running models or the counter (PRECHECK,
   RESUME_TRIAL, RATCHET) are returned as deferred work for the updates component;
4. re-hash the active slot; a slot that fails is dropped (slot_corrupt): the other valid
   slot becomes active, or the shipped model is seeded again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import structlog

from edgerund.ports import EventSink
from edgerund.updates import fsutil, machine
from edgerund.updates.slots import SlotStore

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


async def recover_model(
    store: SlotStore, shipped: Path, *, attempts: int, events: EventSink
) -> tuple[machine.Record, list[machine.Action]]:
    """The recovered record of `store`'s model and the deferred actions (see module doc)."""
    name = store.name
    rec, note = await asyncio.to_thread(store.load_record)
    if note:
        log.error("update_state_corrupt", model=name, action="moved to state.json.broken, rebuilt")
    if rec is None:
        if fsutil.read_link(store.current) is not None:
            rec = await asyncio.to_thread(store.rebuild_record)
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
    if active is not None and not await asyncio.to_thread(store.verify_slot, active, quiet=True):
        new = await _active_corrupt(store, shipped, new, active)
    return new, deferred


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
    rec = machine.Record(model=store.name, active="a", slots=slots, last_failure=rec.last_failure)
    await asyncio.to_thread(store.save_record, rec)
    log.info("update_seeded", model=store.name, version=info.version, source=str(shipped))
    return rec


async def _active_corrupt(
    store: SlotStore, shipped: Path, rec: machine.Record, active: str
) -> machine.Record:
    other = machine.other(active)
    slots = dict(rec.slots)
    slots[active] = None
    fail = machine.Failure(
        reason="slot_corrupt",
        message=f"slot {active} failed its re-hash at start-up",
        state=str(rec.state),
        at=time.time(),
    )
    if rec.slots.get(other) is not None and await asyncio.to_thread(
        store.verify_slot, other, quiet=True
    ):
        new = machine.Record(
            model=store.name,
            active=other,
            slots=slots,
            last_failure=fail,
            last_result="ROLLED_BACK",
            state=machine.State.ROLLED_BACK,
        )
    else:
        new = machine.Record(model=store.name, slots={"a": None, "b": None}, last_failure=fail)
        await asyncio.to_thread(store.invalidate, active)
        new = await seed(store, shipped, new)
    await asyncio.to_thread(store.save_record, new)
    if new.active:
        await asyncio.to_thread(store.flip, new.active)
    await asyncio.to_thread(store.sync_slots, new)
    log.error("update_slot_corrupt", model=store.name, slot=active, now_active=new.active)
    return new
