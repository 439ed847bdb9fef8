"""Rollback on post-update drift: the decision (pure: a record and a drift verdict in, a
reason out; no I/O, no clock).

Theory of operation
-------------------
A bundle can pass every gate and still be wrong for this plant: its golden vectors are
reproduced, the probation sees no fault, no NaN and a score mean in range, and yet its
reference profile (what the publisher says normal looks like to *this* model) does not
match the plant, so the model will drift into false alarms or, worse, into blindness.
The drift monitor (edgerund.inference.drift) judges each model against its own signed
profile, features and score distribution. After a swap it starts afresh on the new
model, and the drift task keeps the replaced model's last verdict beside it
(ports.DriftStatus).

`decide` returns a rollback message when all of these hold, else None:

- `updates.post_update_drift_window_s` > 0 and the model's record is COMMITTED, its
  active slot committed at most that long ago (`SlotInfo.installed_at`, written when
  COMMITTED was decided), and the other slot still holds the previous model;
- the drift verdict is about that committed version and is `drift` (the features moved,
  or the score distribution left the profile, persistently: the monitor's own rules);
- the verdict on the model it replaced is about the other slot's version, was `ok` (or
  `anomaly`: a fault of the plant, not a mismatch of the profile) and rested on at least
  MIN_PREVIOUS_BLOCKS blocks (enough for the monitor to have called drift, had there
  been one): the previous model's profile matched the plant. A previous verdict of
  `drift`, `sensor_fault` or `no_profile` (a manifest without a profile) says nothing
  of the kind, and nothing is rolled back.

Then the updates component reverts to the previous slot through the same path as a
manual rollback (the target slot is re-verified first), with reason `post_update_drift`.
A rolled-back record is no longer COMMITTED, so this fires at most once per deployment;
a plant that really changed after an update (both models would drift) is told apart only
by the previous verdict, which was taken before the swap. The drift task persists that
verdict, so it survives a restart; when it is missing (a lost or corrupt file) nothing is
rolled back (the rule errs on the side of keeping a model the publisher signed and the
gate accepted).
"""

from __future__ import annotations

from edgerund.ports import DriftStatus
from edgerund.updates.machine import Record, State, other

__all__ = ["MIN_PREVIOUS_BLOCKS", "PREVIOUS_MATCHED", "REASON", "decide"]

REASON = "post_update_drift"
# The monitor needs `persist_blocks` (5) consecutive blocks to call drift: a previous
# verdict "ok" on fewer says nothing.
MIN_PREVIOUS_BLOCKS = 5
PREVIOUS_MATCHED = frozenset({"ok", "anomaly"})


def decide(rec: Record, drift: DriftStatus | None, *, now: float, window_s: float) -> str | None:
    """The rollback message (module docstring), or None to leave the model alone."""
    if window_s <= 0 or drift is None or rec.state is not State.COMMITTED or rec.active is None:
        return None
    cur = rec.slots.get(rec.active)
    back = other(rec.active)
    prev = rec.slots.get(back)
    if cur is None or prev is None:
        return None
    age = now - cur.installed_at
    if not 0.0 <= age <= window_s:
        return None
    if drift.version != cur.version or drift.state != "drift":
        return None
    if (
        drift.previous_version != prev.version
        or drift.previous_state not in PREVIOUS_MATCHED
        or drift.previous_blocks < MIN_PREVIOUS_BLOCKS
    ):
        return None
    why = f" ({drift.reason})" if drift.reason else ""
    return (
        f"{cur.version}, committed {age:.0f} s ago, drifts from its own reference "
        f"profile{why} where {prev.version} had not ({drift.previous_state} over {drift.previous_blocks} blocks): "
        f"rolled back to slot {back}"
    )
