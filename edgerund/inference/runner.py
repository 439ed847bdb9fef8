"""`ModelRunner`: one loaded, checked, warmed-up ONNX model behind a one-call API.

Theory of operation
-------------------
`ModelRunner.load(model_dir)` does all the slow and fallible work once, in the calling
thread (the registry calls it off the event loop):

1. parse `manifest.json` (edgerund.inference.manifest; errors name the field) and read
   the model file, checking its SHA-256 against the manifest;
2. create an onnxruntime session fitted to tiny models (edgerund/inference/session.py:
   single-threaded, no spinning pools, ORT_ENABLE_ALL so QDQ int8 fuses into QGemm).
   A file that is not ONNX is refused here with onnxruntime's reason;
3. the ABI check: the graph's inputs and outputs must equal the manifest's
   `model_inputs`/`model_outputs` in name, dtype and shape; a mismatch names both sides;
4. bind preallocated buffers with IOBinding: the preprocessor writes the feature vector
   into a numpy array that *is* the bound input, onnxruntime writes the score into a
   numpy array that *is* the bound output (saves the per-call feed dict and output
   allocation, ~2-4 us per call on x86);
5. warm up and time `warmup_runs` calls; when their p90 exceeds the latency budget the
   runner is marked `inline = False` and `infer_async` runs it on a dedicated thread
   instead of on the event loop;
6. reproduce the golden vectors (features and scores within the manifest's tolerances):
   a runtime that computes something else than the build refuses the model.

`infer(inputs, times=None)` runs preprocessing + the session and never raises for bad
data. `times` maps a windowed input's name to its per-sample timestamps (seconds, the
hub's `t_mono`): a `fft_band_energy/2` model resamples that input on them, so its score
does not depend on read-time jitter (edgerund/inference/features.py). Without them the
samples are taken as evenly spaced (the /1 behaviour, counted as `untimed`); timestamps
that cannot be interpolated (not increasing, a gap over the manifest's `max_gap_ms`, a
window that covers too short a time) are an input fault. A
missing or malformed input, a non-finite input and a NaN/Inf score each return
`InferenceResult(ok=False, fault=...)` and are counted (`faults`, `nan_outputs`,
`input_faults`), so the control loop hands the decision to its fallback rule. Latencies
(last 1024 calls) and scores (last 256) are kept in fixed ring buffers for `stats()`
(p50/p99/max, recent score mean/std for the update probation) without allocation.

A calibration that refit the output layer (edgerund.inference.outlayer) is applied with
`use_output_layer(weights, bias)` at load: the runner then runs a second session on the
same verified model bytes with the last hidden layer as an extra output, and computes the
score itself, `sum((x - (h W' + b'))^2)` (~75 us a call instead of ~25 us here: the
derived graph's last two layers are not fused; well inside the latency budget).

A runner is immutable once loaded; a swap replaces the whole object (registry.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.inference.errors import ModelError
from edgerund.inference.features import FeatureError, Preprocessor
from edgerund.inference.manifest import ModelManifest, check_file, load_manifest
from edgerund.inference.session import CPU, ProviderChoice, open_session, open_session_with
from edgerund.updates.abi import ORT_DTYPES, TensorSpec

__all__ = ["InferenceResult", "ModelRunner"]

_LAT_RING = 1024
_SCORE_RING = 256


@dataclass(frozen=True, slots=True)
class InferenceResult:
    score: float
    ok: bool
    fault: str | None
    infer_us: float


def _describe_graph(t: Any) -> str:
    return f"{t.name!r} {ORT_DTYPES.get(t.type, t.type)}{list(t.shape)}"


def check_abi(sess: Any, manifest: ModelManifest, model_path: Path) -> None:
    """Graph inputs/outputs == manifest model_inputs/model_outputs, else ModelError."""
    for kind, got, want in (
        ("input", sess.get_inputs(), manifest.model_inputs),
        ("output", sess.get_outputs(), manifest.model_outputs),
    ):
        got_names = [g.name for g in got]
        want_names = [w.name for w in want]
        if got_names != want_names:
            raise ModelError(
                f"ABI mismatch: manifest model_{kind}s {want_names} vs {model_path.name} "
                f"{kind}s {got_names}",
                code="abi_mismatch",
            )
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if not _tensor_matches(g, w):
                raise ModelError(
                    f"ABI mismatch: manifest model_{kind}s[{i}] {w.describe()} vs "
                    f"{model_path.name} {kind} {_describe_graph(g)}",
                    code="abi_mismatch",
                )


def _tensor_matches(g: Any, w: TensorSpec) -> bool:
    if ORT_DTYPES.get(g.type) != w.dtype:
        return False
    shape = list(g.shape)
    if len(shape) != len(w.shape):
        return False
    # A symbolic dimension (batch "N") accepts the manifest's concrete value.
    return all((not isinstance(d, int)) or d == e for d, e in zip(shape, w.shape, strict=True))


class _RefitHead:
    """The score under a refit output layer: the derived session's hidden activations
    through (W', b') (edgerund.inference.outlayer)."""

    def __init__(self, sess: Any, input_name: str, w: npt.NDArray[Any], b: npt.NDArray[Any]):
        from edgerund.inference.outlayer import HIDDEN_OUTPUT

        self._sess = sess
        self._input = input_name
        self._out = [HIDDEN_OUTPUT]
        self._w = w
        self._b = b

    def __call__(self, x: npt.NDArray[np.float32]) -> float:
        h = self._sess.run(self._out, {self._input: x})[0]
        r = x.reshape(-1) - (h.reshape(-1) @ self._w + self._b)
        return float(r @ r)


class ModelRunner:
    """A loaded model. Construct with `ModelRunner.load(model_dir)`."""

    def __init__(
        self,
        manifest: ModelManifest,
        session: Any,
        model_dir: Path,
        model_path: Path,
        *,
        threshold: float,
        latency_budget_us: float,
    ) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.model_dir = model_dir
        self.model_path = model_path
        self.threshold = threshold
        self.latency_budget_us = latency_budget_us
        self.inline = True
        self.warmup_us: dict[str, float] = {}
        self.providers = ProviderChoice((CPU,), CPU)  # set by load() to the real choice
        self._sess = session
        self._pre = Preprocessor(manifest.preprocessing)
        self._timed = manifest.preprocessing.timed
        out_spec = next(t for t in manifest.model_outputs if t.name == manifest.output_name)
        self._y: npt.NDArray[np.float32] = np.zeros(out_spec.static_shape(), dtype=np.float32)
        self._y_flat = self._y.reshape(-1)
        self._x_val = ort.OrtValue.ortvalue_from_numpy(self._pre.out)
        self._y_val = ort.OrtValue.ortvalue_from_numpy(self._y)
        self._binding = session.io_binding()
        self._binding.bind_ortvalue_input(manifest.model_inputs[0].name, self._x_val)
        self._binding.bind_ortvalue_output(manifest.output_name, self._y_val)
        for t in manifest.model_outputs:  # other outputs, if any: let ORT allocate them
            if t.name != manifest.output_name:
                self._binding.bind_output(t.name, "cpu")
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # counters and rings
        self.inferences = 0
        self.faults = 0
        self.nan_outputs = 0
        self.input_faults = 0
        self.untimed = 0  # calls of a timestamp-resampling model made without timestamps
        self.last_fault: str | None = None
        self._lat = np.zeros(_LAT_RING, dtype=np.float64)
        self._lat_n = 0
        self._scores = np.zeros(_SCORE_RING, dtype=np.float64)
        self._scores_n = 0
        # (features, score) of each good inference for the drift task, when it set one
        # (a bounded deque: edgerund.inference.driftwatch); one copy of 50 floats a tick.
        self.tap: Any = None
        self._head: _RefitHead | None = None  # a refit output layer (use_output_layer)
        # A device calibration (edgerund.inference.overlay) applied at load: the signed
        # manifest stays in `base_manifest`, `manifest` carries the calibrated
        # normalisation, threshold and version `X+cal.N`; `calibration` is its summary.
        self.base_manifest = manifest
        self.calibration: dict[str, Any] | None = None
        # sha256 of the calibration.json bytes applied: measured into the attestation
        self.overlay_sha256: bytes | None = None

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        *,
        model_file: str | None = None,
        latency_budget_us: float = 2000.0,
        warmup_runs: int = 50,
        check_golden: bool = True,
        providers: Sequence[str] = (CPU,),
    ) -> ModelRunner:
        """Load, check and warm up the model in `model_dir` (blocking; seconds at most).

        `model_file` selects another file the manifest names (`reference_fp32.file` for
        the fp32 comparison model; its own threshold and golden scores are used)."""
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        threshold = manifest.threshold
        golden_keys: tuple[str, ...]
        if model_file is None or model_file == manifest.model_file:
            fname, sha = manifest.model_file, manifest.model_sha256
            golden_keys = (
                ("score_int8", "score") if manifest.precision == "int8" else ("score_fp32", "score")
            )
        elif model_file == manifest.fp32_file:
            fname, sha = manifest.fp32_file, manifest.fp32_sha256
            if manifest.fp32_threshold is not None:
                threshold = manifest.fp32_threshold
            golden_keys = ("score_fp32",)
        else:
            named = [f for f in (manifest.model_file, manifest.fp32_file) if f]
            raise ModelError(
                f"{model_dir / 'manifest.json'}: model file {model_file!r} is not named by the "
                f"manifest (expected one of {named})",
                code="manifest",
            )
        field_path = "model.file" if fname == manifest.model_file else "reference_fp32.file"
        data = check_file(model_dir, fname, sha, field_path)
        model_path = model_dir / fname
        try:
            sess, choice = open_session_with(data, providers)
        except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidProtobuf...)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{model_path}: not a loadable ONNX model: {reason[:300]}", code="not_onnx"
            ) from None
        check_abi(sess, manifest, model_path)
        runner = cls(
            manifest,
            sess,
            model_dir,
            model_path,
            threshold=threshold,
            latency_budget_us=latency_budget_us,
        )
        runner.providers = choice
        golden = runner._load_golden() if manifest.golden is not None else None
        runner._warm_up(warmup_runs, golden)
        if check_golden and golden is not None:
            key = next((k for k in golden_keys if k in golden), golden_keys[0])
            runner._check_golden(golden, key)
        if model_file is None or model_file == manifest.model_file:
            # A calibrated slot: the golden vectors were reproduced under the signed
            # normalisation above; the device's overlay applies from here on, and the
            # golden inputs are run again under it (_check_golden_calibrated).
            runner._apply_overlay()
            if check_golden and golden is not None and runner.calibration is not None:
                runner._check_golden_calibrated(golden)
        runner._reset_counters()
        return runner

    def use_output_layer(self, weights: npt.ArrayLike, bias: npt.ArrayLike) -> None:
        """Score with a refit output layer from now on (blocking: opens a session). The
        caller has verified the calibration overlay that carries it."""
        from edgerund.inference.outlayer import with_hidden_output

        ol = self.manifest.output_layer
        if ol is None:
            raise ModelError(
                f"{self.model_dir}: the manifest ships no output_layer", code="overlay"
            )
        w = np.asarray(weights, np.float32)
        b = np.asarray(bias, np.float32).reshape(-1)
        if w.shape != (ol.hidden_size, self._pre.out.size) or b.shape != (self._pre.out.size,):
            raise ModelError(
                f"{self.model_dir}: output layer shapes {w.shape}/{b.shape}", code="overlay"
            )
        data = check_file(
            self.model_dir, self.manifest.model_file, self.manifest.model_sha256, "model.file"
        )
        sess = open_session(with_hidden_output(data, ol.hidden_tensor, ol.hidden_size))
        self._head = _RefitHead(sess, self.manifest.model_inputs[0].name, w, b)

    def _apply_overlay(self) -> None:
        from edgerund.inference.calibration import CalibrationRefused
        from edgerund.inference.overlay import overlay_seq, read_overlay_measured

        try:
            found = read_overlay_measured(self.model_dir)
        except (CalibrationRefused, OSError) as exc:
            raise ModelError(
                f"{self.model_dir}: calibration overlay: {exc}", code="overlay"
            ) from None
        if found is None:
            return
        doc, _, overlay_sha256 = found
        man = self.manifest
        try:
            if doc.get("model_manifest_sha256") != man.sha256.hex():
                raise ValueError("bound to another model manifest")
            if overlay_seq(str(doc.get("version"))) is None:
                raise ValueError(f"version {doc.get('version')!r} is not X+cal.N")
            norm = doc["normalization"]
            mean = tuple(float(v) for v in norm["mean"])
            std = tuple(float(v) for v in norm["std"])
            threshold = float(doc["threshold"])
            self._pre.renormalize(mean, std)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{self.model_dir}: calibration overlay refused: {exc}", code="overlay"
            ) from None
        layer = doc.get("output_layer")
        if layer is not None:  # an output-layer refit (calibration.py): score with it
            try:
                self.use_output_layer(layer["weights"], layer["bias"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(
                    f"{self.model_dir}: calibration overlay output layer refused: {exc}",
                    code="overlay",
                ) from None
        self.base_manifest = man
        self.manifest = dataclasses.replace(
            man,
            version=str(doc["version"]),
            threshold=threshold,
            preprocessing=dataclasses.replace(man.preprocessing, mean=mean, std=std),
        )
        self.version = self.manifest.version
        self.threshold = threshold
        self.overlay_sha256 = overlay_sha256
        raw_summary = doc.get("summary")
        summary: dict[str, Any] = raw_summary if isinstance(raw_summary, dict) else {}
        self.calibration = {
            "version": self.version,
            "base_version": man.version,
            "threshold": threshold,
            "threshold_signed": man.threshold,
            "samples": summary.get("samples"),
            "max_shift_sd": summary.get("max_shift_sd"),
            "changes": summary.get("changes", []),
            "created": doc.get("created"),
            "device_key_id": doc.get("device_key_id"),
        }

    def _load_golden(self) -> dict[str, npt.NDArray[Any]]:
        g = self.manifest.golden
        assert g is not None
        check_file(self.model_dir, g.file, g.sha256, "golden.file")
        try:
            with np.load(self.model_dir / g.file, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{self.model_dir / g.file}: not a readable .npz ({exc})", code="golden"
            ) from None

    def _golden_inputs(self, golden: Mapping[str, npt.NDArray[Any]], i: int) -> dict[str, Any]:
        return {inp.name: golden[inp.name][i] for inp in self.manifest.inputs}

    def _golden_times(
        self, golden: Mapping[str, npt.NDArray[Any]], i: int
    ) -> dict[str, Any] | None:
        """Timestamps of golden vector i: array `<input>_t` per timed input, if present."""
        t = {
            inp.name: golden[f"{inp.name}_t"][i]
            for inp in self.manifest.inputs
            if f"{inp.name}_t" in golden
        }
        return t or None

    def _warm_up(self, runs: int, golden: Mapping[str, npt.NDArray[Any]] | None) -> None:
        if golden is not None and all(i.name in golden for i in self.manifest.inputs):
            feeds = self._golden_inputs(golden, 0)
            times = self._golden_times(golden, 0)
        else:
            times = None
            feeds = {i.name: np.zeros(i.shape, dtype=i.dtype) for i in self.manifest.inputs}
            # A constant vibration window has no spectrum: log10(floor) is fine numerically.
        lat = np.empty(max(1, runs))
        for k in range(lat.size):
            res = self.infer(feeds, times)
            lat[k] = res.infer_us
        self.warmup_us = {
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "max": float(lat.max()),
        }
        self.inline = self.warmup_us["p90"] <= self.latency_budget_us

    def _check_golden(self, golden: Mapping[str, npt.NDArray[Any]], key: str) -> None:
        g = self.manifest.golden
        assert g is not None
        missing = [k for k in [*(i.name for i in self.manifest.inputs), key] if k not in golden]
        if missing:
            raise ModelError(
                f"{self.model_dir / g.file}: arrays {missing} missing (has {sorted(golden)})",
                code="golden",
            )
        n = int(golden[key].shape[0])
        for i in range(n):
            res = self.infer(self._golden_inputs(golden, i), self._golden_times(golden, i))
            feats = self._pre.out[0]
            if "features" in golden:
                want_f = golden["features"][i]
                err = float(np.max(np.abs(feats - want_f)))
                if not err <= g.feature_atol:
                    raise ModelError(
                        f"golden vector {i}: features differ from the build by {err:.3g} "
                        f"(max {g.feature_atol})",
                        code="golden_mismatch",
                    )
            want = float(golden[key][i])
            if not res.ok or not math.isclose(res.score, want, rel_tol=g.rtol, abs_tol=g.atol):
                raise ModelError(
                    f"golden vector {i}: score {res.score:.6g} vs expected {want:.6g} "
                    f"(rtol {g.rtol}, atol {g.atol}){'; fault ' + str(res.fault) if not res.ok else ''}",
                    code="golden_mismatch",
                )

    def _check_golden_calibrated(self, golden: Mapping[str, npt.NDArray[Any]]) -> None:
        """The golden inputs under the overlay: the features are the build's re-expressed
        under the calibrated normalisation (`raw = f s0 + m0`, then `(raw - m') / s'`),
        to the golden feature tolerance, and every score is finite. (The build's scores
        are under the signed normalisation: they do not apply here.)"""
        g = self.manifest.golden
        if g is None or "features" not in golden:
            return
        s0 = np.asarray(self.base_manifest.preprocessing.std, np.float64)
        m0 = np.asarray(self.base_manifest.preprocessing.mean, np.float64)
        m1 = np.asarray(self.manifest.preprocessing.mean, np.float64)
        s1 = np.asarray(self.manifest.preprocessing.std, np.float64)
        for i in range(int(golden["features"].shape[0])):
            res = self.infer(self._golden_inputs(golden, i), self._golden_times(golden, i))
            want = (np.asarray(golden["features"][i], np.float64) * s0 + m0 - m1) / s1
            # the tolerance scales with the overlay's stretch of the feature axis
            tol = g.feature_atol * max(1.0, float(np.max(s0 / s1)))
            err = float(np.max(np.abs(self._pre.out[0] - want)))
            if not res.ok or not err <= tol:
                raise ModelError(
                    f"golden vector {i} under the calibration: features differ by {err:.3g}"
                    f" (max {tol:.3g}){'; fault ' + str(res.fault) if not res.ok else ''}",
                    code="golden_mismatch",
                )

    def _reset_counters(self) -> None:
        self.inferences = self.faults = self.nan_outputs = self.input_faults = 0
        self.untimed = 0
        self.last_fault = None
        self._lat_n = self._scores_n = 0

    # -- inference -----------------------------------------------------------------------

    def infer(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        times: Mapping[str, npt.ArrayLike] | None = None,
    ) -> InferenceResult:
        """Preprocess `inputs` (raw arrays by the manifest's input names) and run the model.

        `times`: per-sample timestamps (seconds) by input name, for the windowed input the
        preprocessing resamples (`accel_g` of the reference model); see the module
        docstring. Never raises for bad data: faults come back as ok=False with a reason."""
        with self._lock:
            t0 = time.perf_counter()
            self.inferences += 1
            if self._timed and not self._pre.timed_input(times):
                self.untimed += 1
            try:
                x = self._pre(inputs, times)
            except KeyError as exc:
                return self._fault(t0, f"input {exc.args[0]!r} missing", kind="input")
            except (FeatureError, ValueError, TypeError) as exc:
                return self._fault(t0, f"bad input: {exc}", kind="input")
            if not np.isfinite(x).all():
                return self._fault(t0, "non-finite input (NaN/Inf in a raw input)", kind="input")
            try:
                if self._head is None:
                    self._sess.run_with_iobinding(self._binding)
                    score = float(self._y_flat[0])
                else:
                    score = self._head(self._pre.out)
            except Exception as exc:  # onnxruntime runtime failure: a model fault
                return self._fault(t0, f"onnxruntime: {str(exc).splitlines()[0][:200]}")
            us = (time.perf_counter() - t0) * 1e6
            self._lat[self._lat_n % _LAT_RING] = us
            self._lat_n += 1
            if not math.isfinite(score):
                self.nan_outputs += 1
                return self._fault(t0, f"non-finite model output ({score})", us=us)
            self._scores[self._scores_n % _SCORE_RING] = score
            self._scores_n += 1
            tap = self.tap
            if tap is not None:
                tap.append((x.reshape(-1).copy(), score))
            return InferenceResult(score, True, None, us)

    def _fault(
        self, t0: float, reason: str, *, kind: str = "model", us: float | None = None
    ) -> InferenceResult:
        self.faults += 1
        if kind == "input":
            self.input_faults += 1
        self.last_fault = reason
        if us is None:
            us = (time.perf_counter() - t0) * 1e6
        return InferenceResult(math.nan, False, reason, us)

    async def infer_async(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        times: Mapping[str, npt.ArrayLike] | None = None,
    ) -> InferenceResult:
        """`infer` inline on the event loop when within budget, else on a dedicated thread.

        The caller must not modify `inputs` or `times` until this returns."""
        if self.inline:
            return self.infer(inputs, times)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"model-{self.name}"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.infer, inputs, times)

    # -- figures -------------------------------------------------------------------------

    def score_mean(self) -> float | None:
        """Mean anomaly score over the recent score ring (None before the first score)."""
        m = min(self._scores_n, _SCORE_RING)
        return float(self._scores[:m].mean()) if m else None

    def stats(self) -> dict[str, Any]:
        n = min(self._lat_n, _LAT_RING)
        lat = self._lat[:n]
        m = min(self._scores_n, _SCORE_RING)
        sc = self._scores[:m]
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.manifest.precision,
            "mode": "inline" if self.inline else "thread",
            "threshold": self.threshold,
            "calibration": self.calibration,
            "inferences": self.inferences,
            "faults": self.faults,
            "nan_outputs": self.nan_outputs,
            "input_faults": self.input_faults,
            "timed": self._timed,
            "untimed": self.untimed,
            "last_fault": self.last_fault,
            "infer_us": {
                "p50": round(float(np.percentile(lat, 50)), 1) if n else None,
                "p99": round(float(np.percentile(lat, 99)), 1) if n else None,
                "max": round(float(lat.max()), 1) if n else None,
            },
            "warmup_us": {k: round(v, 1) for k, v in self.warmup_us.items()},
            **self.providers.as_dict(),
            "score": {
                "mean": float(sc.mean()) if m else None,
                "std": float(sc.std()) if m else None,
                "n": m,
            },
        }

    def close(self) -> None:
        """Stop the dedicated thread, if any (an in-flight call finishes first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def __repr__(self) -> str:
        return f"<ModelRunner {self.name} {self.version} {self.model_path}>"
