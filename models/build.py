#!/usr/bin/env python3
"""Build the reference anomaly model from generated data, deterministically.

    python models/build.py                 # rebuild models/reference/ + the README report
    python models/build.py --out DIR       # build elsewhere (the reproducibility test)

Pipeline (every step seeded; the same machine class gives the same bytes):

1. **Data.** Normal-operation windows from the shared plant generator
   (`drivers/emulated/scenario.py`) for several training plants (seeds): 256 samples x 3
   axes of motor-housing acceleration as the simulated gateway samples them (emulated
   MPU-6050 on a 1 kHz grid with a random sub-grid phase, read by a 200 Hz poll; 16-bit
   quantisation at +-2 g), each sample stamped the way the hub stamps it (`t_mono`: the
   read's completion), plus the cabinet temperature (0.01 degC) and the motor current
   (1 mA) at the end of the window. The poll's timing is drawn per window from
   `TIMING_MIX`: steady (idle machine), the hub on a busy 2-core box (lateness, jitter,
   stalls, skipped deadlines), heavy load (lateness up to 10 ms, gaps up to ~35 ms) and
   independent gaps of 2-15 ms. Held-out plants (other seeds, the simulator's default 42
   included) give normal and anomalous test windows, also under each timing regime.
2. **Features.** `edgerund.inference.features` kind `fft_band_energy/2` (the same code
   the daemon runs): the window is resampled on its timestamps onto an exact 200 Hz grid
   (linear interpolation), then log10 band energies of a Hann-windowed FFT per axis (16
   bands of 6.25 Hz) + temperature + current, standardised with training statistics
   stored in the manifest. The resampling removes the timing jitter's phase noise (what
   made model 1.0.0 score a busy gateway's normal windows as anomalies); what it cannot
   remove (sparser samples carry less high-frequency noise energy) is in the training mix.
   The scalar inputs' scale is divided by `SCALAR_GAIN` so the autoencoder's loss weighs
   them like a band (otherwise it ignores them and reconstructs their mean).
3. **Autoencoder, trained on normal windows only** (scikit-learn `MLPRegressor`, ReLU,
   Adam, fixed seed, single-threaded BLAS): 50 -> H -> H -> 8 -> H -> H -> 50.
4. **ONNX graph, written by hand with `onnx.helper`** (the daemon needs neither sklearn
   nor torch). The anomaly score is computed *inside* the graph:
   `score = mean_i(w_i * (x_i - AE(clip(x, lo, hi))_i)^2)`. The encoder sees the input
   clipped to the envelope seen in training (+5 %), the residual is taken against the
   unclipped input, so a value outside anything seen in training (an overheating cabinet)
   always scores; `w_i` is the inverse of feature i's residual variance on normal
   validation windows, so a well-predicted feature (temperature) counts as much as a
   noisy band. Model input `features` float32[1, 50], output `score` float32[1].
5. **int8**: static QDQ quantisation with `onnxruntime.quantization` (S8S8, per-tensor,
   MinMax calibration on normal training windows). Only the Gemm/Relu core is quantised;
   clip and score arithmetic stay fp32 (a few elementwise ops on 50 values).
6. **Threshold** from the int8 model's normal score distribution on validation windows:
   `THRESHOLD_MARGIN x` its 99.9th percentile.
7. **Golden vectors** (raw inputs, features, expected scores of both models; the int8
   output layer dequantised, for a device's closed-form refit) and the **manifest** (the
   model ABI, the learning fields of docs/learning.md), then a quality report: AUC per
   anomaly kind on held-out plants, fp32 vs int8, false positives and detection per
   timing regime, file sizes, and (not part of the artifacts) latency.

Reproducibility: BLAS is pinned to one thread and to one kernel family
(OPENBLAS_CORETYPE) *before* numpy loads; no timestamps are written anywhere (the npz is
written with fixed zip dates). ORT's calibration and numpy's transcendental functions
dispatch on CPU features, so bit-for-bit holds per CPU class (tests rebuild and compare on
the machine they run on).
"""

from __future__ import annotations

import os

# Before numpy/sklearn load: one BLAS thread and one kernel family -> reproducible sums.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drivers.emulated.scenario import Anomaly, Scenario  # noqa: E402
from edgerund.inference.features import (  # noqa: E402
    FFT_BAND_ENERGY_TIMED,
    FeatureSpec,
    Preprocessor,
)
from edgerund.inference.session import open_session  # noqa: E402

