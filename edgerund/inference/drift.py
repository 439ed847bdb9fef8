"""Drift monitor: live features and scores against the manifest's reference profile.

Theory of operation
-------------------
Pure logic (no I/O, no clock: every call takes the time it is about). The control loop's
model runner hands each inference's normalised feature vector and score to a bounded
buffer; a task off the tick path drains it into `DriftMonitor.feed`. The monitor works on
**blocks** of `block` consecutive inferences (default 100, one second of a 10 ms loop):

1. **Sensor fault** (one channel): a channel is a group of features (each vibration
   axis's bands, each scalar input). A block in which every feature of exactly one
   channel sits beyond `fault_z` reference standard deviations (a stuck axis gives band
   energies at the log floor; a disconnected thermistor reads -40 or 125 degC), or in
   which a vibration axis does not vary at all across the block (a *flat* axis: noise
   always moves band energies window to window), is a sensor fault on that channel. It is
   reported and the block is kept out of the drift statistics.
2. **Anomaly** (short): a block in which at least half the scores exceed the model's
   threshold is an anomaly block: the loop trips on it as before; the block is kept out
   of the sufficient statistics and (edgerund.inference.calibration) of any fit. A run
   of anomaly blocks stays "anomaly" for `anomaly_max_blocks`; after that, if at least
   one feature's CUSUM below has moved (or the quorum test holds), the state is "drift": a gain step trips the model as an anomaly would, and only its persistence
   and breadth tell it apart. Whether it *was* a fault is not the monitor's call: a
   calibration that would stop detecting a known fault is refused by the must-detect
   guard, which is what keeps a slow-onset fault from being learned.
3. **Drift** (sustained): per feature, the block mean is standardised with the profile,
   `z = (mean_block - mu) / sigma`, and fed to a two-sided CUSUM
   `S+ = max(0, S+ + z - k)`, `S- = max(0, S- - z - k)`; feature i has *moved* when
   `max(S+, S-) > h`. For independent unit-variance z, Siegmund's approximation gives
   the in-control average run length per side `ARL0 = (e^{2kb} - 2kb - 1) / (2k^2)`,
   `b = h + 1.166` (`arl0_blocks`); with the defaults k = 0.5, h = 8 that is ~1.9e4
   blocks per side and feature (~5 h of 1 s blocks), and the quorum below needs
   `min_features` of them at once.
   A block mean of correlated windows has a variance at most the windows' own, so the
   per-window sigma makes |z| conservative. What is *not* independent is the plant's slow
   structure (the daily temperature cycle, load profiles): one feature alone may move for
   hours in a normal afternoon. Hence the quorum: **drift** needs at least `min_features`
   features moved at once, or the score distribution shifted: the population stability
   index (PSI) of the last `score_window` scores over the profile's score-quantile bins
   above `psi_alarm` (0.25, the usual "significant shift"). Either must hold for
   `persist_blocks` consecutive blocks. CUSUM statistics are capped at 2h so a past drift
   clears within a bounded number of blocks once the plant is back to the profile.

`report()` says which of ok / anomaly / sensor_fault / drift holds, since when, and which
features moved by how much (block-mean shift in reference standard deviations, largest
first). `stats()` gives the sufficient statistics of the normal blocks seen (count, sums,
sums of squares per feature, the score histogram), the federated statistics' source.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgerund.inference.federated import Stats
from edgerund.inference.profile import ReferenceProfile

__all__ = [
    "DriftConfig",
    "DriftMonitor",
    "DriftReport",
    "arl0_blocks",
    "feature_channels",
    "psi",
]

F64 = npt.NDArray[np.float64]
STATES = ("ok", "anomaly", "sensor_fault", "drift")


def arl0_blocks(k: float, h: float) -> float:
    """Siegmund's in-control average run length of a one-sided CUSUM on N(0, 1) data."""
    b = h + 1.166
    x = 2.0 * k * b
    return (math.exp(x) - x - 1.0) / (2.0 * k * k)


