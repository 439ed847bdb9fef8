"""The post-update drift rollback decision (edgerund/updates/postdrift.py): every
condition of the rule is needed, each case below removes one."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from edgerund.ports import DriftStatus
from edgerund.updates.machine import Record, SlotInfo, State
from edgerund.updates.postdrift import MIN_PREVIOUS_BLOCKS, decide

NOW = 1_000_000.0
WINDOW = 3600.0


def slot(version: str, at: float) -> SlotInfo:
    return SlotInfo(
        version=version, bundle_id=version, security_counter=1, manifest_sha256="", installed_at=at
    )


REC = Record(
    model="m",
    state=State.COMMITTED,
    active="b",
    slots={"a": slot("2.0.0", NOW - 9e5), "b": slot("2.0.1", NOW - 60.0)},
)
DRIFT = DriftStatus(
    version="2.0.1",
    state="drift",
    reason="12 features moved",
    blocks=9,
    previous_version="2.0.0",
    previous_state="ok",
    previous_blocks=MIN_PREVIOUS_BLOCKS,
)


def test_a_fresh_model_drifting_where_the_previous_did_not_is_rolled_back() -> None:
    why = decide(REC, DRIFT, now=NOW, window_s=WINDOW)
    assert why is not None
    assert "2.0.1" in why and "2.0.0" in why and "12 features moved" in why and "slot a" in why
    # a plant fault under the previous model is not a profile mismatch
    prev_anomaly = dataclasses.replace(DRIFT, previous_state="anomaly")
    assert decide(REC, prev_anomaly, now=NOW, window_s=WINDOW) is not None


@pytest.mark.parametrize(
    ("rec", "drift", "window"),
    [
        (REC, DRIFT, 0.0),  # off
        (REC, None, WINDOW),  # no drift monitor
        (REC, dataclasses.replace(DRIFT, state="ok"), WINDOW),
        (REC, dataclasses.replace(DRIFT, state="anomaly"), WINDOW),  # a fault, not drift
        (REC, DRIFT, 30.0),  # committed before the window
        (msgspec.structs.replace(REC, state=State.PROBATION), DRIFT, WINDOW),  # probation's job
        (msgspec.structs.replace(REC, state=State.ROLLED_BACK), DRIFT, WINDOW),  # once
        (msgspec.structs.replace(REC, slots={"a": None, "b": REC.slots["b"]}), DRIFT, WINDOW),
        (REC, dataclasses.replace(DRIFT, version="2.0.0"), WINDOW),  # verdict on another model
        (REC, dataclasses.replace(DRIFT, previous_state="drift"), WINDOW),  # it drifted too
        (REC, dataclasses.replace(DRIFT, previous_state="no_profile"), WINDOW),
        (REC, dataclasses.replace(DRIFT, previous_state=None), WINDOW),  # first model seen
        (REC, dataclasses.replace(DRIFT, previous_version="1.9.0"), WINDOW),  # another one
        (REC, dataclasses.replace(DRIFT, previous_blocks=MIN_PREVIOUS_BLOCKS - 1), WINDOW),
    ],
)
def test_no_rollback_unless_every_condition_holds(
    rec: Record, drift: DriftStatus | None, window: float
) -> None:
    assert decide(rec, drift, now=NOW, window_s=window) is None