MODEL_NAME = "motor-ae"
MODEL_VERSION = "2.0.0"
SEED = 20261129
FS_HZ = 200.0
WINDOW = 256
AXES = 3
N_BANDS = 16
BAND_EDGES = tuple(1 + i * 8 for i in range(N_BANDS + 1))  # bins 1..128 in 8-bin bands
LOG_FLOOR = 1e-10
MAX_GAP_MS = 50.0  # longest sample gap the features interpolate over (else: input fault)
MIN_DENSITY = 0.4  # at least 40 % of the nominal samples in the window's span (else: fault)
STALL_MAX_MS = 25.0  # training stalls stay inside MAX_GAP_MS; longer ones are faults
SCALARS = ("temp_c", "current_a")
SCALAR_GAIN = 4.0
HIDDEN = 512
BOTTLENECK = 8
EPOCHS = 30
CLIP_MARGIN = 0.05
THRESHOLD_QUANTILE = 0.999
THRESHOLD_MARGIN = 1.5
OPSET = 17

# Reference profile (the drift monitor's baseline) and the adaptation policy, both signed
# into the manifest; must-detect vectors (synthesised fault signatures a calibration may
# never stop detecting) go into golden.npz.
PROFILE_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
MUST_DETECT_CASES = (("bearing_wear", 0.5), ("bearing_wear", 1.0), ("bearing_wear", 2.0))
MUST_DETECT_CASES += (("overheat", 1.0),)
MUST_DETECT_PER_CASE = 4
MUST_DETECT_MARGIN = 1.25  # kept vectors score at least this x the threshold (no borderline)
ADAPTATION_POLICY: dict[str, Any] = {
    "parameters": ["normalization", "threshold", "output_layer"],
    "max_shift_sd": 4.0,
    "max_scale_ratio": 2.0,
    "max_threshold_ratio": 1.5,
    "min_samples": 600,
    "cooldown_s": 3600.0,
    "target_false_alarm": 0.001,
    "threshold_margin": THRESHOLD_MARGIN,
    "max_tail_ratio": 3.0,
    "max_output_change": 1.0,
    "output_ridge": 0.1,
}
# A device may refit the output layer in closed form (docs/learning.md): the manifest names
# the tensor the output layer reads (the device derives a session that also outputs it;
# the model files stay as built) and golden.npz carries that layer dequantised, float32.
HIDDEN_TENSOR = "relu4_DequantizeLinear_Output"

TRAIN_SEEDS = tuple(range(101, 109))
TRAIN_PER_SEED = 800
VAL_SEEDS = (201, 202)
VAL_PER_SEED = 500
TEST_SEEDS = (42, 301, 302, 303)
TEST_PER_SEED = 250
SPAN_S = 3 * 86400.0  # windows are drawn from three days of plant time (daily cycles)
CALIB_WINDOWS = 512

ACCEL_LSB_PER_G = 16384.0  # MPU-6050 at +-2 g
GRID_HZ = 1000.0  # the scenario's noise grid and the emulated MPU-6050's output rate
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class Windows:
    accel: F32  # (n, WINDOW, AXES) g
    temp: F32  # (n, 1) degC
    current: F32  # (n, 1) A
    times: F64  # (n, WINDOW) s: each sample's timestamp as the hub stamps it (t_mono)

    def inputs(self, i: int) -> dict[str, F32]:
        return {"accel_g": self.accel[i], "temp_c": self.temp[i], "current_a": self.current[i]}

    def times_of(self, i: int) -> dict[str, F64]:
        return {"accel_g": self.times[i]}

    def __len__(self) -> int:
        return int(self.accel.shape[0])

    def take(self, idx: Sequence[int]) -> Windows:
        ix = np.asarray(idx)
        return Windows(self.accel[ix], self.temp[ix], self.current[ix], self.times[ix])


# Timing regimes of the 200 Hz poll (see `poll_times_ms`) and their share of the windows
# the model is trained and validated on: the features resample on timestamps, and the
# model learns that whatever remains of the timing (less information when samples are
# sparse) is normal.
TIMING_MIX = (("steady", 0.12), ("hub", 0.38), ("heavy", 0.2), ("gaps", 0.15), ("starved", 0.15))
TIMINGS = tuple(name for name, _ in TIMING_MIX)