def psi(
    observed: Sequence[int] | npt.NDArray[Any], expected: Sequence[float] | F64, eps: float = 1e-4
) -> float:
    """Population stability index of observed counts against expected bin probabilities."""
    o = np.asarray(observed, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    total = o.sum()
    if total <= 0:
        return 0.0
    p = np.maximum(o / total, eps)
    q = np.maximum(e / e.sum(), eps)
    return float(((p - q) * np.log(p / q)).sum())


def feature_channels(
    n_features: int, axes: int, bands: int, vib: str, scalars: Sequence[str]
) -> tuple[list[str], dict[str, list[int]]]:
    """Feature names and channel -> feature indices for the fft_band_energy layout (per
    axis `bands` log energies, then one feature per scalar input)."""
    names: list[str] = []
    channels: dict[str, list[int]] = {}
    axis_names = "xyz" if axes <= 3 else [str(i) for i in range(axes)]
    for a in range(axes):
        ch = f"{vib}.{axis_names[a]}"
        channels[ch] = list(range(len(names), len(names) + bands))
        names += [f"{ch}.band{b}" for b in range(bands)]
    for s in scalars:
        channels[s] = [len(names)]
        names.append(s)
    if len(names) != n_features:
        names = [f"f{i}" for i in range(n_features)]
        channels = {n: [i] for i, n in enumerate(names)}
    return names, channels


@dataclass(frozen=True)
class DriftConfig:
    block: int = 100
    k: float = 0.5
    h: float = 8.0
    min_features: int = 4
    psi_alarm: float = 0.25
    score_window: int = 3000
    persist_blocks: int = 5
    fault_z: float = 12.0
    anomaly_fraction: float = 0.5
    anomaly_max_blocks: int = 30
    top: int = 8


@dataclass
class DriftReport:
    state: str = "ok"
    since: float | None = None
    blocks: int = 0
    normal_blocks: int = 0
    anomaly_blocks: int = 0
    fault_blocks: int = 0
    moved: list[dict[str, Any]] = field(default_factory=list)
    n_moved: int = 0
    psi: float = 0.0
    channel: str | None = None
    reason: str = ""
    score_p50: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "blocks": self.blocks,
            "normal_blocks": self.normal_blocks,
            "anomaly_blocks": self.anomaly_blocks,
            "fault_blocks": self.fault_blocks,
            "moved": list(self.moved),
            "n_moved": self.n_moved,
            "psi": round(self.psi, 4),
            "channel": self.channel,
            "reason": self.reason,
            "score_p50": self.score_p50,
        }


