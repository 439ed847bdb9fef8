"""The probation verdict of a device calibration (pure, no I/O, no clock).

Theory of operation
-------------------
A calibration is installed to remove a drift's false alarms without hiding a fault, so
beyond the usual probation (probation.judge: model faults, NaN outputs, missed ticks,
score range) it has to show, on the live plant, during its window, that:

- it does not trip: no block of the drift monitor of the calibrated runner is an
  `anomaly` block (half its scores above the calibrated threshold)   probation_trips
  (the plant it was fitted on is the plant it now watches; a real fault that starts
  during the window rolls the calibration back too: the previous model, which detects
  it, runs while the plant is not normal, and a later adaptation can try again);
- no sensor fault appears (a fit made just before a sensor failed is not trusted)
                                                                     probation_sensor_fault
- the drift is gone: at the end of the window the monitor does not say `drift`
                                                                     probation_drift
- and it has seen enough of the plant to say so: at least MIN_BLOCKS monitor blocks;
  the window is extended (up to NO_DATA_FACTOR x its length) while they are missing (a
  trial resumed at start-up, while the sensors' windows fill)         probation_no_data

The counters are the drift monitor's of the runner under trial (ports.ModelCounters
`drift_*`, monotonic from the swap); a sample taken before the monitor of the new runner
existed (`drift_state` None) counts as zero.
"""

from __future__ import annotations

from edgerund.updates.probation import PASS, WATCH, ProbationVerdict, Sample

MIN_BLOCKS = 3
NO_DATA_FACTOR = 3.0


def _delta(start: Sample, now: Sample, field: str) -> int:
    base = 0 if start.model.drift_state is None else int(getattr(start.model, field))
    return max(0, int(getattr(now.model, field)) - base)


def judge(start: Sample, now: Sample, *, elapsed_s: float, window_s: float) -> ProbationVerdict:
    """The calibration's verdict on the window so far (module docstring)."""
    m = now.model
    blocks = _delta(start, now, "drift_blocks") if m.drift_state is not None else 0
    trips = _delta(start, now, "drift_anomaly_blocks") if m.drift_state is not None else 0
    faults = _delta(start, now, "drift_fault_blocks") if m.drift_state is not None else 0
    if trips > 0:
        return ProbationVerdict(
            "fail",
            "probation_trips",
            f"{trips} of {blocks} drift-monitor block(s) tripped under the calibration",
        )
    if faults > 0:
        return ProbationVerdict(
            "fail",
            "probation_sensor_fault",
            f"{faults} block(s) with a sensor fault during the calibration's probation",
        )
    if elapsed_s < window_s:
        return WATCH
    if blocks < MIN_BLOCKS:
        if elapsed_s < NO_DATA_FACTOR * window_s:
            return WATCH
        return ProbationVerdict(
            "fail",
            "probation_no_data",
            f"{blocks} drift-monitor block(s) in the probation window, at least {MIN_BLOCKS}"
            " needed to judge a calibration",
        )
    if m.drift_state == "drift":
        return ProbationVerdict(
            "fail", "probation_drift", "the drift monitor still reports drift under the calibration"
        )
    return PASS


def combine(usual: ProbationVerdict, cal: ProbationVerdict) -> ProbationVerdict:
    """Fail if either fails, pass when both pass, else watch."""
    if usual.kind == "fail":
        return usual
    if cal.kind == "fail":
        return cal
    return PASS if usual.kind == "pass" and cal.kind == "pass" else WATCH