def poll_times_ms(rng: np.random.Generator, n: int, timing: str = "hub") -> F64:
    """(n, WINDOW) instants (ms after the window's first deadline) at which a 200 Hz poll
    reads the sensor.

    `timing`:
    - "hub": modelled on the hub (edgerund/hub/acquire.py) on a busy 2-core box. Each poll
      is late by a per-window base lateness (event-loop wake-up rounding, the I2C worker
      hop) plus per-poll jitter and rare multi-millisecond stalls. As in the hub, a
      deadline missed by less than a period is served late, and when a poll ends up a
      whole period or more behind, the deadlines it overran are skipped;
    - "steady": the same with ~50 us of jitter (an idle machine);
    - "heavy": a heavily loaded machine: each poll late by uniform(0, U) ms, U in 3..10 ms
      per window, plus stalls (gaps up to ~15 ms and more);
    - "starved": 5 ms reads with one stretch of 15-35 reads 8-35 ms apart (the hub's
      task starved of CPU for up to a second, as measured on an oversubscribed CPU);
    - "gaps": no deadlines at all, independent gaps uniform in 2..U ms, U in 10..20 ms
      per window (a sensor read at 90-170 Hz on average: what the hub achieves on an
      oversubscribed CPU; the jitter-invariance test uses 2..15 ms)."""
    period = 1000.0 / FS_HZ
    if timing == "starved":
        # 5 ms +- jitter, with one stretch of 15-35 reads where the poll starves
        gaps = np.clip(rng.normal(5.0, 1.5, (n, WINDOW)), 0.3, None)
        length = rng.integers(15, 36, n)
        start = rng.integers(0, WINDOW - 20, n)
        col = np.arange(WINDOW)[None, :]
        inside = (col >= start[:, None]) & (col < (start + length)[:, None])
        gaps = np.where(inside, rng.uniform(8.0, 35.0, (n, WINDOW)), gaps)
        return np.cumsum(gaps, axis=1)
    if timing == "gaps":
        top = rng.uniform(10.0, 20.0, n)[:, None]  # mean gap 6-11 ms: 45-85 % of 200 Hz
        gaps = 2.0 + rng.uniform(0.0, 1.0, (n, WINDOW)) * (top - 2.0)
        return np.cumsum(gaps, axis=1)
    n_dl = WINDOW + 160
    if timing == "steady":
        late = 0.2 + np.abs(rng.normal(0.0, 0.05, (n, n_dl)))
    elif timing == "heavy":
        top = rng.uniform(3.0, 10.0, n)[:, None]
        late = rng.uniform(0.0, 1.0, (n, n_dl)) * top
        stall = rng.random((n, n_dl)) < 0.01
        late = late + np.where(
            stall, np.minimum(rng.exponential(8.0, (n, n_dl)), STALL_MAX_MS), 0.0
        )
    elif timing == "hub":
        base = rng.uniform(0.0, 4.0, n)[:, None]
        sigma = rng.uniform(0.1, 2.0, n)[:, None]
        p_stall = rng.uniform(0.0, 0.02, n)[:, None]
        late = base + np.abs(rng.normal(0.0, 1.0, (n, n_dl))) * sigma
        stall = rng.random((n, n_dl)) < p_stall
        late = late + np.where(
            stall, np.minimum(rng.exponential(6.0, (n, n_dl)), STALL_MAX_MS), 0.0
        )
    else:
        raise ValueError(f"timing: expected one of {TIMINGS}, got {timing!r}")
    out = np.empty((n, WINDOW))
    count = np.zeros(n, dtype=np.int64)
    prev = np.full(n, -1e9)
    rows = np.arange(n)
    for k in range(n_dl):
        deadline = k * period
        take = (prev - deadline < period) & (count < WINDOW)  # else: overrun, skipped
        t = np.maximum(deadline + late[:, k], prev + 0.2)  # one read at a time
        out[rows[take], count[take]] = t[take]
        prev = np.where(take, t, prev)
        count += take
    if (count < WINDOW).any():  # pragma: no cover - 160 spare deadlines always suffice
        raise RuntimeError("poll model ran out of deadlines")
    return out


def sample_windows(
    seed: int,
    n: int,
    anomalies: Sequence[Anomaly] = (),
    t_min_s: float = 0.0,
    t_max_s: float = SPAN_S,
    draw_seed: int = 0,
    timing: str = "mix",
) -> Windows:
    """`n` windows of plant `seed` starting at random instants in [t_min_s, t_max_s).

    Sampled the way the simulated gateway sees the plant (drivers/emulated/simulated.py,
    edgerund/hub/acquire.py): the emulated MPU-6050 makes a sample every 1 ms of its own
    clock, at a sub-grid phase `w` (random per window) of the scenario's 1 kHz noise grid,
    linearly interpolated; a poll (`poll_times_ms`; `timing` "mix" draws each window's
    regime from TIMING_MIX) returns the newest sample, then the MPU-6050's 16-bit
    quantisation at +-2 g. Each sample is stamped like the hub's `t_mono` (the I2C
    transaction's start) plus 0.05-1 ms of extra stamping noise, so the stamp trails the
    true sample instant by 0-1 ms of sample age plus that noise. One scenario call per plant."""
    sc = Scenario(seed, anomalies)
    rng = np.random.default_rng([SEED, seed, draw_seed])
    k0 = np.sort(rng.integers(int(t_min_s * GRID_HZ), int(t_max_s * GRID_HZ), n))
    w = rng.uniform(0.0, 1.0, n)
    if timing == "mix":
        shares = np.array([p for _, p in TIMING_MIX])
        kinds = rng.choice(len(TIMING_MIX), size=n, p=shares / shares.sum())
        polls = np.empty((n, WINDOW))
        for i, name in enumerate(TIMINGS):
            sel = np.flatnonzero(kinds == i)
            if sel.size:
                polls[sel] = poll_times_ms(rng, int(sel.size), name)
    else:
        polls = poll_times_ms(rng, n, timing)
    latency = 0.05 + rng.exponential(0.15, (n, WINDOW))
    idx = np.floor(polls - w[:, None]).astype(np.int64) + 1  # grid offset >= 0
    span = int(idx.max()) + 2
    grid_t = (k0[:, None] + np.arange(span)[None, :]) / GRID_HZ  # (n, span)
    v = sc.vibration_g(grid_t.reshape(-1)).reshape(n, span, AXES)
    lo = np.take_along_axis(v, idx[:, :, None], axis=1)
    hi = np.take_along_axis(v, idx[:, :, None] + 1, axis=1)
    g = lo + w[:, None, None] * (hi - lo)
    accel = (np.clip(np.rint(g * ACCEL_LSB_PER_G), -32768, 32767) / ACCEL_LSB_PER_G).astype(
        np.float32
    )
    stamps = polls + latency
    for j in range(1, WINDOW):  # the hub stores one read after the other: increasing stamps
        stamps[:, j] = np.maximum(stamps[:, j], stamps[:, j - 1] + 0.05)
    times = k0[:, None] / GRID_HZ + stamps / 1000.0
    t_end = (k0 + idx[:, -1]) / GRID_HZ
    temp = (np.rint(sc.cabinet_temp_c(t_end) * 100.0) / 100.0).astype(np.float32)[:, None]
    cur = (np.rint(sc.motor_current_a(t_end) * 1000.0) / 1000.0).astype(np.float32)[:, None]
    return Windows(accel, temp, cur, times)


