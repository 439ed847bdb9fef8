"""Policy: hysteresis and debounce as tables of score sequences -> actions; mode selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerund.control.policy import (
    Level,
    LoopPolicy,
    Mode,
    Observation,
    Rule,
    RuleResult,
    classify,
    evaluate_rules,
)

# threshold 1.0, hysteresis 0.2 -> release level 0.8
# "S" = anomaly start on that tick, "E" = end, "." = nothing; out: a = active, n = normal
TABLE = [
    # name, on_ticks, off_ticks, scores, transitions, outputs
    ("single spike ignored", 3, 2, [0.5, 1.5, 0.5, 1.5, 1.5, 0.5], "......", "nnnnnn"),
    ("three above starts", 3, 2, [1.1, 1.2, 1.3, 1.4], "..S.", "nnaa"),
    ("band does not count up", 2, 2, [1.1, 0.9, 1.1, 1.1], "...S", "nnna"),
    ("band holds while active", 1, 2, [1.5, 0.9, 0.85, 0.95, 0.81], "S....", "aaaaa"),
    (
        "release needs off_ticks below release level",
        1,
        3,
        [2.0, 0.7, 0.7, 0.9, 0.7, 0.7, 0.7],
        "S.....E",
        "aaaaaan",
    ),
    ("exactly threshold is not above", 1, 1, [1.0, 1.0, 1.0000001], "..S", "nna"),
    ("exactly release level is band", 1, 1, [2.0, 0.8, 0.79], "S.E", "aan"),
    ("on_ticks=1 off_ticks=1 chatter", 1, 1, [1.2, 0.1, 1.2, 0.1], "SESE", "anan"),
    ("re-trigger after end", 2, 1, [1.2, 1.2, 0.1, 1.2, 1.2], ".SE.S", "nanna"),
]


@pytest.mark.parametrize("name,on,off,scores,trans,outs", TABLE, ids=[t[0] for t in TABLE])
def test_hysteresis_debounce_table(
    name: str, on: int, off: int, scores: list[float], trans: str, outs: str
) -> None:
    p = LoopPolicy(threshold=1.0, hysteresis_ratio=0.2, on_ticks=on, off_ticks=off)
    got_t, got_o = "", ""
    for s in scores:
        d = p.step(Observation(score=s))
        assert d.mode is Mode.MODEL and d.reason is None
        got_t += {"start": "S", "end": "E", None: "."}[d.transition]
        got_o += d.output[0]
    assert (got_t, got_o) == (trans, outs)


def test_classify_levels() -> None:
    assert classify(1.01, 1.0, 0.2) is Level.HIGH
    assert classify(0.9, 1.0, 0.2) is Level.BAND
    assert classify(0.79, 1.0, 0.2) is Level.LOW
    assert classify(0.99, 1.0, 0.0) is Level.LOW  # no hysteresis: no band
    assert classify(-1.3, -1.0, 0.2) is Level.LOW  # negative thresholds: band below


def _rules(tripped: bool) -> RuleResult:
    return RuleResult(("x.y max=3>2",) if tripped else (), {"x.y": 3.0 if tripped else 1.0})


def test_nan_score_goes_to_fallback_never_silent() -> None:
    p = LoopPolicy(threshold=1.0, hysteresis_ratio=0.2, on_ticks=1, off_ticks=1)
    d = p.step(Observation(score=0.1))
    assert d.mode is Mode.MODEL and d.mode_changed  # first tick: no mode before
    d = p.step(Observation(score=math.nan, rules=_rules(False)))
    assert d.mode is Mode.FALLBACK and d.mode_changed
    assert d.reason is not None and "nan" in d.reason
    d = p.step(Observation(score=None, model_fault="model m: fault: boom", rules=_rules(True)))
    assert d.mode is Mode.FALLBACK and not d.mode_changed
    assert d.transition == "start" and d.output == "active" and d.reason == "model m: fault: boom"


def test_no_usable_rules_goes_safe_with_both_reasons() -> None:
    p = LoopPolicy(threshold=1.0, hysteresis_ratio=0.2, on_ticks=1, off_ticks=1)
    d = p.step(
        Observation(
            score=None, model_fault="input v: sensor imu is failed", rules_fault="rule x: stale"
        )
    )
    assert d.mode is Mode.SAFE and d.output == "safe" and d.level is None
    assert (
        d.reason is not None and "sensor imu is failed" in d.reason and "rule x: stale" in d.reason
    )


def test_mode_change_keeps_anomaly_state_and_resets_run() -> None:
    p = LoopPolicy(threshold=1.0, hysteresis_ratio=0.2, on_ticks=2, off_ticks=2)
    for s in (1.5, 1.5):
        d = p.step(Observation(score=s))
    assert d.active and d.transition == "start"
    # model swap: fallback rules do not trip -> one LOW tick, not enough to release
    d = p.step(Observation(score=None, model_fault="model m: not loaded", rules=_rules(False)))
    assert d.active and d.mode is Mode.FALLBACK and d.transition is None
    # model back with a LOW score: the run restarted at the mode change, so still active
    d = p.step(Observation(score=0.1))
    assert d.active and d.mode_changed
    d = p.step(Observation(score=0.1))
    assert not d.active and d.transition == "end"


def test_missing_threshold_is_safe() -> None:
    p = LoopPolicy(threshold=None, hysteresis_ratio=0.2, on_ticks=1, off_ticks=1)
    d = p.step(Observation(score=0.5))
    assert d.mode is Mode.SAFE and d.reason is not None and "threshold" in d.reason


def test_bad_parameters_refused() -> None:
    with pytest.raises(ValueError):
        LoopPolicy(threshold=1.0, hysteresis_ratio=1.0, on_ticks=1, off_ticks=1)
    with pytest.raises(ValueError):
        LoopPolicy(threshold=1.0, hysteresis_ratio=0.1, on_ticks=0, off_ticks=1)


RULE_TABLE = [
    # stat, samples, above, below, values, tripped
    ("last", 1, 2.0, None, [5.0, 1.0], False),
    ("last", 1, 2.0, None, [1.0, 2.5], True),
    ("max", 2, 2.0, None, [2.5, 1.0], True),
    ("max", 1, 2.0, None, [2.5, 1.0], False),
    ("mean", 4, None, 1.0, [0.5, 0.5, 1.0, 1.0], True),
    ("rms", 2, 0.9, None, [-1.0, 1.0], True),
    ("peak", 3, 3.0, None, [1.0, -3.5, 0.0], True),
    ("std", 4, 0.1, None, [1.0, 1.0, 1.0, 1.0], False),
    ("min", 3, None, 11.0, [12.0, 10.5, 12.0], True),
]


@pytest.mark.parametrize("stat,samples,above,below,values,tripped", RULE_TABLE)
def test_rule_table(
    stat: str,
    samples: int,
    above: float | None,
    below: float | None,
    values: list[float],
    tripped: bool,
) -> None:
    r = Rule(name="s.c", stat=stat, samples=samples, above=above, below=below)  # type: ignore[arg-type]
    res = evaluate_rules([r], {"s.c": np.array(values)})
    assert bool(res.tripped) is tripped


def test_rules_refuse_empty_and_nan() -> None:
    r = Rule(name="s.c", stat="mean", samples=2, above=1.0)
    with pytest.raises(ValueError):
        evaluate_rules([r], {"s.c": np.array([])})
    with pytest.raises(ValueError):
        evaluate_rules([r], {"s.c": np.array([1.0, math.nan])})


@given(
    scores=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=200),
    on=st.integers(min_value=1, max_value=6),
    off=st.integers(min_value=1, max_value=6),
    hyst=st.floats(min_value=0.0, max_value=0.9),
)
@settings(max_examples=300, deadline=None)
def test_debounce_properties(scores: list[float], on: int, off: int, hyst: float) -> None:
    """Against a direct reading of the rules: a start needs the last `on` scores above the
    threshold, an end the last `off` below the release level, and starts/ends alternate."""
    p = LoopPolicy(threshold=1.0, hysteresis_ratio=hyst, on_ticks=on, off_ticks=off)
    release = 1.0 - hyst
    active = False
    last = -1  # index of the last transition: the run restarts after it
    for i, s in enumerate(scores):
        d = p.step(Observation(score=s))
        need = off if active else on
        window = scores[i + 1 - need : i + 1] if i + 1 - need > last else None
        if active:
            due = window is not None and all(x < release for x in window)
        else:
            due = window is not None and all(x > 1.0 for x in window)
        assert (d.transition is not None) is due, (i, scores[: i + 1])
        if due:
            assert d.transition == ("end" if active else "start")
            active, last = not active, i
        assert d.active is active
        assert d.output == ("active" if active else "normal")
