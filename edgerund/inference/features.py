"""Feature extraction declared by a model manifest: raw sensor windows -> model input.

Theory of operation
-------------------
The model never sees raw samples. The manifest's `preprocessing` block names a feature
kind and its parameters, and this module is the single implementation of each kind, used
by `models/build.py` when it trains and writes golden vectors *and* by the runtime
`ModelRunner` on every tick, so the two are the same code and numerically identical.

Kind `fft_band_energy/1` (the reference model):

1. The vibration window `x` (`window` samples x `axes`, in g) is converted to float64 and
   the per-axis mean is removed (gravity and sensor offset carry no wear information).
2. A symmetric Hann window is applied and the real FFT taken along time.
3. Power spectral energy per bin, `|X|^2 / sum(w^2)`, is summed into bands given by
   `band_edges_bin` (half-open FFT-bin ranges `[e_i, e_{i+1})`; bin k is k*fs/window Hz;
   bin 0 -- DC -- is excluded by the first edge).
4. `log10(energy + log_floor)` per band; axis-major order (all bands of axis 0, then 1, 2).
5. Scalar inputs (`scalars`, e.g. cabinet temperature and motor current) are appended.
6. Every feature is standardised, `(f - mean) / std`, with the training-set statistics
   stored in the manifest, and the vector is cast to float32 with a batch dimension of 1.

Kind `fft_band_energy/2` (the reference model from version 2.0.0) adds step 0:

0. **Resampling on the sample timestamps.** A gateway does not sample on a perfect grid:
   the hub polls on deadlines and a busy CPU serves them late, skips overrun deadlines,
   stalls. Treating the samples as evenly spaced (kind /1) turns that timing jitter into
   phase noise on the motor's tones, which smears their energy into every band, so the
   features (and the anomaly score) depended on how busy the CPU was. Kind /2 takes each
   sample's timestamp (`t_mono`, seconds, from the hub) and linearly interpolates the
   values onto the uniform grid `t_end - k / sample_rate_hz`, k = window-1 .. 0, where
   `t_end` is the newest sample's time, before step 1. Linear interpolation suits these
   signals: the energy that matters (shaft 1x/2x, bearing-defect tones) is far below the
   sampling rate, where its error is ~(2 pi f h)^2 / 8 of the amplitude (about 3 % at
   16 Hz for a 5 ms spacing). Broadband noise near Nyquist is unavoidably attenuated by
   any interpolation (less information arrives when samples are sparse); the build
   trains the model on windows with a wide range of timing jitter, so that remaining,
   bounded effect is inside what the model knows as normal.

   The timestamps are checked (a failure is a `FeatureError`, i.e. an input fault that
   hands the tick to the loop's fallback rule): finite, strictly increasing (a clock that
   went backwards or a duplicated sample cannot be interpolated), no gap between two
   consecutive samples longer than `max_gap_ms` (a stalled sensor is not interpolated
   over), and the samples must reach back to within `max_gap_ms` of the grid's first
   point (a window that covers too short a time, e.g. a sensor polled faster than the
   model's rate, is refused rather than stretched), and at least `min_density` x window
   samples must fall inside the grid's span (a sensor read far below the model's rate
   has no measurement in the upper bands, only interpolation: refused, not guessed).
   Grid points before the oldest sample (at most `max_gap_ms`, where the Hann window is
   ~0) hold that sample's value; samples older than the grid are not used.

   Without timestamps (`times=None`, the API of kind /1) the samples are taken as evenly
   spaced at the declared rate: the resampling is the identity, exactly kind /1's
   behaviour, and the runner counts the call as `untimed`.

`Preprocessor` keeps the constant parts (Hann window, band index) and writes into a
preallocated output so the per-tick cost is a handful of numpy calls (~30 us on x86).
Pure numpy, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.errors import EdgerundError

__all__ = [
    "FFT_BAND_ENERGY",
    "FFT_BAND_ENERGY_TIMED",
    "KINDS",
    "FeatureError",
    "FeatureSpec",
    "Preprocessor",
    "band_energies",
    "resample_uniform",
]

FFT_BAND_ENERGY = "fft_band_energy/1"
FFT_BAND_ENERGY_TIMED = "fft_band_energy/2"  # /1 + linear resampling on sample timestamps
KINDS = (FFT_BAND_ENERGY, FFT_BAND_ENERGY_TIMED)
RESAMPLE_METHODS = ("linear",)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class FeatureError(EdgerundError, ValueError):
    """The preprocessing parameters or an input do not fit together (message says how)."""


@dataclass(frozen=True)
class FeatureSpec:
    """Parameters of `fft_band_energy/1` (the manifest's `preprocessing` block)."""

    vibration_input: str
    window: int
    axes: int
    sample_rate_hz: float
    band_edges_bin: tuple[int, ...]
    log_floor: float
    scalars: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = FFT_BAND_ENERGY
    resample: str | None = None  # kind /2: "linear"
    max_gap_ms: float = 40.0  # kind /2: longest gap interpolated over (and edge held)
    min_density: float = 0.0  # kind /2: samples in the grid's span / window, at least

    @property
    def timed(self) -> bool:
        """True when the kind resamples on sample timestamps (`fft_band_energy/2`)."""
        return self.kind == FFT_BAND_ENERGY_TIMED

    @property
    def n_bands(self) -> int:
        return len(self.band_edges_bin) - 1

    @property
    def n_features(self) -> int:
        return self.axes * self.n_bands + len(self.scalars)

    def band_edges_hz(self) -> list[tuple[float, float]]:
        df = self.sample_rate_hz / self.window
        e = self.band_edges_bin
        return [(e[i] * df, e[i + 1] * df) for i in range(self.n_bands)]

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise FeatureError(
                f"preprocessing.kind: expected one of {list(KINDS)}, got {self.kind!r}"
            )
        if self.timed:
            if self.resample not in RESAMPLE_METHODS:
                raise FeatureError(
                    f"preprocessing.resample.method: expected one of {list(RESAMPLE_METHODS)}, "
                    f"got {self.resample!r}"
                )
            period_ms = 1000.0 / self.sample_rate_hz if self.sample_rate_hz > 0 else math.inf
            if not 0.0 <= self.min_density <= 1.0:
                raise FeatureError(
                    f"preprocessing.resample.min_density: a fraction in [0, 1] expected, "
                    f"got {self.min_density}"
                )
            if not (math.isfinite(self.max_gap_ms) and self.max_gap_ms >= period_ms):
                raise FeatureError(
                    f"preprocessing.resample.max_gap_ms: a finite value >= one sample period "
                    f"({period_ms:g} ms) expected, got {self.max_gap_ms}"
                )
        if not (math.isfinite(self.sample_rate_hz) and self.sample_rate_hz > 0):
            raise FeatureError(
                f"preprocessing.sample_rate_hz: > 0 expected, got {self.sample_rate_hz}"
            )
        if self.window < 8 or self.axes < 1:
            raise FeatureError(
                f"preprocessing: window >= 8 and axes >= 1 expected, got {self.window}, {self.axes}"
            )
        e = self.band_edges_bin
        n_bins = self.window // 2 + 1
        if len(e) < 2 or any(b <= a for a, b in itertools.pairwise(e)):
            raise FeatureError(
                f"preprocessing.band_edges_bin: strictly increasing list expected, got {list(e)}"
            )
        if e[0] < 0 or e[-1] > n_bins:
            raise FeatureError(
                f"preprocessing.band_edges_bin: edges within [0, {n_bins}] expected for a "
                f"{self.window}-sample window, got {e[0]}..{e[-1]}"
            )
        for key, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) != self.n_features:
                raise FeatureError(
                    f"preprocessing.{key}: {self.n_features} values expected "
                    f"({self.axes} axes x {self.n_bands} bands + {len(self.scalars)} scalars), "
                    f"got {len(vals)}"
                )
            if not all(np.isfinite(vals)):
                raise FeatureError(f"preprocessing.{key}: finite values expected")
        if min(self.std) <= 0:
            raise FeatureError("preprocessing.std: every value must be > 0")
        if not self.log_floor > 0:
            raise FeatureError(f"preprocessing.log_floor: > 0 expected, got {self.log_floor}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "vibration_input": self.vibration_input,
            "window": self.window,
            "axes": self.axes,
            "sample_rate_hz": self.sample_rate_hz,
            "band_edges_bin": list(self.band_edges_bin),
            "log_floor": self.log_floor,
            "scalars": list(self.scalars),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.timed:
            out["resample"] = {
                "method": self.resample,
                "times": f"per-sample timestamps of {self.vibration_input!r} in seconds "
                "(any monotonic clock), oldest first: runner.infer(inputs, "
                f"times={{{self.vibration_input!r}: t}})",
                "grid": "t_end - k / sample_rate_hz, k = window-1 .. 0 (t_end: newest sample)",
                "max_gap_ms": self.max_gap_ms,
                "min_density": self.min_density,
            }
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSpec:
        """Build from the manifest block; raises FeatureError naming a missing/bad key."""
        kind = d.get("kind")
        if kind not in KINDS:
            raise FeatureError(f"preprocessing.kind: expected one of {list(KINDS)}, got {kind!r}")
        resample: str | None = None
        max_gap_ms = 40.0
        min_density = 0.0
        if kind == FFT_BAND_ENERGY_TIMED:
            r = d.get("resample")
            if not isinstance(r, Mapping):
                raise FeatureError(
                    f"preprocessing.resample: missing (an object with method and max_gap_ms "
                    f"expected for {kind!r}, got {r!r})"
                )
            for key in ("method", "max_gap_ms"):
                if key not in r:
                    raise FeatureError(f"preprocessing.resample.{key}: missing")
            resample = str(r["method"])
            g = r["max_gap_ms"]
            if isinstance(g, bool) or not isinstance(g, (int, float)):
                raise FeatureError(
                    f"preprocessing.resample.max_gap_ms: a number expected, got {g!r}"
                )
            max_gap_ms = float(g)
            dens = r.get("min_density", 0.0)
            if isinstance(dens, bool) or not isinstance(dens, (int, float)):
                raise FeatureError(
                    f"preprocessing.resample.min_density: a number expected, got {dens!r}"
                )
            min_density = float(dens)
        required = (
            "vibration_input",
            "window",
            "axes",
            "sample_rate_hz",
            "band_edges_bin",
            "log_floor",
            "scalars",
            "mean",
            "std",
        )
        for key in required:
            if key not in d:
                raise FeatureError(f"preprocessing.{key}: missing")
        try:
            spec = cls(
                vibration_input=str(d["vibration_input"]),
                window=int(d["window"]),
                axes=int(d["axes"]),
                sample_rate_hz=float(d["sample_rate_hz"]),
                band_edges_bin=tuple(int(x) for x in d["band_edges_bin"]),
                log_floor=float(d["log_floor"]),
                scalars=tuple(str(x) for x in d["scalars"]),
                mean=tuple(float(x) for x in d["mean"]),
                std=tuple(float(x) for x in d["std"]),
                kind=str(kind),
                resample=resample,
                max_gap_ms=max_gap_ms,
                min_density=min_density,
            )
        except (TypeError, ValueError) as exc:
            raise FeatureError(f"preprocessing: malformed value ({exc})") from exc
        spec.validate()
        return spec


def _hann(n: int) -> F64:
    return np.hanning(n).astype(np.float64)


def resample_uniform(
    t: npt.ArrayLike,
    x: npt.ArrayLike,
    rate_hz: float,
    max_gap_s: float,
    out: F64 | None = None,
    min_density: float = 0.0,
    grid: F64 | None = None,
) -> F64:
    """Values `x` (n, axes) sampled at times `t` (n,) seconds -> (n, axes) float64 on the
    uniform grid `t[-1] - k / rate_hz` (oldest first), by linear interpolation.

    Raises FeatureError when the timestamps cannot honestly be interpolated: not finite,
    not strictly increasing, a gap over `max_gap_s` between samples that the grid uses,
    or the oldest sample later than `max_gap_s` after the grid's first point, or fewer
    than `min_density * n` samples inside the grid's span (a sensor read so much slower
    than `rate_hz` that the upper bands hold no measurement, only interpolation).
    `out` (n, axes) and `grid` (the n grid offsets, `arange(-(n-1), 1) / rate_hz`) may be
    preallocated by the caller."""
    ts = np.asarray(t, dtype=np.float64).reshape(-1)
    xv = np.asarray(x)
    n = xv.shape[0]
    if ts.shape[0] != n:
        raise FeatureError(f"timestamps: {n} expected (one per sample), got {ts.shape[0]}")
    # Hot path (every tick): one reduction per check; NaN/Inf fail `d.min() > 0` (any
    # comparison with NaN is false), and the precise reason is worked out only then.
    rel = ts - ts[-1]  # relative: float64 keeps sub-microsecond resolution at any uptime
    d = np.diff(rel)
    if not d.min() > 0:
        if not np.isfinite(ts).all():
            raise FeatureError("timestamps: non-finite value")
        i = int(np.argmax(~(d > 0)))
        raise FeatureError(
            f"timestamps: strictly increasing expected, sample {i + 1} is "
            f"{d[i] * 1000:.3f} ms after sample {i}"
        )
    span = (n - 1) / rate_hz
    first = int(np.searchsorted(rel, -span, side="right")) - 1  # last sample at/before grid start
    if first < 0:
        if rel[0] + span > max_gap_s:
            raise FeatureError(
                f"timestamps: the window covers {-rel[0] * 1000:.1f} ms, {span * 1000:.1f} ms "
                f"expected at {rate_hz:g} Hz (within {max_gap_s * 1000:g} ms): samples arrive "
                f"faster than the model's rate or the window is short"
            )
        first = 0
    inside = n - 1 - first  # samples after the grid's first point (the newest included)
    if inside < min_density * n:
        raise FeatureError(
            f"timestamps: {inside} samples in the last {span * 1000:.0f} ms, at least "
            f"{math.ceil(min_density * n)} expected ({min_density:.0%} of {rate_hz:g} Hz): "
            f"sensor read too slowly"
        )
    gaps = d[first:]
    if gaps.max() > max_gap_s:
        k = int(np.argmax(gaps))
        raise FeatureError(
            f"timestamps: gap of {gaps[k] * 1000:.1f} ms between samples "
            f"{first + k} and {first + k + 1} (max {max_gap_s * 1000:g} ms): sensor stalled"
        )
    if grid is None or grid.shape[0] != n:
        grid = np.arange(-(n - 1), 1, dtype=np.float64) / rate_hz
    res = out if out is not None else np.empty((n, xv.shape[1]), dtype=np.float64)
    tu = rel[first:]
    for j in range(xv.shape[1]):
        res[:, j] = np.interp(grid, tu, xv[first:, j])
    return res


def band_energies(x: npt.ArrayLike, band_edges_bin: Sequence[int], log_floor: float) -> F64:
    """(axes * n_bands,) log10 band energies of one (window, axes) vibration window.

    The stand-alone form of steps 1-4 (used by reports and tests); Preprocessor runs the
    same function with cached constants."""
    arr = np.asarray(x)
    w = _hann(arr.shape[0])
    buf = np.zeros((arr.shape[1], 2 * (arr.shape[0] // 2 + 2)), dtype=np.float64)
    spec = np.empty((arr.shape[1], arr.shape[0] // 2 + 1), dtype=np.complex128)
    edges2 = 2 * np.asarray(band_edges_bin, dtype=np.int64)
    return _log_bands(arr, w, float(np.sum(w * w)), edges2, log_floor, buf, spec)


def _log_bands(
    x: npt.NDArray[Any],
    w: F64,
    w_power: float,
    edges2: npt.NDArray[np.int64],
    log_floor: float,
    buf: F64,
    spec: npt.NDArray[np.complex128],
) -> F64:
    """Steps 1-4 on a (window, axes) array, in few numpy calls (this runs every tick).

    Works on a transposed (axes, window) float64 copy so the reductions and the FFT run
    along contiguous memory. The complex spectrum is viewed as interleaved (re, im)
    floats and squared into `buf`, so one `reduceat` over doubled bin edges sums
    re^2 + im^2 of every bin of a band at once. `buf` is (axes, 2 * (bins + 1)) with a
    zero tail: reduceat sums `[e_i, e_{i+1})` and needs the last edge to be an index;
    `spec` is a preallocated C-contiguous (axes, bins) complex output for the FFT."""
    xt = np.array(x.T, dtype=np.float64)  # one copy: transpose + widen
    xt -= (np.add.reduce(xt, axis=1) * (1.0 / xt.shape[1]))[:, None]
    xt *= w
    np.fft.rfft(xt, axis=1, out=spec)
    ri = spec.view(np.float64)  # (axes, 2 * bins): re0, im0, re1, im1, ...
    np.multiply(ri, ri, out=buf[:, : ri.shape[1]])
    bands = np.add.reduceat(buf, edges2, axis=1)[:, :-1]  # (axes, n_bands)
    bands *= 1.0 / w_power
    bands += log_floor
    out: F64 = np.log10(bands).reshape(-1)  # axis-major: axis 0's bands first
    return out


class Preprocessor:
    """Runs the manifest's preprocessing into a preallocated float32 (1, n_features) array."""

    def __init__(self, spec: FeatureSpec) -> None:
        spec.validate()
        self.spec = spec
        self._w = _hann(spec.window)
        self._w_power = float(np.sum(self._w * self._w))
        self._edges2 = 2 * np.asarray(spec.band_edges_bin, dtype=np.int64)
        self._buf = np.zeros((spec.axes, 2 * (spec.window // 2 + 2)), dtype=np.float64)
        self._spec = np.empty((spec.axes, spec.window // 2 + 1), dtype=np.complex128)
        self._mean = np.asarray(spec.mean, dtype=np.float64)
        self._inv_std = 1.0 / np.asarray(spec.std, dtype=np.float64)
        self._raw = np.empty(spec.n_features, dtype=np.float64)
        self.out: F32 = np.empty((1, spec.n_features), dtype=np.float32)
        self._nb = spec.axes * spec.n_bands
        self._grid = np.empty((spec.window, spec.axes), dtype=np.float64)
        self._grid_t = np.arange(-(spec.window - 1), 1, dtype=np.float64) / spec.sample_rate_hz

    def renormalize(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the standardisation (a device calibration, edgerund.inference.overlay);
        in place, so the buffers bound to the session stay the same objects."""
        m = np.asarray(mean, dtype=np.float64)
        s = np.asarray(std, dtype=np.float64)
        if m.shape != self._mean.shape or s.shape != self._mean.shape or not (s > 0).all():
            raise FeatureError(f"normalization: {self._mean.size} means and stds > 0 expected")
        self._mean[:] = m
        self._inv_std[:] = 1.0 / s

    def raw_features(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        times: Mapping[str, npt.ArrayLike] | None = None,
    ) -> F64:
        """The un-normalised feature vector (a fresh float64 array)."""
        self._fill(inputs, times)
        return self._raw.copy()

    def timed_input(self, times: Mapping[str, npt.ArrayLike] | None) -> bool:
        """Whether `times` carries the timestamps this spec resamples on."""
        return self.spec.timed and times is not None and self.spec.vibration_input in times

    def _fill(
        self, inputs: Mapping[str, npt.ArrayLike], times: Mapping[str, npt.ArrayLike] | None
    ) -> None:
        spec = self.spec
        x = np.asarray(inputs[spec.vibration_input])
        if x.shape != (spec.window, spec.axes):
            raise FeatureError(
                f"input {spec.vibration_input!r}: shape ({spec.window}, {spec.axes}) expected, "
                f"got {x.shape}"
            )
        if spec.timed and times is not None and spec.vibration_input in times:
            x = resample_uniform(
                times[spec.vibration_input],
                x,
                spec.sample_rate_hz,
                spec.max_gap_ms / 1000.0,
                out=self._grid,
                min_density=spec.min_density,
                grid=self._grid_t,
            )
        self._raw[: self._nb] = self._bands(x)
        for i, name in enumerate(spec.scalars):
            v = np.asarray(inputs[name])
            if v.size < 1:
                raise FeatureError(f"input {name!r}: at least one value expected, got none")
            self._raw[self._nb + i] = v.flat[-1]  # the newest value

    def _bands(self, x: npt.NDArray[Any]) -> F64:
        return _log_bands(
            x, self._w, self._w_power, self._edges2, self.spec.log_floor, self._buf, self._spec
        )

    def __call__(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        times: Mapping[str, npt.ArrayLike] | None = None,
    ) -> F32:
        """Normalised features in `self.out` (reused: copy it if you keep it).

        `times` maps an input name to its per-sample timestamps (seconds); kind /2 resamples
        the vibration input on them, kind /1 ignores them."""
        self._fill(inputs, times)
        raw = self._raw
        np.subtract(raw, self._mean, out=raw)
        raw *= self._inv_std
        self.out[0, :] = raw
        return self.out
