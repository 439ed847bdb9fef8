"""The decision logic of a control loop, free of I/O: observations in, decisions out.

Theory of operation
-------------------
Each tick the loop (edgerund/control/loop.py) gathers an `Observation`: the model's score
(or why there is none: no runner, a model fault, NaN/Inf output, a stale or failed input)
and the result of the rule-based fallback (plain limits on raw inputs, or why those could
not be evaluated). `LoopPolicy.step()` turns it into a `Decision`:

1. **Mode.** `model` when the model produced a finite score from fresh inputs; otherwise
   `fallback` when the fallback rules could be evaluated on fresh inputs; otherwise
   `safe` (nothing trustworthy to decide on: the actuator goes to its safe state). A
   decision is never made silently on stale data: every non-model mode carries the
   reason, and mode changes are reported (`mode_changed`) so the loop publishes them.
2. **Level.** In model mode the score is classified against two levels: `HIGH` above the
   threshold, `LOW` below the release level `threshold - |threshold| * hysteresis_ratio`,
   `BAND` in between (holds the current state: the hysteresis). In fallback mode a
   tripped rule is `HIGH`, otherwise `LOW`.
3. **Debounce.** `on_ticks` consecutive `HIGH` ticks start an anomaly; `off_ticks`
   consecutive `LOW` ticks end it. Anything else resets the run. A mode change resets the
   run too (a run of scores and a run of rule trips are not the same evidence) but keeps
   the anomaly state, so a model swap in the middle of an anomaly does not release the
   actuator.

`Decision.output` names what the actuator should hold: "active" (anomaly), "normal" or
"safe". The transition table is small enough to read in `Debouncer.step`; the tests drive
it with tables of score sequences and expected actions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt


class Level(enum.IntEnum):
    LOW = 0  # below the release level (evidence of normal)
    BAND = 1  # inside the hysteresis band (holds the current state)
    HIGH = 2  # above the threshold (evidence of anomaly)


class Mode(enum.StrEnum):
    MODEL = "model"
    FALLBACK = "fallback"
    SAFE = "safe"


Transition = Literal["start", "end"]
Output = Literal["active", "normal", "safe"]


def classify(score: float, threshold: float, hysteresis_ratio: float) -> Level:
    """HIGH above the threshold, LOW below the release level, BAND in between."""
    if score > threshold:
        return Level.HIGH
    release = threshold - abs(threshold) * hysteresis_ratio
    if score < release:
        return Level.LOW
    return Level.BAND


@dataclass
class Debouncer:
    """Consecutive-tick debounce of a two-state (normal/anomaly) signal."""

    on_ticks: int
    off_ticks: int
    active: bool = False
    run: int = 0

    def step(self, level: Level) -> Transition | None:
        if not self.active:
            self.run = self.run + 1 if level is Level.HIGH else 0
            if self.run >= self.on_ticks:
                self.active, self.run = True, 0
                return "start"
        else:
            self.run = self.run + 1 if level is Level.LOW else 0
            if self.run >= self.off_ticks:
                self.active, self.run = False, 0
                return "end"
        return None


# --- the rule-based fallback ----------------------------------------------------------

Stat = Literal["last", "mean", "min", "max", "rms", "peak", "std"]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Rule:
    """A plain limit on a raw input: trips when `stat` of the last `samples` values is
    above `above` or below `below`."""

    name: str  # for reasons and events, e.g. "motor.current_a"
    stat: Stat = "last"
    samples: int = 1
    above: float | None = None
    below: float | None = None


def rule_stat(stat: Stat, values: F64) -> float:
    """A summary of a non-empty array of raw values."""
    if stat == "last":
        return float(values[-1])
    if stat == "mean":
        return float(np.mean(values))
    if stat == "min":
        return float(np.min(values))
    if stat == "max":
        return float(np.max(values))
    if stat == "rms":
        return float(np.sqrt(np.mean(values * values)))
    if stat == "peak":
        return float(np.max(np.abs(values)))
    if stat == "std":
        return float(np.std(values))
    raise ValueError(f"unknown stat {stat!r}")


@dataclass(frozen=True)
class RuleResult:
    tripped: tuple[str, ...]  # names of tripped rules, with the value, e.g. "x.y max=3.1>2"
    values: Mapping[str, float]


def evaluate_rules(rules: Sequence[Rule], values: Mapping[str, F64]) -> RuleResult:
    """Evaluate every rule on its values (at least `rule.samples` of them, newest last).

    The caller checks freshness first; an empty or NaN window here is a caller bug and
    raises ValueError, so it cannot pass for "no trip".
    """
    tripped: list[str] = []
    stats: dict[str, float] = {}
    for r in rules:
        v = values[r.name]
        if len(v) == 0:
            raise ValueError(f"rule {r.name}: no values")
        s = rule_stat(r.stat, v[-r.samples :])
        if not math.isfinite(s):
            raise ValueError(f"rule {r.name}: {r.stat} is {s}")
        stats[r.name] = s
        if r.above is not None and s > r.above:
            tripped.append(f"{r.name} {r.stat}={s:.4g}>{r.above:g}")
        elif r.below is not None and s < r.below:
            tripped.append(f"{r.name} {r.stat}={s:.4g}<{r.below:g}")
    return RuleResult(tuple(tripped), stats)


# --- the loop's decision ----------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What one tick saw. `model_fault` is None exactly when `score` is usable."""

    score: float | None
    model_fault: str | None = None
    rules: RuleResult | None = None  # None: the fallback could not be evaluated
    rules_fault: str | None = None