def concat(ws: Sequence[Windows]) -> Windows:
    return Windows(
        np.concatenate([w.accel for w in ws]),
        np.concatenate([w.temp for w in ws]),
        np.concatenate([w.current for w in ws]),
        np.concatenate([w.times for w in ws]),
    )


def raw_spec() -> FeatureSpec:
    n = AXES * N_BANDS + len(SCALARS)
    return FeatureSpec(
        vibration_input="accel_g",
        window=WINDOW,
        axes=AXES,
        sample_rate_hz=FS_HZ,
        band_edges_bin=BAND_EDGES,
        log_floor=LOG_FLOOR,
        scalars=SCALARS,
        mean=(0.0,) * n,
        std=(1.0,) * n,
        kind=FFT_BAND_ENERGY_TIMED,
        resample="linear",
        max_gap_ms=MAX_GAP_MS,
        min_density=MIN_DENSITY,
    )


def features(spec: FeatureSpec, w: Windows) -> F32:
    """(n, F) normalised features, one window at a time through the runtime's code path
    (resampled on the windows' timestamps, as the daemon does)."""
    pre = Preprocessor(spec)
    return np.concatenate([pre(w.inputs(i), w.times_of(i)).copy() for i in range(len(w))])


# -- ONNX -------------------------------------------------------------------------------


def export_onnx(coefs: Sequence[F32], intercepts: Sequence[F32], lo: F32, hi: F32) -> Any:
    """The autoencoder + clip + squared-residual score as an ONNX ModelProto (fp32).

    The inputs are already scaled so that the plain sum of squared residuals is the score
    (the residual weights are folded into the normalisation, see `fold_weights`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_feat = int(coefs[0].shape[0])
    inits = [
        numpy_helper.from_array(lo.astype(np.float32), "clip_lo"),
        numpy_helper.from_array(hi.astype(np.float32), "clip_hi"),
    ]
    nodes = [
        helper.make_node("Max", ["features", "clip_lo"], ["clip_a"], name="clip_low"),
        helper.make_node("Min", ["clip_a", "clip_hi"], ["clipped"], name="clip_high"),
    ]
    cur = "clipped"
    for i, (w, b) in enumerate(zip(coefs, intercepts, strict=True)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"B{i}"))
        last = i == len(coefs) - 1
        out = "reconstruction" if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [out], name=f"dense{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            out = f"relu{i}"
        cur = out
    nodes += [
        helper.make_node("Sub", ["features", "reconstruction"], ["residual"], name="residual"),
        helper.make_node(
            "ReduceSumSquare", ["residual"], ["score"], name="score", axes=[1], keepdims=0
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "motor_autoencoder",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, n_feat])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgerund-models-build",
        producer_version=MODEL_VERSION,
    )
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model, full_check=True)
    return model


def output_layer_of(int8_model: Any) -> tuple[F32, F32]:
    """The int8 model's output layer dequantised: W (HIDDEN, F), b (F), float32."""
    from onnx import numpy_helper

    t = {i.name: numpy_helper.to_array(i) for i in int8_model.graph.initializer}
    w = (t["W5_quantized"].astype(np.float64) - t["W5_zero_point"]) * t["W5_scale"]
    b = (t["B5_quantized"].astype(np.float64) - t["B5_quantized_zero_point"]) * t[
        "B5_quantized_scale"
    ]
    return w.astype(np.float32), b.reshape(-1).astype(np.float32)


