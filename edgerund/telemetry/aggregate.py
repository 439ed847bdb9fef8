"""Aggregates of one series over one interval (pure numpy).

Every series: min, max, mean, last, count. Vibration series add, on the mean-removed
signal (the DC part is gravity or an offset, not vibration): rms, peak (max |x - mean|),
crest factor (peak / rms) and the RMS amplitude in each configured frequency band, from
a real FFT with the sample rate estimated from the median timestamp step (one-sided
spectrum, Parseval: the band RMS values of adjacent bands add up in quadrature to rms).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

BASE_STATS = ("min", "max", "mean", "last", "count")
VIB_STATS = ("rms", "peak", "crest")


def band_names(bands_hz: Sequence[tuple[float, float]]) -> list[str]:
    return [f"band_{lo:g}_{hi:g}hz_rms" for lo, hi in bands_hz]


def stat_names(vibration: bool, bands_hz: Sequence[tuple[float, float]]) -> list[str]:
    names = list(BASE_STATS)
    if vibration:
        names += list(VIB_STATS) + band_names(bands_hz)
    return names


def stat_scales(
    scale_exp: int, vibration: bool, bands_hz: Sequence[tuple[float, float]]
) -> list[int]:
    """Scale exponent per stat: the mean gets one more decimal, the count none, the crest
    factor (a ratio) three."""
    s = [scale_exp, scale_exp, scale_exp - 1, scale_exp, 0]
    if vibration:
        s += [scale_exp - 1, scale_exp, -3] + [scale_exp - 1] * len(bands_hz)
    return s


def aggregate(
    t_s: npt.NDArray[np.float64],
    values: npt.NDArray[np.float64],
    *,
    vibration: bool = False,
    bands_hz: Sequence[tuple[float, float]] = (),
) -> list[float]:
    """Stats in `stat_names` order for one non-empty window."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("aggregate of an empty window")
    mean = float(v.mean())
    out = [float(v.min()), float(v.max()), mean, float(v[-1]), float(len(v))]
    if not vibration:
        return out
    ac = v - mean
    rms = float(np.sqrt(np.mean(ac * ac)))
    peak = float(np.max(np.abs(ac)))
    crest = peak / rms if rms > 0 else 0.0
    out += [rms, peak, crest]
    n = len(ac)
    t = np.asarray(t_s, dtype=np.float64)
    dt = float(np.median(np.diff(t))) if n >= 2 else 0.0
    if n < 4 or dt <= 0:
        return out + [0.0] * len(bands_hz)
    spec = np.fft.rfft(ac)
    freqs = np.fft.rfftfreq(n, d=dt)
    power = (np.abs(spec) ** 2) / (n * n)
    power[1 : (n + 1) // 2] *= 2.0  # one-sided: fold the negative frequencies in
    for lo, hi in bands_hz:
        m = (freqs >= lo) & (freqs < hi)
        out.append(float(np.sqrt(power[m].sum())))
    return out