@dataclass(frozen=True)
class Decision:
    mode: Mode
    reason: str | None  # why not model mode (None in model mode)
    level: Level | None
    active: bool  # anomaly state after this tick
    output: Output
    transition: Transition | None
    mode_changed: bool


class LoopPolicy:
    """Mode selection + hysteresis + debounce. One instance per loop; not thread-safe."""

    def __init__(
        self,
        *,
        threshold: float | None,
        hysteresis_ratio: float,
        on_ticks: int,
        off_ticks: int,
    ) -> None:
        if on_ticks < 1 or off_ticks < 1:
            raise ValueError(f"on_ticks/off_ticks must be >= 1, got {on_ticks}/{off_ticks}")
        if not 0.0 <= hysteresis_ratio < 1.0:
            raise ValueError(f"hysteresis_ratio must be in [0, 1), got {hysteresis_ratio}")
        self.threshold = threshold
        self.hysteresis_ratio = hysteresis_ratio
        self.debouncer = Debouncer(on_ticks, off_ticks)
        self.mode: Mode | None = None
        self.reason: str | None = None

    @property
    def active(self) -> bool:
        return self.debouncer.active

    def step(self, obs: Observation) -> Decision:
        level: Level | None
        if obs.model_fault is None and obs.score is not None and math.isfinite(obs.score):
            if self.threshold is None:
                mode, reason, level = Mode.SAFE, "no threshold configured or in manifest", None
            else:
                mode, reason = Mode.MODEL, None
                level = classify(obs.score, self.threshold, self.hysteresis_ratio)
        else:
            why = obs.model_fault
            if why is None:
                why = f"model output {obs.score} is not finite"
            if obs.rules is not None:
                mode, reason = Mode.FALLBACK, why
                level = Level.HIGH if obs.rules.tripped else Level.LOW
            else:
                mode, level = Mode.SAFE, None
                reason = f"{why}; fallback unavailable: {obs.rules_fault or 'no rules'}"

        mode_changed = mode is not self.mode
        if mode_changed:
            self.debouncer.run = 0
        self.mode, self.reason = mode, reason

        transition = self.debouncer.step(level) if level is not None else None
        output: Output
        if mode is Mode.SAFE:
            output = "safe"
        else:
            output = "active" if self.debouncer.active else "normal"
        return Decision(
            mode=mode,
            reason=reason,
            level=level,
            active=self.debouncer.active,
            output=output,
            transition=transition,
            mode_changed=mode_changed,
        )
