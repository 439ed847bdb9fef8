"""The probation judgement as a pure function: counter deltas over the window, the
bundle's health criteria and the policy in; a verdict and a reason out. No I/O, no clock."""

from __future__ import annotations

import math

import pytest

from edgerund.ports import LoopCounters, ModelCounters
from edgerund.updates.config import ProbationConfig
from edgerund.updates.manifest import Health
from edgerund.updates.probation import (
    NO_MODEL,
    Baseline,
    Sample,
    baseline_of,
    judge,
    missed_allowed,
)


def sample(
    inferences: int = 0,
    faults: int = 0,
    nan: int = 0,
    score: float | None = None,
    missed: int = 0,
) -> Sample:
    return Sample(
        ModelCounters(inferences=inferences, faults=faults, nan_outputs=nan, score_mean=score),
        LoopCounters(ticks=inferences, missed=missed, overruns=0),
    )


POLICY = ProbationConfig(max_faults=1, max_nan_outputs=0, max_missed_ticks=2)
HEALTH = Health(score_min=0.0, score_max=10.0)


def verdict(start: Sample, now: Sample, elapsed_s: float = 1.0, window_s: float = 5.0) -> str:
    v = judge(start, now, elapsed_s=elapsed_s, window_s=window_s, health=HEALTH, policy=POLICY)
    assert (v.reason == "") == (v.kind != "fail")
    assert (v.message != "") == (v.kind == "fail")
    return v.kind if v.kind != "fail" else v.reason


def test_healthy_window_watches_then_passes() -> None:
    start, now = sample(inferences=100, score=1.0), sample(inferences=200, score=2.0)
    assert verdict(start, now, elapsed_s=1.0) == "watch"
    assert verdict(start, now, elapsed_s=5.0) == "pass"


def test_deltas_not_totals_count() -> None:
    # The previous model's faults, NaNs and missed ticks before the window never count.
    start = sample(inferences=100, faults=50, nan=7, missed=40, score=1.0)
    now = sample(inferences=150, faults=51, nan=7, missed=42, score=1.0)
    assert verdict(start, now) == "watch"


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (sample(inferences=10, faults=2), "probation_faults"),
        (sample(inferences=10, nan=1), "probation_nan"),
        (sample(inferences=10, missed=3), "probation_missed_ticks"),
        (sample(inferences=10, score=10.5), "probation_score"),
        (sample(inferences=10, score=-0.1), "probation_score"),
        (sample(inferences=10, score=math.nan), "probation_score"),
        (sample(inferences=10, score=math.inf), "probation_score"),
    ],
)
def test_each_criterion_fails_with_its_reason(now: Sample, reason: str) -> None:
    assert verdict(sample(), now) == reason
    # ... even once the window has elapsed: a failure outranks the pass.
    assert verdict(sample(), now, elapsed_s=9.0) == reason


def test_order_faults_before_nan_before_missed_before_score() -> None:
    now = sample(inferences=10, faults=5, nan=5, missed=5, score=99.0)
    assert verdict(sample(), now) == "probation_faults"
    assert verdict(sample(), sample(inferences=10, nan=5, missed=5, score=99.0)) == "probation_nan"


def test_score_waits_for_an_inference_of_the_new_model() -> None:
    # A stale out-of-range mean with no inference in the window is not judged yet.
    assert verdict(sample(inferences=10, score=99.0), sample(inferences=10, score=99.0)) == "watch"


def test_no_range_no_score_check() -> None:
    v = judge(
        sample(),
        sample(inferences=5, score=1e9),
        elapsed_s=0.0,
        window_s=1.0,
        health=Health(),
        policy=POLICY,
    )
    assert v.kind == "watch"


def _loops(ticks: int, missed: int) -> Sample:
    return Sample(
        ModelCounters(inferences=ticks, faults=0, nan_outputs=0, score_mean=1.0),
        LoopCounters(ticks=ticks, missed=missed, overruns=0),
    )


def test_missed_ticks_judged_against_the_previous_models_rate() -> None:
    # Issue #12 item 12: on a loaded host the old model missed 10 of 1000 deadlines before
    # the swap; the new model missing 12 of 1000 is the host, not the model.
    policy = ProbationConfig(max_missed_ticks=0, missed_ratio=2.0, missed_z=0.0)
    before = baseline_of(_loops(0, 0), _loops(990, 10))
    assert before.miss_rate == pytest.approx(0.01)

    def judge_missed(missed: int, baseline: Baseline | None) -> str:
        v = judge(
            _loops(0, 0),
            _loops(1000 - missed, missed),
            elapsed_s=1.0,
            window_s=5.0,
            health=HEALTH,
            policy=policy,
            baseline=baseline,
        )
        return v.kind if v.kind != "fail" else v.reason

    assert judge_missed(12, before) == "watch"
    assert judge_missed(20, before) == "watch"  # 2 x the old rate: still the host
    assert judge_missed(21, before) == "probation_missed_ticks"  # worse than the old model
    # Without a baseline (a resumed trial) the absolute limit alone applies.
    assert judge_missed(1, None) == "probation_missed_ticks"
    # An idle host: the old model missed nothing, so the new one may miss nothing either.
    quiet = baseline_of(_loops(0, 0), _loops(1000, 0))
    assert judge_missed(1, quiet) == "probation_missed_ticks"
    assert missed_allowed(policy, quiet, 1000) == 0


