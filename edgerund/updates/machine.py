"""The update state machine and the start-up recovery table (pure: events in, actions out).

Theory of operation
-------------------
Every model has one `Record` (persisted as `models/NAME/state.json`). The record's `state`
names the last step that was *decided*; the actions returned with it are the side effects
that follow from that decision, in order. The first action of every transition is PERSIST:
the I/O layer writes state.json (temp, fsync, rename, fsync dir) before doing anything else,
so after a power cut the record always tells what may have been half done, and the recovery
table says how to finish or undo it.

    IDLE/COMMITTED/ROLLED_BACK/REJECTED --receive--> RECEIVED  verify + extract to staging
    RECEIVED    --ok--> VERIFIED     stage: invalidate inactive slot, write, fsync, mark valid
    VERIFIED    --ok--> STAGED       precheck in a subprocess
    STAGED      --ok--> PRECHECKED   (decision point; the trial starts once models run)
    PRECHECKED  --ok--> TRIAL        attempts += 1; flip `current` to the candidate; swap
    TRIAL       --ok--> PROBATION    watch faults, NaN, missed ticks, score distribution
    PROBATION   --ok--> COMMITTED    candidate becomes active; then ratchet the counter
    COMMITTED   --ratcheted--> COMMITTED (ratcheted=True)
    RECEIVED|VERIFIED|STAGED|PRECHECKED --fail--> REJECTED(reason)  discard, invalidate
    TRIAL|PROBATION --fail|rollback--> ROLLED_BACK(reason)  flip back, swap back, invalidate
    COMMITTED|ROLLED_BACK|REJECTED|IDLE --rollback--> ROLLED_BACK("manual")  revert to the
                                                      other valid slot (by hand)

The counter is raised only after COMMITTED is persisted (MCUboot/TF-M: a revert must stay
possible until commit), and ratcheting to max(stored, bundle) is idempotent, so recovery can
simply redo it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import msgspec

from edgerund.errors import EdgerundError


class State(enum.StrEnum):
    IDLE = "IDLE"
    RECEIVED = "RECEIVED"
    VERIFIED = "VERIFIED"
    STAGED = "STAGED"
    PRECHECKED = "PRECHECKED"
    TRIAL = "TRIAL"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"


TERMINAL = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.REJECTED})
IN_FLIGHT = frozenset(set(State) - TERMINAL)


class ActionKind(enum.StrEnum):
    PERSIST = "persist"  # write state.json (always first)
    VERIFY = "verify"  # read the bundle, trust decision, extract to staging
    STAGE = "stage"  # invalidate target slot, copy staging into it, fsync, mark valid
    PRECHECK = "precheck"  # re-hash the slot, run the health precheck subprocess
    FLIP = "flip"  # point `current` at `slot` (symlink + rename + fsync dir)
    SWAP = "swap"  # models.swap(name, slot dir)
    WATCH = "watch"  # probation
    RATCHET = "ratchet"  # security counter := max(stored, deployment counter)
    INVALIDATE = "invalidate"  # remove `slot`'s validity marker
    SYNC_SLOTS = "sync_slots"  # make on-disk markers agree with the record (recovery)
    DISCARD = "discard"  # wipe staging
    RESUME_TRIAL = "resume_trial"  # once models run: fire "ok" from PRECHECKED


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    slot: str | None = None


class SlotInfo(msgspec.Struct, kw_only=True):
    version: str
    bundle_id: str
    security_counter: int
    manifest_sha256: str
    created: float | None = None
    installed_at: float = 0.0


class Deployment(msgspec.Struct, kw_only=True):
    # "bundle": a signed model bundle; "calibration": a device calibration of the active
    # model (version X+cal.N: its files + a device-signed overlay, steps.py)
    kind: str = "bundle"
    bundle_id: str = ""
    version: str = ""
    security_counter: int = 0
    manifest_sha256: str = ""
    created: float | None = None
    source: str = ""
    target: str = ""  # slot being written ("a" | "b")
    probation_s: float = 0.0
    received_at: float = 0.0


class Failure(msgspec.Struct, kw_only=True):
    reason: str
    message: str
    state: str  # the state in which it failed
    version: str = ""
    at: float = 0.0


class Record(msgspec.Struct, kw_only=True):
    schema: int = 1
    model: str
    state: State = State.IDLE
    active: str | None = None  # the committed slot `current` must point at
    slots: dict[str, SlotInfo | None] = msgspec.field(
        default_factory=lambda: {"a": None, "b": None}
    )
    deployment: Deployment | None = None
    attempts: int = 0
    writes: int = 0  # state.json writes in this deployment (loop breaker)
    ratcheted: bool = True
    last_result: str | None = None
    last_failure: Failure | None = None
    # Slots quarantined at start-up (slotcheck.verify_slot failed), with the reason; an
    # entry goes when a new bundle is staged into that slot.
    quarantined: dict[str, Failure] = msgspec.field(default_factory=dict)


EventKind = Literal["receive", "ok", "fail", "rollback", "ratcheted"]


@dataclass(frozen=True)
class Event:
    kind: EventKind
    reason: str = ""
    message: str = ""
    deployment: Deployment | None = None
    now: float = 0.0


class InvalidTransition(EdgerundError):
    def __init__(self, state: State, event: EventKind) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state}")
        self.state = state
        self.event = event


def other(slot: str | None) -> str:
    return "b" if slot == "a" else "a"


# --- THE transition table: (state, event) -> next state. Actions are derived below. -----
_ANY_TERMINAL = tuple(TERMINAL)
TABLE: dict[tuple[State, EventKind], State] = {
    **{(s, "receive"): State.RECEIVED for s in _ANY_TERMINAL},
    (State.RECEIVED, "ok"): State.VERIFIED,
    (State.VERIFIED, "ok"): State.STAGED,
    (State.STAGED, "ok"): State.PRECHECKED,
    (State.PRECHECKED, "ok"): State.TRIAL,
    (State.TRIAL, "ok"): State.PROBATION,
    (State.PROBATION, "ok"): State.COMMITTED,
    (State.COMMITTED, "ratcheted"): State.COMMITTED,
    **{
        (s, "fail"): State.REJECTED
        for s in (State.RECEIVED, State.VERIFIED, State.STAGED, State.PRECHECKED)
    },
    **{
        (s, "rollback"): State.REJECTED
        for s in (State.RECEIVED, State.VERIFIED, State.STAGED, State.PRECHECKED)
    },
    **{
        (s, ev): State.ROLLED_BACK
        for s in (State.TRIAL, State.PROBATION)
        for ev in ("fail", "rollback")
    },
    **{(s, "rollback"): State.ROLLED_BACK for s in _ANY_TERMINAL},
}


def allowed(state: State, kind: EventKind) -> bool:
    return (state, kind) in TABLE


def step(rec: Record, ev: Event) -> tuple[Record, list[Action]]:
    """Apply one event. Raises InvalidTransition for events the table does not allow."""
    nxt = TABLE.get((rec.state, ev.kind))
    if nxt is None:
        raise InvalidTransition(rec.state, ev.kind)
    dep = rec.deployment
    r = msgspec.structs.replace(rec, state=nxt, writes=rec.writes + 1)
    acts: list[Action] = [Action(ActionKind.PERSIST)]
    if ev.kind == "receive":
        assert ev.deployment is not None
        target = other(rec.active) if rec.active else "a"
        d = msgspec.structs.replace(ev.deployment, target=target)
        r = msgspec.structs.replace(r, deployment=d, attempts=0, writes=1)
        acts.append(Action(ActionKind.VERIFY))
    elif ev.kind == "ok":
        assert dep is not None
        if ev.deployment is not None:  # VERIFY learnt what the bundle is
            dep = msgspec.structs.replace(
                ev.deployment, target=dep.target, source=dep.source, received_at=dep.received_at
            )
            r = msgspec.structs.replace(r, deployment=dep)
        if nxt is State.VERIFIED:
            if dep.target in rec.quarantined:  # the slot is about to be rewritten
                q = {k: v for k, v in rec.quarantined.items() if k != dep.target}
                r = msgspec.structs.replace(r, quarantined=q)
            acts.append(Action(ActionKind.STAGE, dep.target))
        elif nxt is State.STAGED:
            acts.append(Action(ActionKind.PRECHECK, dep.target))
        elif nxt is State.PRECHECKED:
            acts.append(Action(ActionKind.RESUME_TRIAL, dep.target))
        elif nxt is State.TRIAL:
            r = msgspec.structs.replace(r, attempts=rec.attempts + 1)
            acts += [Action(ActionKind.FLIP, dep.target), Action(ActionKind.SWAP, dep.target)]
        elif nxt is State.PROBATION:
            acts.append(Action(ActionKind.WATCH, dep.target))
        elif nxt is State.COMMITTED:
            slots = dict(rec.slots)
            slots[dep.target] = SlotInfo(
                version=dep.version,
                bundle_id=dep.bundle_id,
                security_counter=dep.security_counter,
                manifest_sha256=dep.manifest_sha256,
                created=dep.created,
                installed_at=ev.now,
            )
            r = msgspec.structs.replace(
                r, active=dep.target, slots=slots, ratcheted=False, last_result=State.COMMITTED
            )
            acts += [Action(ActionKind.RATCHET), Action(ActionKind.DISCARD)]
    elif ev.kind == "ratcheted":
        r = msgspec.structs.replace(r, ratcheted=True, writes=rec.writes + 1)
    elif ev.kind in ("fail", "rollback"):
        reason = ev.reason or ("manual" if ev.kind == "rollback" else "failed")
        failure = Failure(
            reason=reason,
            message=ev.message,
            state=rec.state,
            version=dep.version if dep else "",
            at=ev.now,
        )
        r = msgspec.structs.replace(r, last_failure=failure, last_result=nxt)
        if rec.state in TERMINAL:
            # Manual revert to the other, still valid slot.
            back = other(rec.active)
            if rec.active is None or rec.slots.get(back) is None:
                raise InvalidTransition(rec.state, ev.kind)
            r = msgspec.structs.replace(r, active=back)
            acts += [Action(ActionKind.FLIP, back), Action(ActionKind.SWAP, back)]
        else:
            assert dep is not None
            if rec.state is State.RECEIVED:
                # Refused before staging: the inactive slot (the previous good model)
                # was never touched and stays available for a manual rollback.
                acts.append(Action(ActionKind.DISCARD))
                return r, acts
            slots = dict(rec.slots)
            slots[dep.target] = None
            r = msgspec.structs.replace(r, slots=slots)
            if rec.state in (State.TRIAL, State.PROBATION):
                active = rec.active or other(dep.target)
                acts += [Action(ActionKind.FLIP, active), Action(ActionKind.SWAP, active)]
            acts += [Action(ActionKind.INVALIDATE, dep.target), Action(ActionKind.DISCARD)]
    return r, acts


# --- Start-up recovery: the record found on disk -> the record to persist + actions. ------
RECOVERY: dict[State, str] = {
    State.IDLE: "nothing in flight: current -> active slot, markers synced",
    State.RECEIVED: "discard: staging wiped, REJECTED(interrupted); the inactive slot was not touched yet",
    State.VERIFIED: "discard: staging wiped, half-written target slot invalidated, REJECTED(interrupted)",
    State.STAGED: "resume: current -> active; re-hash the target slot and rerun the precheck",
    State.PRECHECKED: "resume: current -> active; re-hash the target slot and rerun the precheck",
    State.TRIAL: "attempts < max: current -> active, retry the trial once models run; else ROLLED_BACK(crash_loop)",
    State.PROBATION: "attempts < max: current -> active, retry the trial once models run; else ROLLED_BACK(crash_loop)",
    State.COMMITTED: "current -> active (the new slot); redo the counter ratchet if not done",
    State.ROLLED_BACK: "current -> active (the old slot); the failed slot's marker removed",
    State.REJECTED: "current -> active; staging wiped",
}


def recover(rec: Record, *, max_attempts: int, now: float) -> tuple[Record, list[Action]]:
    """What to do at start-up with the record found on disk (see RECOVERY)."""
    base = [Action(ActionKind.FLIP, rec.active)] if rec.active else []
    base.append(Action(ActionKind.SYNC_SLOTS))
    st = rec.state
    dep = rec.deployment
    if st in (State.RECEIVED, State.VERIFIED) or (st in IN_FLIGHT and dep is None):
        r, acts = step(
            rec,
            Event("fail", reason="interrupted", message=f"daemon stopped during {st}", now=now),
        )
        return r, [*acts, *base]
    if st in (State.STAGED, State.PRECHECKED):
        assert dep is not None
        r = msgspec.structs.replace(rec, state=State.STAGED, writes=rec.writes + 1)
        return r, [Action(ActionKind.PERSIST), *base, Action(ActionKind.PRECHECK, dep.target)]
    if st in (State.TRIAL, State.PROBATION):
        assert dep is not None
        if rec.attempts >= max_attempts:
            r, acts = step(
                rec,
                Event(
                    "fail",
                    reason="crash_loop",
                    message=f"daemon stopped {rec.attempts} time(s) during {st}; giving up",
                    now=now,
                ),
            )
            # The FLIP/SWAP of step() target the active slot; SWAP is moot at start-up
            # (models have not loaded yet and will load `current`).
            return r, [a for a in acts if a.kind is not ActionKind.SWAP] + base[1:]
        r = msgspec.structs.replace(rec, state=State.PRECHECKED, writes=rec.writes + 1)
        return r, [Action(ActionKind.PERSIST), *base, Action(ActionKind.RESUME_TRIAL, dep.target)]
    if st is State.COMMITTED and not rec.ratcheted:
        return rec, [*base, Action(ActionKind.RATCHET), Action(ActionKind.DISCARD)]
    return rec, [*base, Action(ActionKind.DISCARD)]


def summary(rec: Record) -> dict[str, object]:
    """The status/`models-slots` view of one record."""
    d = rec.deployment
    lf = rec.last_failure
    return {
        "name": rec.model,
        "state": str(rec.state),
        "active_slot": rec.active,
        "version": (rec.slots.get(rec.active) or _EMPTY).version if rec.active else None,
        "slots": {
            k: (
                None
                if v is None
                else {
                    "version": v.version,
                    "bundle_id": v.bundle_id,
                    "security_counter": v.security_counter,
                }
            )
            for k, v in sorted(rec.slots.items())
        },
        "candidate": None
        if d is None or rec.state in TERMINAL
        else {"version": d.version, "slot": d.target, "attempts": rec.attempts, "source": d.source},
        "last_result": rec.last_result,
        "last_failure": None
        if lf is None
        else {
            "reason": lf.reason,
            "message": lf.message,
            "state": lf.state,
            "version": lf.version,
            "at": lf.at,
        },
        "quarantined": {
            k: {"reason": q.reason, "message": q.message, "at": q.at}
            for k, q in sorted(rec.quarantined.items())
        },
    }


_EMPTY = SlotInfo(version="", bundle_id="", security_counter=0, manifest_sha256="")
