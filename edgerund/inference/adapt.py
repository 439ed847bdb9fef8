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

Not implemented yet (docs/learning.md): installing the calibration as a `+cal.N` slot
(model files unchanged + the device-signed overlay) through the updates component's
precheck / trial / probation / commit, its start-up re-verification, automatic
adaptation on persistent drift (`auto_adapt`).

Output-layer refit (`calibration.calibrate`): when the manifest ships its `output_layer`,
`hidden_scorer_for` opens a second session on the verified model bytes with the last hidden
layer as an extra output (edgerund.inference.outlayer.with_hidden_output); it is used only
if the plain calibration is refused and the policy allows the refit.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.inference.calibration import (
    CalibrationRefused,
    FitInput,
    MustDetect,
    OutputLayerInput,
    calibrate,
)
from edgerund.inference.drift import feature_channels
from edgerund.inference.manifest import check_file
from edgerund.inference.outlayer import HIDDEN_OUTPUT, with_hidden_output
from edgerund.inference.session import open_session

__all__ = ["dry_run", "hidden_scorer_for", "lower_priority", "output_layer_input", "scorer_for"]

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


def dry_run(runner: Any, blocks: Sequence[tuple[Any, Any, str]]) -> dict[str, Any]:
    lower_priority()
    t0 = time.perf_counter()
    man = runner.manifest
    if man.profile is None or man.adaptation is None:
        raise CalibrationRefused(
            "no_policy", "the model manifest has no reference_profile / adaptation policy"
        )
    spec = man.preprocessing
    names, _ = feature_channels(
        spec.n_features, spec.axes, spec.n_bands, spec.vibration_input, spec.scalars
    )
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
        threshold0=float(runner.threshold),
        scorer=scorer,
        names=names,
        must_detect=md,
        output_layer=refit,
    )
    return {
        "ok": True,
        "model": runner.name,
        "base_version": runner.version,
        "would_be": f"{runner.version}+cal.1",
        **cal.summary(),
        "threshold_before": float(runner.threshold),
        "must_detect": must,
        "fit_ms": round((time.perf_counter() - t0) * 1e3, 1),
    }