class DriftMonitor:
    """Sequential drift / sensor-fault / anomaly classification against a profile."""

    def __init__(
        self,
        profile: ReferenceProfile,
        threshold: float,
        *,
        names: Sequence[str] | None = None,
        channels: dict[str, list[int]] | None = None,
        vibration_channels: Sequence[str] = (),
        config: DriftConfig | None = None,
    ) -> None:
        self.profile = profile
        self.threshold = float(threshold)
        self.cfg = config or DriftConfig()
        n = profile.n_features
        self.names = list(names) if names is not None else [f"f{i}" for i in range(n)]
        self.channels = channels or {nm: [i] for i, nm in enumerate(self.names)}
        self.vibration_channels = tuple(vibration_channels)
        self._mu = np.asarray(profile.mean, np.float64)
        self._sd = np.asarray(profile.std, np.float64)
        self._pos = np.zeros(n)
        self._neg = np.zeros(n)
        self._last_z = np.zeros(n)
        levels = sorted(profile.score_quantiles)
        self._edges = np.array([profile.score_quantiles[q] for q in levels])
        probs = np.diff(np.r_[0.0, np.array(levels), 1.0])
        self._expected = probs
        self._scores: deque[float] = deque(maxlen=self.cfg.score_window)
        self._buf_x: list[F64] = []
        self._buf_s: list[float] = []
        self._persist = 0
        self._anomaly_run = 0
        self.report_ = DriftReport()
        # sufficient statistics of the normal blocks (raw windows, not block means)
        self.count = 0
        self.sum = np.zeros(n)
        self.sumsq = np.zeros(n)
        self.score_hist = np.zeros(len(self._edges) + 1, dtype=np.int64)

    # -- feeding ------------------------------------------------------------------------

    def feed(self, x: npt.ArrayLike, score: float, t: float) -> DriftReport | None:
        """One inference. Returns the report when it completed a block, else None."""
        self._buf_x.append(np.asarray(x, np.float64).reshape(-1))
        self._buf_s.append(float(score))
        if len(self._buf_s) < self.cfg.block:
            return None
        xs = np.stack(self._buf_x)
        ss = np.asarray(self._buf_s)
        self._buf_x, self._buf_s = [], []
        return self.feed_block(xs, ss, t)

    def feed_block(self, xs: F64, scores: F64, t: float) -> DriftReport:
        """A block of inferences (rows of `xs`, their `scores`) ending at time `t`."""
        cfg = self.cfg
        rep = self.report_
        rep.blocks += 1
        z_rows = (xs - self._mu) / self._sd
        channel = self._sensor_fault(z_rows, xs)
        if channel is not None:
            rep.fault_blocks += 1
            self._set(t, "sensor_fault", channel=channel[0], reason=channel[1])
            return rep
        anomalous = float((scores > self.threshold).mean()) >= cfg.anomaly_fraction
        self._anomaly_run = self._anomaly_run + 1 if anomalous else 0
        if anomalous:
            rep.anomaly_blocks += 1
        else:
            rep.normal_blocks += 1
            self.count += len(scores)
            self.sum += xs.sum(axis=0)
            self.sumsq += (xs * xs).sum(axis=0)
            self.score_hist += np.bincount(
                np.searchsorted(self._edges, scores, side="right"),
                minlength=len(self._edges) + 1,
            )
        z = z_rows.mean(axis=0)
        self._last_z = z
        cap = 2.0 * cfg.h
        self._pos = np.minimum(np.maximum(0.0, self._pos + z - cfg.k), cap)
        self._neg = np.minimum(np.maximum(0.0, self._neg - z - cfg.k), cap)
        if not anomalous:  # the score test watches the sub-threshold distribution
            self._scores.extend(float(s) for s in scores)
        moved = np.flatnonzero(np.maximum(self._pos, self._neg) > cfg.h)
        p = self.score_psi()
        rep.psi = p
        rep.n_moved = int(moved.size)
        rep.score_p50 = round(float(np.median(scores)), 4)
        order = moved[np.argsort(-np.abs(z[moved]), kind="stable")][: cfg.top]
        rep.moved = [{"feature": self.names[i], "shift_sd": round(float(z[i]), 3)} for i in order]
        drifting = moved.size >= cfg.min_features or (
            len(self._scores) >= min(cfg.score_window, 10 * cfg.block) and p > cfg.psi_alarm
        )
        # A sustained trip with features moved away from the profile (even one: a warmer
        # season moves only the temperature) is drift; the calibration's must-detect
        # guard, not this classifier, keeps a real fault from being learned.
        sustained = anomalous and self._anomaly_run > cfg.anomaly_max_blocks and moved.size >= 1
        self._persist = self._persist + 1 if (drifting or sustained) else 0
        if anomalous and self._anomaly_run <= cfg.anomaly_max_blocks:
            self._set(t, "anomaly", reason="score above the threshold in most of the block")
        elif self._persist >= cfg.persist_blocks:
            why = []
            if moved.size >= cfg.min_features:
                why.append(f"{moved.size} features moved")
            if p > cfg.psi_alarm:
                why.append(f"score PSI {p:.2f} > {cfg.psi_alarm}")
            if anomalous:
                why.append(f"score above the threshold for {self._anomaly_run} blocks")
            self._set(t, "drift", reason="; ".join(why))
        elif anomalous:
            self._set(t, "anomaly", reason="sustained anomaly, features within the profile")
        elif not drifting:
            self._set(t, "ok", reason="")
        return rep

    def score_psi(self) -> float:
        if not self._scores:
            return 0.0
        s = np.fromiter(self._scores, np.float64, len(self._scores))
        counts = np.bincount(
            np.searchsorted(self._edges, s, side="right"), minlength=len(self._edges) + 1
        )
        return psi(counts, self._expected)

    def _sensor_fault(self, z_rows: F64, xs: F64) -> tuple[str, str] | None:
        cfg = self.cfg
        bad: list[tuple[str, str]] = []
        for ch, idx in self.channels.items():
            zc = z_rows[:, idx]
            if bool((np.abs(zc) > cfg.fault_z).all()):
                med = float(np.median(zc))
                bad.append((ch, f"{ch} out of range ({med:+.1f} reference sd)"))
            elif (
                ch in self.vibration_channels
                and len(xs) > 1
                and bool((np.ptp(xs[:, idx], axis=0) == 0.0).all())
            ):
                bad.append((ch, f"{ch} flat (no variation in {len(xs)} windows)"))
        # one channel: a sensor; many channels at once is the plant (or drift), not a sensor
        return bad[0] if len(bad) == 1 else None

    def _set(self, t: float, state: str, *, channel: str | None = None, reason: str) -> None:
        rep = self.report_
        if rep.state != state:
            rep.since = t
        rep.state = state
        rep.channel = channel
        rep.reason = reason

    def reset(self) -> None:
        """Forget the sequential statistics (after a calibration or a model swap)."""
        self._pos[:] = 0.0
        self._neg[:] = 0.0
        self._scores.clear()
        self._persist = 0
        self._anomaly_run = 0
        self._buf_x, self._buf_s = [], []
        self.report_ = DriftReport()

    def report(self) -> DriftReport:
        return self.report_

    def sufficient(self) -> Stats:
        """The same as `stats`, as edgerund.inference.federated.Stats (to encode/merge)."""
        return Stats(
            count=self.count,
            sum=self.sum.copy(),
            sumsq=self.sumsq.copy(),
            score_edges=self._edges.copy(),
            score_hist=self.score_hist.copy(),
        )

    def stats(self) -> dict[str, Any]:
        """Sufficient statistics of the normal blocks seen (see edgerund.inference.federated)."""
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sumsq": self.sumsq.tolist(),
            "score_edges": self._edges.tolist(),
            "score_hist": self.score_hist.tolist(),
        }
