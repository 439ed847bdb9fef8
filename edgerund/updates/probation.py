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

    fail   reason probation_faults | probation_nan | probation_missed_ticks | probation_score
    pass   the window has elapsed and nothing failed
    watch  nothing failed yet, the window is still open

Counters are deltas, so what the previous model did before the swap never counts against
the new one. The score check waits for at least one inference of the new model.
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
) -> ProbationVerdict:
    """The verdict on the window so far (see the module docstring)."""
    faults = now.model.faults - start.model.faults
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
    if missed > policy.max_missed_ticks:
        return ProbationVerdict(
            "fail",
            "probation_missed_ticks",
            f"{missed} missed loop tick(s) during probation (max {policy.max_missed_ticks})",
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
    return PASS if elapsed_s >= window_s else WATCH
