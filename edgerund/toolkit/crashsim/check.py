"""Materialise crash states and run the daemon's own start-up recovery on each (I/O).

update states: the state directory is rebuilt under a scratch copy and handed to the
    slot repository exactly as the composition root enters it (`daemon.build_slots`,
    `async with`: keyring load, record load or rebuild, seeding, the recovery table, the
    re-hash of the active slot). Consistent means: recovery did not raise; the active
    slot's marker verifies (SlotStore.verify_slot re-hashes every file); the active model
    is the old one (every file hash equals the shipped model's) or the new one (every file
    hash equals the signed bundle manifest's); once the daemon had answered COMMITTED
    (the `committed` marker) it is the new one and the security counter is ratcheted, and
    once it had answered the manual rollback, the old one again.
spool states: the spool directory is opened with the daemon's Spool (quarantine of a
    corrupt database included). Consistent means: every batch whose append future had
    resolved before the crash point is there with the same payload.

`run` samples (deterministically) or checks all distinct states and returns the figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerund.toolkit.crashsim import fsmodel, record
from edgerund.toolkit.crashsim.fsmodel import CrashState, Op, StateKey
from edgerund.toolkit.crashsim.record import Recording


@dataclass
class Verdict:
    ok: bool
    detail: str


@dataclass
class Report:
    scenario: str
    ops: int
    barriers: int
    states_generated: int
    states_distinct: int
    states_checked: int = 0
    inconsistent: list[tuple[CrashState, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "ops": self.ops,
            "barriers": self.barriers,
            "states_generated": self.states_generated,
            "states_distinct": self.states_distinct,
            "states_checked": self.states_checked,
            "states_inconsistent": len(self.inconsistent),
            "seconds": round(self.seconds, 1),
        }


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- update ---------------------------------------------------------------------------------


def keep_update_op(root: Path) -> Callable[[Op], bool]:
    prefixes = tuple(str(root / d) for d in ("models", "updates"))

    def keep(op: Op) -> bool:
        return op.path.startswith(prefixes)

    return keep


def _update_config(state: Path) -> Any:
    import yaml

    from edgerund.config.loader import parse_config
    from edgerund.toolkit.daemonproc import base_config, merge

    doc = merge(base_config(state.parent), record.update_overrides())
    doc["paths"]["state_dir"] = str(state)
    return parse_config(yaml.safe_dump(doc))


async def _recover(state: Path) -> Any:
    from edgerund import daemon
    from edgerund.context import EventBus

    cfg = _update_config(state)
    # The builder the composition root calls (wherever daemon.py imports it from).
    build_slots: Callable[..., Any] = vars(daemon)["build_slots"]
    slots = build_slots(cfg, events=EventBus())
    assert slots is not None
    async with slots:
        return slots.active(record.MODEL)


def check_update_state(
    state: Path,
    old: dict[str, str],
    new: dict[str, str],
    must_be: str | None,
    committed: bool,
    trial: dict[str, str] | None = None,
) -> Verdict:
    """must_be: "new", "old" or None (either); committed: the counter must be ratcheted;
    trial: the signed files of the probation-failing bundle, when a crash point lies in
    its trial (recovery may resume that trial: a third acceptable model). The models
    share their model file, so each is told apart by the version its signed manifest
    names as well as by its files."""
    from edgerund.updates.slots import SlotStore

    try:
        active = asyncio.run(_recover(state))
    except Exception as exc:  # any failure of recovery is an inconsistency to report
        return Verdict(False, f"recovery raised {type(exc).__name__}: {exc}")
    if active is None or active.active_slot is None or active.model_dir is None:
        return Verdict(False, f"no active model after recovery: {active}")
    store = SlotStore(state / "models" / record.MODEL, record.MODEL)
    if not store.verify_slot(active.active_slot, quiet=True):
        return Verdict(False, f"active slot {active.active_slot} does not verify")
    mdir = Path(active.model_dir)

    def matches(expect: dict[str, str]) -> bool:
        try:
            return all(_sha(mdir / rel) == sha for rel, sha in expect.items())
        except OSError:
            return False

    version = active.version
    is_new = matches(new) and version == record.NEW_VERSION
    is_old = matches(old) and version == record.shipped_version()
    is_trial = trial is not None and matches(trial) and version == record.PROBATION_VERSION
    if must_be == "new" and not is_new:
        return Verdict(False, f"committed update lost: active {active.version} in {mdir.name}")
    if must_be == "old" and not is_old:
        return Verdict(False, f"rollback lost: active {active.version} in {mdir.name}")
    if committed:
        # The anti-rollback counter must not fall back below the committed bundle's.
        try:
            value = int((state / "updates" / "security_counter").read_text().strip())
        except (OSError, ValueError):
            value = 0
        if value < record.NEW_COUNTER:
            return Verdict(False, f"security counter {value} < committed {record.NEW_COUNTER}")
    if not (is_new or is_old or is_trial):
        return Verdict(False, f"active {active.version} in {mdir.name} is no expected model")
    return Verdict(True, "new" if is_new else "trial" if is_trial else "old")


# -- spool ----------------------------------------------------------------------------------


def check_spool_state(root: Path, committed: dict[int, str]) -> Verdict:
    from edgerund.telemetry.codec import Cls
    from edgerund.telemetry.spool import Spool

    try:
        sp = Spool(root, **record.spool_open_args())
        sp.open()
        try:
            rows = []
            for cls in Cls:
                rows += sp.fetch(cls, 0, 100000).result(timeout=30)
            quarantined = list(sp.stats.quarantined)
        finally:
            sp.close()
    except Exception as exc:
        return Verdict(False, f"spool open raised {type(exc).__name__}: {exc}")
    have = {r.seq: hashlib.sha256(r.payload).hexdigest() for r in rows}
    # fetch lists the backlog; acknowledged rows are kept too: read them directly.
    db = root / "spool.db"
    if db.exists():
        have.update(record.spool_rows(db))
    lost = [s for s, h in committed.items() if have.get(s) != h]
    if lost:
        return Verdict(False, f"committed batches lost: {lost} (quarantined: {quarantined})")
    return Verdict(True, f"{len(committed)} committed present")


# -- driver -----------------------------------------------------------------------------------


def distinct(rec: Recording, ops: list[Op]) -> tuple[int, dict[StateKey, CrashState]]:
    seen: dict[StateKey, CrashState] = {}
    n = 0
    for st in fsmodel.crash_states(rec.initial, ops):
        n += 1
        prev = seen.get(st.key)
        # Keep the LATEST crash point of equal states: it carries the strictest promise
        # (more markers reached).
        if prev is None or st.point > prev.point:
            seen[st.key] = st
    return n, seen


def _sample(states: list[CrashState], limit: int | None, seed: int = 12) -> list[CrashState]:
    if limit is None or len(states) <= limit:
        return states
    rnd = random.Random(seed)
    # Always the prefix/durable states at the end (the committed promise), then a sample.
    tail = sorted(states, key=lambda s: s.point)[-5:]
    rest = [s for s in states if s not in tail]
    return tail + rnd.sample(rest, limit - len(tail))


def run_update(
    work: Path,
    *,
    limit: int | None = None,
    recording: tuple[Recording, dict[str, str], dict[str, str]] | None = None,
    keep_failed: Path | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    t0 = time.monotonic()
    rec, new, trial = recording or record.record_update(work / "rec-update")
    old = record.shipped_hashes()
    ops, markers = fsmodel.filter_ops(rec.ops, rec.markers, keep_update_op(rec.root))
    never = len(ops) + 1
    at = {name: pos for name, pos in markers}
    commit_at = at.get("committed", never)
    rb_req, rb_done = at.get("rollback_requested", never), at.get("rolled_back", never)

    rejected, sent = at.get("rejected", never), at.get("update_sent", never)
    trial_sent, auto_rb = at.get("probation_sent", never), at.get("auto_rolled_back", never)

    def promise(point: int) -> str | None:
        if rejected <= point < trial_sent:
            return "old"  # the rejected bundle never became active
        if auto_rb <= point < sent:
            return "old"  # the daemon's own probation rollback was answered
        if trial_sent <= point < auto_rb:
            return None  # the trial in flight: old, or the trial resumed at start-up
        if point >= rb_done:
            return "old"
        if commit_at <= point < rb_req:
            return "new"
        return None  # before the answer, or while the rollback is in flight: either

    generated, seen = distinct(rec, ops)
    states = _sample(list(seen.values()), limit)
    rep = Report(
        "update",
        len(ops),
        sum(o.is_barrier for o in ops),
        generated,
        len(seen),
    )
    log(
        f"  update: {len(ops)} ops ({rep.barriers} barriers), {generated} crash states, "
        f"{len(seen)} distinct, checking {len(states)} (recorded in {rec.seconds:.1f} s)"
    )
    scratch = Path(tempfile.mkdtemp(prefix="crashsim-u-"))
    try:
        for st in states:
            d = scratch / "state"
            d.mkdir()
            fsmodel.materialise(rec.initial, ops, st.key, d)
            in_trial = trial_sent <= st.point < auto_rb
            v = check_update_state(
                d,
                old,
                new,
                must_be=promise(st.point),
                committed=st.point >= commit_at,
                trial=trial if in_trial else None,
            )
            rep.states_checked += 1
            if not v.ok:
                _inconsistent(rep, st, v.detail, rec, ops, keep_failed, "update", log)
            shutil.rmtree(d)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rep.seconds = time.monotonic() - t0
    return rep


def _inconsistent(
    rep: Report,
    st: CrashState,
    detail: str,
    rec: Recording,
    ops: list[Op],
    keep_failed: Path | None,
    kind: str,
    log: Callable[[str], None],
) -> None:
    """Count and log one inconsistent state; keep a copy of it for a post-mortem."""
    rep.inconsistent.append((st, detail))
    log(f"  INCONSISTENT at op {st.point} ({st.how}): {detail}")
    if keep_failed is not None:
        dest = keep_failed / f"{kind}-{st.point}-{st.how.replace(':', '_')}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        fsmodel.materialise(rec.initial, ops, st.key, dest)


def run_spool(
    work: Path,
    *,
    limit: int | None = None,
    recording: Recording | None = None,
    keep_failed: Path | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    t0 = time.monotonic()
    rec = recording or record.record_spool(work / "rec-spool")
    final = record.spool_rows(rec.root / "spool" / "spool.db")
    ops, markers = rec.ops, rec.markers
    appended = [
        (int(name.split("-", 1)[1]), at) for name, at in markers if name.startswith("append-")
    ]
    generated, seen = distinct(rec, ops)
    states = _sample(list(seen.values()), limit)
    rep = Report("spool", len(ops), sum(o.is_barrier for o in ops), generated, len(seen))
    log(
        f"  spool: {len(ops)} ops ({rep.barriers} barriers), {generated} crash states, "
        f"{len(seen)} distinct, checking {len(states)}"
    )
    scratch = Path(tempfile.mkdtemp(prefix="crashsim-s-"))
    try:
        for st in states:
            d = scratch / "state"
            d.mkdir()
            fsmodel.materialise(rec.initial, ops, st.key, d)
            committed = {s: final[s] for s, at in appended if at <= st.point and s in final}
            v = check_spool_state(d / "spool", committed)
            rep.states_checked += 1
            if not v.ok:
                _inconsistent(rep, st, v.detail, rec, ops, keep_failed, "spool", log)
            shutil.rmtree(d)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rep.seconds = time.monotonic() - t0
    return rep
