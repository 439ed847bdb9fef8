"""The probation judgement: is the model on trial healthy so far? (pure, no I/O, no clock)

Theory of operation
-------------------
After a swap the new model runs the real control loops for the probation window. The
watcher (steps.py) samples two monotonic counter sets every `poll_interval_ms`: the model
host's counters of the model (`ports.ModelCounters`: inferences, faults, NaN outputs,
recent score mean) and the loops' counters (`ports.LoopCounters`: missed ticks). It hands
the samples taken at the start of the window and now to `judge`, which compares the
DELTAS over the window with the policy (`updates.probation`: max faults, NaN outputs,
missed ticks) and the bundle's health criteria (`health.score_min/score_max`, the range
the recent score mean must stay in), in this order, and returns one verdict:

    fail   reason probation_faults | probation_input_faults | probation_nan |
           probation_missed_ticks | probation_score | probation_no_inferences
    pass   the window has elapsed, nothing failed and the model was seen working
    watch  nothing failed yet, the window is still open (or extended, below)

Counters are deltas, so what the previous model did before the swap never counts against
the new one. The score check waits for at least one inference of the new model.

Missed ticks are judged against the PREVIOUS model: on a loaded host the loops miss some
ticks whatever model runs, and a single missed tick must not roll a good model back. So
just before the swap the watcher measures the old model's miss rate over a window as long
as the probation window (capped by `baseline_max_s`): a `Baseline`. The new model may
then miss `max_missed_ticks` plus `missed_ratio` times what the old model's rate predicts
for the ticks of the probation window, plus a slack of `missed_z` standard deviations of
that prediction taken as a Poisson count (at least `missed_z` ticks): a loaded host misses
in bursts, so a quiet baseline followed by one burst of three ticks is the host, while a
model too slow for its loop misses a steady fraction of all deadlines, hundreds over a
window, far past any such slack. Without a baseline (a trial resumed after a crash, no
loops) `max_missed_ticks` alone applies.

Faults of the INPUT (`ModelCounters.input_faults`: a window with a timestamp gap because
the sensor's reads stalled, a NaN reading) are the sensor's, not the model's: any model
fed that stream fails the same windows. With a baseline they are judged like missed
ticks, against the old model's input-fault rate per inference measured in the same
window before the swap (`probation_input_faults`), and only the rest count as the
model's faults against `max_faults`; without one every fault counts against
`max_faults`, as before.

No evidence is not a pass. A model that ran no inference in its window (its loop in
fallback the whole time: a sensor unplugged, the input refused) has shown nothing, and
committing it would ratchet the security counter past the known-good model on no
evidence. So when the previous model DID run inferences before the swap (the baseline: the
model is in use and its input was flowing), the new one must run at least
`min_inferences`; the window is extended while they are missing (up to
`NO_EVIDENCE_FACTOR` x its length, as a calibration's is for missing data), and then the
trial rolls back with `probation_no_inferences`: the known-good model stays, and the update
can be sent again once the plant feeds the loop. A model no loop uses (no inferences in the
baseline either) and a trial without a baseline (resumed after a crash) are judged as
before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from edgerund.ports import LoopCounters, ModelCounters
from edgerund.updates.config import ProbationConfig
from edgerund.updates.manifest import Health

NO_MODEL = ModelCounters(inferences=0, faults=0, nan_outputs=0, score_mean=None)
NO_LOOPS = LoopCounters(ticks=0, missed=0, overruns=0)


@dataclass(frozen=True, slots=True)
class Sample:
    """The counters at one instant of the probation window."""

    model: ModelCounters
    loops: LoopCounters


@dataclass(frozen=True, slots=True)
class ProbationVerdict:
    kind: Literal["watch", "pass", "fail"]
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Baseline:
    """The loops' and the model's counters over a window while the PREVIOUS model ran
    (deltas)."""

    ticks: int
    missed: int
    inferences: int = 0
    input_faults: int = 0

    @property
    def miss_rate(self) -> float:
        """Missed deadlines per deadline (a tick run or a tick missed)."""
        return self.missed / max(1, self.ticks + self.missed)

    @property
    def input_fault_rate(self) -> float:
        """Faults of the input per inference."""
        return self.input_faults / max(1, self.inferences)


def baseline_of(start: Sample, end: Sample) -> Baseline:
    return Baseline(
        ticks=end.loops.ticks - start.loops.ticks,
        missed=end.loops.missed - start.loops.missed,
        inferences=end.model.inferences - start.model.inferences,
        input_faults=end.model.input_faults - start.model.input_faults,
    )


def _allowed(policy: ProbationConfig, floor: int, rate: float, n: int) -> int:
    """`floor` plus `missed_ratio` x `rate` x `n`, plus `missed_z` sd of that as a Poisson
    count (at least `missed_z`)."""
    expected = rate * n * policy.missed_ratio
    slack = policy.missed_z * math.sqrt(max(expected, 1.0)) if policy.missed_z > 0 else 0.0
    return floor + math.ceil(expected + slack)


def missed_allowed(policy: ProbationConfig, baseline: Baseline | None, deadlines: int) -> int:
    """How many missed ticks the new model may cause over `deadlines` deadlines."""
    if baseline is None:
        return policy.max_missed_ticks
    return _allowed(policy, policy.max_missed_ticks, baseline.miss_rate, deadlines)


NO_EVIDENCE_FACTOR = 3.0

WATCH = ProbationVerdict("watch")
PASS = ProbationVerdict("pass")


def judge(
    start: Sample,
    now: Sample,
    *,
    elapsed_s: float,
    window_s: float,
    health: Health,
    policy: ProbationConfig,
    baseline: Baseline | None = None,
) -> ProbationVerdict:
    """The verdict on the window so far (see the module docstring)."""
    faults = now.model.faults - start.model.faults
    if baseline is not None:
        inputs = now.model.input_faults - start.model.input_faults
        faults -= inputs
        n = now.model.inferences - start.model.inferences
        allowed_inputs = _allowed(policy, policy.max_faults, baseline.input_fault_rate, n)
        if inputs > allowed_inputs:
            return ProbationVerdict(
                "fail",
                "probation_input_faults",
                f"{inputs} input fault(s) of {n} inferences during probation (max"
                f" {allowed_inputs}: the previous model had {baseline.input_faults} of"
                f" {baseline.inferences} before the swap)",
            )
    if faults > policy.max_faults:
        return ProbationVerdict(
            "fail",
            "probation_faults",
            f"{faults} model fault(s) during probation (max {policy.max_faults})",
        )
    nans = now.model.nan_outputs - start.model.nan_outputs
    if nans > policy.max_nan_outputs:
        return ProbationVerdict(
            "fail",
            "probation_nan",
            f"{nans} NaN/Inf output(s) during probation (max {policy.max_nan_outputs})",
        )
    missed = now.loops.missed - start.loops.missed
    deadlines = now.loops.ticks - start.loops.ticks + missed
    allowed = missed_allowed(policy, baseline, deadlines)
    if missed > allowed:
        why = (
            f"max {allowed}"
            if baseline is None
            else f"max {allowed}: the previous model missed {baseline.missed} of"
            f" {baseline.ticks + baseline.missed} before the swap"
        )
        return ProbationVerdict(
            "fail",
            "probation_missed_ticks",
            f"{missed} missed loop tick(s) of {deadlines} during probation ({why})",
        )
    mean = now.model.score_mean
    if mean is not None and now.model.inferences > start.model.inferences:
        if not math.isfinite(mean):
            return ProbationVerdict("fail", "probation_score", "recent score mean is not finite")
        lo, hi = health.score_min, health.score_max
        if (lo is not None and mean < lo) or (hi is not None and mean > hi):
            return ProbationVerdict(
                "fail",
                "probation_score",
                f"recent score mean {mean:.4g} outside [{lo}, {hi}]",
            )
    if elapsed_s < window_s:
        return WATCH
    return _evidence(
        policy, baseline, now.model.inferences - start.model.inferences, elapsed_s, window_s
    )


def _evidence(
    policy: ProbationConfig,
    baseline: Baseline | None,
    inferences: int,
    elapsed_s: float,
    window_s: float,
) -> ProbationVerdict:
    """At the end of the window: PASS when the model was seen working, or nothing says it
    should have been (module docstring)."""
    if baseline is None or baseline.inferences == 0 or inferences >= policy.min_inferences:
        return PASS
    if elapsed_s < NO_EVIDENCE_FACTOR * window_s:
        return WATCH
    return ProbationVerdict(
        "fail",
        "probation_no_inferences",
        f"{inferences} inference(s) in {elapsed_s:.1f} s of probation, at least"
        f" {policy.min_inferences} needed (the previous model ran {baseline.inferences}"
        " before the swap): no evidence the new model works",
    )
