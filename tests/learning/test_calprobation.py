"""The calibration's probation verdict (pure): trips, sensor faults, drift left, too little
data, and how it combines with the usual verdict."""

from __future__ import annotations

from edgerund.ports import LoopCounters, ModelCounters
from edgerund.updates import calprobation
from edgerund.updates.probation import PASS, WATCH, ProbationVerdict, Sample

LOOPS = LoopCounters(ticks=0, missed=0, overruns=0)


def sample(state: str | None, blocks: int = 0, anomaly: int = 0, fault: int = 0) -> Sample:
    return Sample(
        model=ModelCounters(
            inferences=blocks * 25,
            faults=0,
            nan_outputs=0,
            score_mean=1.0,
            drift_state=state,
            drift_blocks=blocks,
            drift_anomaly_blocks=anomaly,
            drift_fault_blocks=fault,
        ),
        loops=LOOPS,
    )


def judge(start: Sample, now: Sample, elapsed: float = 10.0) -> ProbationVerdict:
    return calprobation.judge(start, now, elapsed_s=elapsed, window_s=10.0)


def test_a_quiet_calibrated_plant_passes_once_the_window_is_over() -> None:
    assert judge(sample(None), sample("ok", 8), elapsed=5.0) == WATCH
    assert judge(sample(None), sample("ok", 8)) == PASS
    # deltas from the start of the window (a start sample with no monitor counts as 0)
    assert judge(sample("ok", 3), sample("ok", 9)) == PASS


def test_a_trip_or_a_sensor_fault_fails_at_once() -> None:
    v = judge(sample("ok", 2), sample("anomaly", 5, anomaly=1), elapsed=1.0)
    assert v.kind == "fail" and v.reason == "probation_trips" and "1 of 3" in v.message
    v = judge(sample(None), sample("sensor_fault", 4, fault=2), elapsed=1.0)
    assert v.reason == "probation_sensor_fault"


def test_drift_left_at_the_end_fails() -> None:
    assert judge(sample(None), sample("drift", 8), elapsed=3.0) == WATCH
    assert judge(sample(None), sample("drift", 8)).reason == "probation_drift"


def test_too_few_blocks_extends_the_window_then_fails() -> None:
    assert judge(sample(None), sample("ok", 1)) == WATCH
    assert judge(sample(None), sample(None), elapsed=29.0) == WATCH
    v = judge(sample(None), sample("ok", 2), elapsed=31.0)
    assert v.reason == "probation_no_data"


def test_combine() -> None:
    fail = ProbationVerdict("fail", "probation_faults", "x")
    assert calprobation.combine(fail, PASS) is fail
    assert calprobation.combine(PASS, PASS) == PASS
    assert calprobation.combine(PASS, WATCH) == WATCH
    assert calprobation.combine(WATCH, PASS) == WATCH
    cal = ProbationVerdict("fail", "probation_trips", "y")
    assert calprobation.combine(WATCH, cal) is cal