def fold_weights(
    coefs: list[F32], inter: list[F32], lo: F32, hi: F32, std: F64, weights: F64
) -> tuple[list[F32], list[F32], F32, F32, F64]:
    """Fold per-feature residual weights w into the input scaling.

    With s = sqrt(w / F) and x' = s * x, an autoencoder AE'(x') = s * AE(x' / s) has
    sum((x' - AE'(x'))^2) = mean(w * (x - AE(x))^2): the weighted score becomes a plain
    ReduceSumSquare (fewer ops per call), the first layer absorbs 1/s, the last layer s,
    the clip bounds s, and the manifest's normalisation divisor becomes std / s."""
    s = np.sqrt(weights / weights.size)
    coefs = [c.copy() for c in coefs]
    inter = [b.copy() for b in inter]
    coefs[0] = (coefs[0] / s[:, None]).astype(np.float32)
    coefs[-1] = (coefs[-1] * s[None, :]).astype(np.float32)
    inter[-1] = (inter[-1] * s).astype(np.float32)
    return coefs, inter, (lo * s).astype(np.float32), (hi * s).astype(np.float32), std / s


class _Calib:
    """onnxruntime CalibrationDataReader over normal feature rows."""

    def __init__(self, rows: F32) -> None:
        self._it: Iterator[dict[str, F32]] = ({"features": r[None, :]} for r in rows)

    def get_next(self) -> dict[str, F32] | None:
        return next(self._it, None)


def quantize_int8(fp32_path: Path, int8_path: Path, calib_rows: F32) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._c = _Calib(calib_rows)

        def get_next(self) -> dict[str, F32] | None:
            return self._c.get_next()

    quantize_static(
        str(fp32_path),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Gemm", "Relu"],
        per_channel=False,
        reduce_range=False,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def scores(sess: Any, rows: F32) -> F32:
    return np.array([sess.run(["score"], {"features": r[None, :]})[0][0] for r in rows], np.float32)


def auc(normal: F32, anomalous: F32) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(y, np.r_[normal, anomalous]))


def latency_us(sess: Any, row: F32, n: int = 3000) -> tuple[float, float]:
    """p50/p99 of back-to-back run() calls (informative only; not in the artifacts)."""
    feed = {"features": row[None, :].copy()}
    for _ in range(300):
        sess.run(["score"], feed)
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        sess.run(["score"], feed)
        out[i] = time.perf_counter() - t0
    return float(np.percentile(out, 50) * 1e6), float(np.percentile(out, 99) * 1e6)


# -- deterministic files ------------------------------------------------------------------


