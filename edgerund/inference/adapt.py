"""Adaptation of a loaded model: the blocking shell around edgerund.inference.calibration.

Theory of operation
-------------------
`dry_run(runner, blocks)` runs on a worker thread (the models component calls it with
`asyncio.to_thread`), first lowering that thread's scheduling priority (Linux: a thread
is a task with its own nice value) so the control loops' thread wins every contention.
It opens its *own* onnxruntime session on the runner's model file (the loop's session and
its IO binding are never touched), fits a calibration on the drift task's labelled
blocks, checks it against the manifest's signed `adaptation` policy and the must-detect
vectors of the model directory's golden.npz, and returns what it would change. A refusal
raises CalibrationRefused with the reason.

The fit is always made relative to the SIGNED model (`runner.base_manifest`): a runner
that already runs a calibration `X+cal.N` hands over features under its calibrated
normalisation, which are re-expressed under the signed one first, so a new calibration
replaces the previous one (never stacks on it) and the policy bounds hold against what
the publisher signed. Only the blocks since the drift's onset are fitted on (`since_onset`:
after the last anomaly / sensor-fault block). `fit(runner, blocks)` returns a `FittedCalibration` (the
calibration, the signed model's identity and the must-detect figures); the updates
component (edgerund/updates/adaptation.py) makes it a device-signed overlay and installs
it as a `X+cal.N` slot through the update gate. `forced_calibration(runner)` builds a
deliberately wrong one inside the policy (every vibration band reads +3 reference sd:
the normal plant looks like a fault) for the gate's rollback test, or with
`shift_sd=0.0` the signed model under a calibration version (power-cut tests); it is
reachable only through a test hook.

Output-layer refit (`calibration.calibrate`): when the signed policy allows it and the
manifest ships its `output_layer`, `hidden_scorer_for` opens a second session on the
verified model bytes with the last hidden layer as an extra output
(edgerund.inference.outlayer.with_hidden_output); it is used only if the plain
calibration is refused.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.inference.calibration import (
    Calibration,
    CalibrationRefused,
    FitInput,
    MustDetect,
    OutputLayerInput,
    apply_normalization,
    calibrate,
    check_must_detect,
    check_policy,
)
from edgerund.inference.drift import feature_channels
from edgerund.inference.manifest import check_file
from edgerund.inference.outlayer import HIDDEN_OUTPUT, with_hidden_output
from edgerund.inference.profile import AdaptationPolicy
from edgerund.inference.session import open_session

__all__ = [
    "FittedCalibration",
    "dry_run",
    "fit",
    "forced_calibration",
    "hidden_scorer_for",
    "lower_priority",
    "output_layer_input",
    "scorer_for",
    "since_onset",
]

LOW_PRIORITY_NICE = 10


def lower_priority() -> None:
    """Raise this thread's nice value (best effort; Linux only)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY_NICE)
    except (AttributeError, OSError):  # pragma: no cover - other platforms, restricted
        pass