def test_missed_ticks_slack_absorbs_a_burst_of_the_host_not_a_slow_model() -> None:
    # benchmarks/update.py on a loaded host (2026-12-06): a nearly quiet 10 s baseline,
    # then one burst of the host's: a good model missed 4 of 633 deadlines, 3 allowed,
    # and was rolled back.
    policy = ProbationConfig(max_missed_ticks=0, missed_ratio=2.0, missed_z=3.0)

    def judge_missed(missed: int, deadlines: int, baseline: Baseline) -> str:
        v = judge(
            _loops(0, 0),
            _loops(deadlines - missed, missed),
            elapsed_s=1.0,
            window_s=5.0,
            health=HEALTH,
            policy=policy,
            baseline=baseline,
        )
        return v.kind if v.kind != "fail" else v.reason

    calm = baseline_of(_loops(0, 0), _loops(998, 2))
    assert missed_allowed(ProbationConfig(missed_ratio=2.0, missed_z=0.0), calm, 633) == 3
    assert missed_allowed(policy, calm, 633) == 8  # 2.53 predicted + 3 x 1.59
    assert judge_missed(4, 633, calm) == "watch"
    quiet = baseline_of(_loops(0, 0), _loops(1000, 0))
    assert missed_allowed(policy, quiet, 633) == 3  # at least z ticks of slack
    loaded = baseline_of(_loops(0, 0), _loops(990, 10))  # 1 % before the swap
    # 2 x 1 % of 1000 = 20 predicted, + 3 sd (sqrt 20 = 4.47): 34 allowed
    assert missed_allowed(policy, loaded, 1000) == 34

    assert judge_missed(3, 633, quiet) == "watch"  # the host's burst
    # A model twice as slow as its 10 ms period misses about half of all deadlines.
    assert judge_missed(300, 633, quiet) == "probation_missed_ticks"
    assert judge_missed(300, 633, loaded) == "probation_missed_ticks"


def test_input_faults_are_judged_against_the_previous_models_not_as_model_faults() -> None:
    # benchmarks/update.py, 2026-12-06: a healthy update rolled back for "11 model faults"
    # that were the MPU-6050's stalled reads (timestamp gaps in the input window).
    from edgerund.ports import LoopCounters, ModelCounters

    policy = ProbationConfig(max_faults=0, missed_ratio=2.0, missed_z=3.0)

    def at(inferences: int, faults: int, inputs: int) -> Sample:
        m = ModelCounters(inferences, faults, 0, None, input_faults=inputs)
        return Sample(model=m, loops=LoopCounters(ticks=inferences, missed=0, overruns=0))

    # the old model saw 10 input faults in 1000 inferences before the swap
    before = baseline_of(at(0, 0, 0), at(1000, 10, 10))
    assert before.input_fault_rate == pytest.approx(0.01)

    def verdict(faults: int, inputs: int, baseline: Baseline | None) -> str:
        v = judge(
            at(0, 0, 0), at(1000, faults, inputs), elapsed_s=1.0, window_s=5.0,
            health=HEALTH, policy=policy, baseline=baseline,
        )  # fmt: skip
        return v.kind if v.kind != "fail" else v.reason

    assert verdict(11, 11, before) == "watch"  # the sensor's, as before the swap
    assert verdict(12, 11, before) == "probation_faults"  # one of the model's own
    # far more than the old model's rate: the new bundle's input spec rejects the stream
    assert verdict(300, 300, before) == "probation_input_faults"
    # no baseline (a trial resumed after a crash): every fault counts, as before
    assert verdict(1, 1, None) == "probation_faults"


def test_no_inference_in_the_window_is_no_evidence_and_rolls_back() -> None:
    # Noticed in session 3: a loop in fallback for the whole window (sensor unplugged) let
    # a model that never ran pass its probation and ratchet the counter.
    policy = ProbationConfig(max_missed_ticks=0, missed_z=3.0, min_inferences=1)
    in_use = baseline_of(_loops(0, 0), _loops(1000, 0))  # the old model ran 1000 inferences

    def at_end(inferences: int, elapsed_s: float, baseline: Baseline | None) -> str:
        v = judge(
            _loops(0, 0), _loops(inferences, 0), elapsed_s=elapsed_s, window_s=5.0,
            health=HEALTH, policy=policy, baseline=baseline,
        )  # fmt: skip
        return v.kind if v.kind != "fail" else v.reason

    assert at_end(0, 1.0, in_use) == "watch"  # the window is still open
    assert at_end(0, 5.0, in_use) == "watch"  # extended while no evidence
    assert at_end(0, 14.9, in_use) == "watch"
    assert at_end(0, 15.0, in_use) == "probation_no_inferences"  # 3 x the window
    assert at_end(1, 5.0, in_use) == "pass"  # seen working
    # nothing says the model should have run: no loop used the old one, or no baseline
    idle = baseline_of(
        _loops(0, 0), Sample(NO_MODEL, LoopCounters(ticks=1000, missed=0, overruns=0))
    )
    assert idle.inferences == 0
    assert at_end(0, 5.0, idle) == "pass"
    assert at_end(0, 5.0, None) == "pass"
    # off
    off = ProbationConfig(max_missed_ticks=0, missed_z=3.0, min_inferences=0)
    v = judge(
        _loops(0, 0), _loops(0, 0), elapsed_s=20.0, window_s=5.0, health=HEALTH, policy=off,
        baseline=in_use,
    )  # fmt: skip
    assert v.kind == "pass"
    # the message says what was missing
    v = judge(
        _loops(0, 0), _loops(0, 0), elapsed_s=15.0, window_s=5.0, health=HEALTH,
        policy=policy, baseline=in_use,
    )  # fmt: skip
    assert "0 inference(s)" in v.message and "1000" in v.message