def save_npz(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """An .npz (np.load-able) with fixed zip timestamps, so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _r(x: float, digits: int = 4) -> float:
    return float(round(x, digits))


# -- the build ----------------------------------------------------------------------------


def build(out_dir: Path, *, measure: bool = True, log: Any = print) -> dict[str, Any]:
    import onnx
    from sklearn.neural_network import MLPRegressor

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. data
    train_w = concat([sample_windows(s, TRAIN_PER_SEED, draw_seed=1) for s in TRAIN_SEEDS])
    val_w = concat([sample_windows(s, VAL_PER_SEED, draw_seed=2) for s in VAL_SEEDS])
    log(
        f"data: {len(train_w)} training + {len(val_w)} validation normal windows "
        f"({time.perf_counter() - t_start:.1f} s)"
    )

    # 2. features: statistics from the training windows
    spec0 = raw_spec()
    raw = features(spec0, train_w).astype(np.float64)
    mean = raw.mean(axis=0)
    std = raw.std(axis=0)
    std[-len(SCALARS) :] /= SCALAR_GAIN
    spec = replace(
        spec0,
        mean=tuple(float(np.float32(x)) for x in mean),
        std=tuple(float(np.float32(x)) for x in std),
    )
    std_used = np.asarray(spec.std, dtype=np.float64)
    x_train = features(spec, train_w)
    x_val = features(spec, val_w)

    # 3. train on normal windows only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a fixed epoch budget on purpose
        ae = MLPRegressor(
            hidden_layer_sizes=(HIDDEN, HIDDEN, BOTTLENECK, HIDDEN, HIDDEN),
            activation="relu",
            solver="adam",
            alpha=1e-4,
            batch_size=128,
            learning_rate_init=1e-3,
            max_iter=EPOCHS,
            shuffle=True,
            random_state=SEED % (2**31),
            tol=0.0,
            n_iter_no_change=10**6,
        )
        ae.fit(x_train, x_train)
    log(f"trained {ae.n_iter_} epochs, loss {ae.loss_:.4f} ({time.perf_counter() - t_start:.1f} s)")
    coefs = [np.asarray(c, np.float32) for c in ae.coefs_]
    inter = [np.asarray(b, np.float32) for b in ae.intercepts_]
    span = x_train.max(axis=0) - x_train.min(axis=0)
    lo = (x_train.min(axis=0) - CLIP_MARGIN * span).astype(np.float32)
    hi = (x_train.max(axis=0) + CLIP_MARGIN * span).astype(np.float32)
    resid = ae.predict(np.clip(x_val, lo, hi)).astype(np.float64) - x_val
    weights = 1.0 / np.maximum((resid**2).mean(axis=0), 1e-3)
    coefs, inter, lo, hi, std_folded = fold_weights(coefs, inter, lo, hi, std_used, weights)
    spec = replace(spec, std=tuple(float(np.float32(x)) for x in std_folded))
    x_train = features(spec, train_w)
    x_val = features(spec, val_w)

    # 4. fp32 ONNX, 5. int8 QDQ
    fp32_path = out_dir / "model_fp32.onnx"
    int8_path = out_dir / "model.onnx"
    onnx.save_model(export_onnx(coefs, inter, lo, hi), str(fp32_path))
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng([SEED, 7])
        calib = x_train[np.sort(rng.choice(len(x_train), CALIB_WINDOWS, replace=False))]
        tmp_int8 = Path(tmp) / "model.onnx"
        quantize_int8(fp32_path, tmp_int8, calib)
        int8_model = onnx.load(str(tmp_int8))
        int8_model.producer_name = "edgerund-models-build"
        int8_model.producer_version = MODEL_VERSION
        onnx.save_model(int8_model, str(int8_path))
        out_w, out_b = output_layer_of(int8_model)
        assert HIDDEN_TENSOR in {i for n in int8_model.graph.node for i in n.input}
    s_fp32, s_int8 = open_session(fp32_path), open_session(int8_path)

    # 6. threshold from the int8 normal score distribution
    val_int8 = scores(s_int8, x_val)
    val_fp32 = scores(s_fp32, x_val)
    threshold = float(np.float32(np.quantile(val_int8, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN))
    threshold_fp32 = float(np.float32(np.quantile(val_fp32, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN))

    # quality on held-out plants
    def test_set(anoms: Sequence[Anomaly], draw: int, timing: str = "mix") -> Windows:
        # t >= 1000 s: past the 300 s overheat ramp of an anomaly starting at 0.
        return concat(
            [
                sample_windows(
                    s, TEST_PER_SEED, anoms, t_min_s=1000.0, draw_seed=draw, timing=timing
                )
                for s in TEST_SEEDS
            ]
        )

    cases: dict[str, Sequence[Anomaly]] = {
        "bearing_wear": [Anomaly("bearing_wear", 0.0, 1e9)],
        "bearing_wear@0.25": [Anomaly("bearing_wear", 0.0, 1e9, severity=0.25)],
        "overheat": [Anomaly("overheat", 0.0, 1e9)],
        "overheat@0.3": [Anomaly("overheat", 0.0, 1e9, severity=0.3)],
    }
    normal_w = test_set((), 3)
    x_norm = features(spec, normal_w)
    n_i8, n_f32 = scores(s_int8, x_norm), scores(s_fp32, x_norm)
    quality: dict[str, Any] = {}
    anomalous: dict[str, Windows] = {}
    for i, (kind, anoms) in enumerate(cases.items()):
        w = test_set(anoms, 10 + i)
        anomalous[kind] = w
        xa = features(spec, w)
        a_i8, a_f32 = scores(s_int8, xa), scores(s_fp32, xa)
        quality[kind] = {
            "auc_fp32": _r(auc(n_f32, a_f32)),
            "auc_int8": _r(auc(n_i8, a_i8)),
            "detected_int8": _r(float((a_i8 > threshold).mean())),
        }
    # jitter invariance: the same held-out plants under one timing regime each
    jitter: dict[str, Any] = {}
    for j, timing in enumerate(TIMINGS):
        xn = features(spec, test_set((), 40 + j, timing))
        xb = features(spec, test_set(cases["bearing_wear"], 50 + j, timing))
        sn, sb = scores(s_int8, xn), scores(s_int8, xb)
        jitter[timing] = {
            "false_positive_int8": _r(float((sn > threshold).mean())),
            "normal_p50": _r(float(np.median(sn))),
            "normal_max": _r(float(sn.max())),
            "bearing_wear_detected": _r(float((sb > threshold).mean())),
            "bearing_wear_min": _r(float(sb.min())),
        }
    quality["normal"] = {
        "false_positive_int8": _r(float((n_i8 > threshold).mean())),
        "score_p50_int8": _r(float(np.median(n_i8))),
        "score_p999_int8": _r(float(np.quantile(n_i8, 0.999))),
        "score_abs_diff_p99": _r(float(np.quantile(np.abs(n_i8 - n_f32), 0.99)), 5),
    }
    quality["timing"] = jitter

    # reference profile on the held-out normal windows (normalised features, int8 scores)
    profile = reference_profile(x_norm, n_i8, len(normal_w))

    # must-detect vectors: raw (un-normalised) feature vectors of synthesised faults that
    # the int8 model flags with a margin; a device calibration must keep flagging them.
    md_raw: list[F32] = []
    md_case: list[int] = []
    md_sev: list[float] = []
    md_summary: list[dict[str, Any]] = []
    for c, (kind, sev) in enumerate(MUST_DETECT_CASES):
        w = test_set([Anomaly(kind, 0.0, 1e9, severity=sev)], 70 + c)  # type: ignore[arg-type]
        sa = scores(s_int8, features(spec, w))
        ok = np.flatnonzero(sa > MUST_DETECT_MARGIN * threshold)
        # typical signatures: the MUST_DETECT_PER_CASE detected windows around the median
        # score (the weakest ones are borderline: half their score is the window's noise)
        srt = ok[np.argsort(sa[ok], kind="stable")]
        mid = max(0, len(srt) // 2 - MUST_DETECT_PER_CASE // 2)
        keep = srt[mid : mid + MUST_DETECT_PER_CASE]
        md_raw.append(features(spec0, w.take(np.sort(keep))))
        md_case += [c] * len(keep)
        md_sev += [sev] * len(keep)
        md_summary.append(
            {"kind": kind, "severity": sev, "vectors": len(keep), "candidates": len(w)}
        )
    md_x = np.concatenate(md_raw).astype(np.float32)

    # 7. golden vectors: 8 normal, 4 worn bearing, 4 overheat windows
    g = concat(
        [
            normal_w.take(range(8)),
            anomalous["bearing_wear"].take(range(4)),
            anomalous["overheat"].take(range(4)),
        ]
    )
    g_x = features(spec, g)
    save_npz(
        out_dir / "golden.npz",
        {
            "accel_g": g.accel,
            "accel_g_t": g.times,
            "temp_c": g.temp,
            "current_a": g.current,
            "features": g_x,
            "score_int8": scores(s_int8, g_x),
            "score_fp32": scores(s_fp32, g_x),
            "label": np.array([0] * 8 + [1] * 8, np.int8),
            "must_detect_raw": md_x,
            "must_detect_case": np.array(md_case, np.int8),
            "must_detect_severity": np.array(md_sev, np.float32),
            "output_layer_w": out_w,
            "output_layer_b": out_b,
        },
    )

    sizes = {"model.onnx": int8_path.stat().st_size, "model_fp32.onnx": fp32_path.stat().st_size}
    manifest: dict[str, Any] = {
        "format": "edgerund.model/1",
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "description": "Self-supervised autoencoder for motor bearing/cabinet anomalies; "
        "trained on normal windows of the simulated plant only.",
        "model": {
            "file": "model.onnx",
            "sha256": sha256_file(int8_path),
            "precision": "int8",
            "quantization": "static QDQ S8S8 per-tensor, MinMax calibration",
            "opset": OPSET,
        },
        "reference_fp32": {
            "file": "model_fp32.onnx",
            "sha256": sha256_file(fp32_path),
            "threshold": threshold_fp32,
        },
        "inputs": [
            {
                "name": "accel_g",
                "shape": [WINDOW, AXES],
                "dtype": "float32",
                "rate_hz": FS_HZ,
                "unit": "g",
                "description": "motor-housing acceleration x, y, z (MPU-6050), "
                "oldest sample first, the last 256 samples; with per-sample timestamps "
                "(seconds, monotonic) passed as times={'accel_g': t} (preprocessing.resample)",
                "timestamps": True,
            },
            {
                "name": "temp_c",
                "shape": [1],
                "dtype": "float32",
                "rate_hz": 1.0,
                "unit": "degC",
                "description": "cabinet temperature, newest value",
            },
            {
                "name": "current_a",
                "shape": [1],
                "dtype": "float32",
                "rate_hz": 10.0,
                "unit": "A",
                "description": "motor current, newest value",
            },
        ],
        "preprocessing": spec.to_json(),
        "model_inputs": [{"name": "features", "shape": [1, spec.n_features], "dtype": "float32"}],
        "model_outputs": [{"name": "score", "shape": [1], "dtype": "float32"}],
        "output": {
            "name": "score",
            "meaning": "weighted mean squared reconstruction error of the normalised features; "
            "about 1 in normal operation, higher = less like normal",
            "higher_is_anomalous": True,
        },
        "threshold": threshold,
        "threshold_rule": f"{THRESHOLD_MARGIN} x p{THRESHOLD_QUANTILE * 100:g} of int8 scores on "
        f"{len(val_w)} normal validation windows",
        "golden": {
            "file": "golden.npz",
            "sha256": sha256_file(out_dir / "golden.npz"),
            "rtol": 0.02,
            "atol": 0.02,
            "feature_atol": 1e-4,
        },
        "training": {
            "seed": SEED,
            "generator": "drivers/emulated/scenario.py",
            "train_plants": list(TRAIN_SEEDS),
            "validation_plants": list(VAL_SEEDS),
            "test_plants": list(TEST_SEEDS),
            "windows": len(train_w),
            "architecture": f"{spec.n_features}-{HIDDEN}-{HIDDEN}-{BOTTLENECK}-{HIDDEN}-{HIDDEN}-"
            f"{spec.n_features} ReLU autoencoder (sklearn MLPRegressor)",
            "epochs": EPOCHS,
        },
        "reference_profile": profile,
        "adaptation": dict(ADAPTATION_POLICY),
        "output_layer": {
            "hidden_tensor": HIDDEN_TENSOR,
            "hidden_size": HIDDEN,
            "file": "golden.npz",
            "weights": "output_layer_w",
            "bias": "output_layer_b",
            "meaning": "the int8 model's output layer dequantised: reconstruction = "
            "hidden_tensor @ weights + bias, score = sum((features - reconstruction)^2) up to "
            "the reconstruction's int8 rounding; a device may refit it (adaptation.parameters)",
        },
        "must_detect": {
            "file": "golden.npz",
            "features": "must_detect_raw",
            "case": "must_detect_case",
            "cases": md_summary,
            "rule": f"raw feature vectors (before normalisation) of held-out windows scoring "
            f"> {MUST_DETECT_MARGIN} x threshold (int8), the {MUST_DETECT_PER_CASE} around the "
            "median score per case",
        },
        "quality": quality,
        "sizes_bytes": sizes,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    report = {
        "quality": quality,
        "sizes": sizes,
        "threshold": threshold,
        "build_s": _r(time.perf_counter() - t_start, 1),
    }
    if measure:
        row = x_norm[0]
        report["latency_us"] = {"int8": latency_us(s_int8, row), "fp32": latency_us(s_fp32, row)}
    log(render_report(report))
    return report


def reference_profile(x: F32, score: F32, n: int) -> dict[str, Any]:
    """The drift monitor's baseline: per normalised feature its mean, standard deviation
    and PROFILE_QUANTILES; the score's SCORE_QUANTILES and its mean/std (float32-rounded,
    so the JSON is short and reproducible)."""
    x64 = x.astype(np.float64)
    s64 = score.astype(np.float64)

    def f32(v: npt.NDArray[Any]) -> list[float]:
        return [float(np.float32(a)) for a in np.asarray(v).reshape(-1)]

    return {
        "source": f"{n} held-out normal windows (plants {list(TEST_SEEDS)}), timing mix",
        "samples": n,
        "features": {
            "mean": f32(x64.mean(axis=0)),
            "std": f32(x64.std(axis=0)),
            "quantiles": {f"{q:g}": f32(np.quantile(x64, q, axis=0)) for q in PROFILE_QUANTILES},
        },
        "score": {
            "mean": float(np.float32(s64.mean())),
            "std": float(np.float32(s64.std())),
            "quantiles": {
                f"{q:g}": float(np.float32(np.quantile(s64, q))) for q in SCORE_QUANTILES
            },
        },
    }


def render_report(rep: dict[str, Any]) -> str:
    lines = [
        "| held-out windows | AUC fp32 | AUC int8 | detected (int8 > threshold) |",
        "|---|---|---|---|",
    ]
    for kind, q in rep["quality"].items():
        if kind in ("normal", "timing"):
            continue
        lines.append(
            f"| {kind} | {q['auc_fp32']:.4f} | {q['auc_int8']:.4f} | {q['detected_int8']:.1%} |"
        )
    n = rep["quality"]["normal"]
    lines.append(f"| normal (false positives) | | | {n['false_positive_int8']:.2%} |")
    s = rep["sizes"]
    lines += [
        "",
        f"threshold {rep['threshold']:.4f}; normal score p50 {n['score_p50_int8']}, "
        f"p99.9 {n['score_p999_int8']}; |int8 - fp32| p99 {n['score_abs_diff_p99']}",
        f"files: model.onnx (int8) {s['model.onnx']:,} B, model_fp32.onnx "
        f"{s['model_fp32.onnx']:,} B ({s['model_fp32.onnx'] / s['model.onnx']:.2f}x smaller)",
        "",
        "| timing of the 200 Hz poll (held-out plants) | normal > threshold | normal p50 / max "
        "| bearing_wear detected | bearing_wear min |",
        "|---|---|---|---|---|",
    ]
    for timing, q in rep["quality"].get("timing", {}).items():
        lines.append(
            f"| {timing} | {q['false_positive_int8']:.2%} | {q['normal_p50']} / "
            f"{q['normal_max']} | {q['bearing_wear_detected']:.1%} | {q['bearing_wear_min']} |"
        )
    if "latency_us" in rep:
        (i50, i99), (f50, f99) = rep["latency_us"]["int8"], rep["latency_us"]["fp32"]
        lines.append(
            f"run() latency (this machine, 1 thread): int8 p50 {i50:.1f} us p99 {i99:.1f}"
            f" us; fp32 p50 {f50:.1f} us p99 {f99:.1f} us; int8 speedup {f50 / i50:.2f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--no-measure", action="store_true", help="skip the latency measurement")
    args = ap.parse_args(argv)
    build(args.out, measure=not args.no_measure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