def scorer_for(model_path: Path) -> Any:
    sess = open_session(model_path)
    inp = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name

    def score(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        rows = np.asarray(x, np.float32)
        res = np.empty(len(rows))
        for i, r in enumerate(rows):
            res[i] = sess.run([out], {inp: r[None, :]})[0].reshape(-1)[0]
            # Hand the GIL over after every row: this thread runs at nice +10, and on a
            # loaded machine it is preempted while holding the GIL, leaving the event
            # loop's thread waiting for it (priority inversion) up to the 5 ms switch
            # interval and more. Every 8 rows: 53 of 375 ticks of the 10 ms loop missed
            # during a fit; every row: 17 of 1104 (benchmarks/adaptation.py, live).
            time.sleep(0)
        return res

    return score


def hidden_scorer_for(model: bytes, tensor: str, width: int) -> Any:
    """rows -> (scores, hidden activations) with a session on `model` (the verified bytes)
    that also outputs `tensor` (edgerund.inference.outlayer)."""
    sess = open_session(with_hidden_output(model, tensor, width))
    inp = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name

    def run(x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        rows = np.asarray(x, np.float32)
        s, h = np.empty(len(rows)), np.empty((len(rows), width))
        for i, r in enumerate(rows):
            a, b = sess.run([out, HIDDEN_OUTPUT], {inp: r[None, :]})
            s[i], h[i] = a.reshape(-1)[0], b.reshape(-1)
            time.sleep(0)  # the GIL, as in scorer_for
        return s, h

    return run


def output_layer_input(man: Any, model_dir: Path) -> OutputLayerInput | None:
    """The refit's inputs for a manifest that ships its output layer (else None)."""
    ol = man.output_layer
    if ol is None:
        return None
    data = check_file(model_dir, man.model_file, man.model_sha256, "model.file")
    with np.load(model_dir / ol.file, allow_pickle=False) as g:
        w, b = np.asarray(g[ol.weights], np.float64), np.asarray(g[ol.bias], np.float64)
    return OutputLayerInput(hidden_scorer_for(data, ol.hidden_tensor, ol.hidden_size), w, b)


@dataclass(frozen=True)
class FittedCalibration:
    """A calibration of the signed model `base_version`, checked against its policy and
    must-detect vectors, not yet signed nor installed."""

    model: str
    base_version: str
    manifest_sha256: bytes  # of the signed model manifest.json it calibrates
    calibration: Calibration
    policy: AdaptationPolicy
    threshold_signed: float
    must_detect: dict[str, Any] = field(default_factory=dict)
    fit_ms: float = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "base_version": self.base_version,
            **self.calibration.summary(),
            "threshold_signed": self.threshold_signed,
            "must_detect": self.must_detect,
            "fit_ms": self.fit_ms,
        }


def _signed(runner: Any) -> Any:
    man = getattr(runner, "base_manifest", None) or runner.manifest
    if man.profile is None or man.adaptation is None:
        raise CalibrationRefused(
            "no_policy", "the model manifest has no reference_profile / adaptation policy"
        )
    return man


def _check(runner: Any, man: Any, cal: Calibration, scorer: Any) -> dict[str, Any]:
    check_policy(cal, man.adaptation)
    if man.must_detect is None:
        return {}
    g = np.load(Path(runner.model_dir) / man.must_detect.file)
    return check_must_detect(
        g[man.must_detect.features],
        g[man.must_detect.case],
        man.must_detect.cases,
        mean=cal.mean,
        std=cal.std,
        threshold=cal.threshold,
        scorer=scorer,
    )


def since_onset(blocks: Sequence[tuple[Any, Any, str]]) -> list[tuple[Any, Any, str]]:
    """The blocks after the last anomaly or sensor-fault block: the plant as it is now.
    A step drift (a gain change) trips the model for a run of blocks before the monitor
    calls it drift; the normal blocks from before that run are the plant as it WAS, and a
    shift fitted on both would fit neither (their scores under it push the threshold up).
    A gradual drift has no such marker and is fitted on the whole window."""
    last = max((i for i, b in enumerate(blocks) if b[2] in ("anomaly", "sensor_fault")), default=-1)
    return list(blocks[last + 1 :])


def fit(runner: Any, blocks: Sequence[tuple[Any, Any, str]]) -> FittedCalibration:
    """Fit and check a calibration of `runner`'s signed model on the blocks since the
    drift's onset (`since_onset`; blocking: a worker thread, which this lowers to nice
    +10). Raises CalibrationRefused."""
    lower_priority()
    t0 = time.perf_counter()
    blocks = since_onset(blocks)
    man = _signed(runner)
    spec, cur = man.preprocessing, runner.manifest.preprocessing
    names, _ = feature_channels(
        spec.n_features, spec.axes, spec.n_bands, spec.vibration_input, spec.scalars
    )
    if tuple(cur.mean) != tuple(spec.mean) or tuple(cur.std) != tuple(spec.std):
        # the running calibration's features, under the signed normalisation
        blocks = [
            (apply_normalization(xs, cur.mean, cur.std, spec.mean, spec.std), sc, st)
            for xs, sc, st in blocks
        ]
    scorer = scorer_for(Path(runner.model_path))
    md = None
    if man.must_detect is not None:
        g = np.load(Path(runner.model_dir) / man.must_detect.file)
        md = MustDetect(g[man.must_detect.features], g[man.must_detect.case], man.must_detect.cases)
    refit = None
    if "output_layer" in man.adaptation.parameters:
        refit = output_layer_input(man, Path(runner.model_dir))
    cal, must = calibrate(
        FitInput(list(blocks)),
        profile=man.profile,
        policy=man.adaptation,
        mean0=spec.mean,
        std0=spec.std,
        threshold0=float(man.threshold),
        scorer=scorer,
        names=names,
        must_detect=md,
        output_layer=refit,
    )
    return _fitted(runner, man, cal, must, fit_ms=round((time.perf_counter() - t0) * 1e3, 1))


def _fitted(
    runner: Any, man: Any, cal: Calibration, must: dict[str, Any], fit_ms: float = 0.0
) -> FittedCalibration:
    return FittedCalibration(
        model=runner.name,
        base_version=man.version,
        manifest_sha256=man.sha256,
        calibration=cal,
        policy=man.adaptation,
        threshold_signed=float(man.threshold),
        must_detect=must,
        fit_ms=fit_ms,
    )


BAD_SHIFT_SD = -3.0


def forced_calibration(runner: Any, shift_sd: float = BAD_SHIFT_SD) -> FittedCalibration:
    """A calibration that shifts every vibration band by `shift_sd` reference sd, not
    fitted to anything (test hooks only). The default is wrong for the plant (module
    docstring: the mean moves down, every live band reads 3 sd high): it passes the
    signature, policy and must-detect checks and must be caught by the probation; 0.0
    is the signed model itself under a calibration version (the power-cut tests)."""
    lower_priority()
    man = _signed(runner)
    spec, prof = man.preprocessing, man.profile
    n_vib = spec.axes * spec.n_bands
    d = np.zeros(spec.n_features)
    d[:n_vib] = shift_sd
    m0, s0, sd = (np.asarray(v, np.float64) for v in (spec.mean, spec.std, prof.std))
    mean = (m0 + s0 * d * sd).astype(np.float32).astype(np.float64)
    cal = Calibration(
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in s0.astype(np.float32).astype(np.float64)),
        threshold=float(np.float32(man.threshold)),
        shift_sd=tuple(float(v) for v in d),
        scale=tuple(1.0 for _ in d),
        samples=man.adaptation.min_samples,
        excluded_blocks=0,
        threshold_ratio=1.0,
        false_alarm_before=0.0,
        false_alarm_after=0.0,
        changes=[{"feature": "accel_g.*", "shift_sd": shift_sd, "scale": 1.0}],
    )
    return _fitted(runner, man, cal, _check(runner, man, cal, scorer_for(Path(runner.model_path))))


def dry_run(runner: Any, blocks: Sequence[tuple[Any, Any, str]]) -> dict[str, Any]:
    f = fit(runner, blocks)
    cal = getattr(runner, "calibration", None)
    seq = 1
    if cal:
        seq = int(str(cal["version"]).rsplit(".", 1)[-1]) + 1
    return {
        "ok": True,
        "model": runner.name,
        "base_version": f.base_version,
        "would_be": f"{f.base_version}+cal.{seq}",
        **f.calibration.summary(),
        "threshold_before": float(runner.threshold),
        "must_detect": f.must_detect,
        "fit_ms": f.fit_ms,
    }
