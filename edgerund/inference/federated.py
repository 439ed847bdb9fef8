"""Federated statistics: what a gateway sends upstream, and the fleet fit from their sum.

Theory of operation
-------------------
A gateway never sends raw windows. It sends *sufficient statistics* of its normal
(non-anomalous, non-faulty) windows, which add across windows and across gateways:

- `count` n, per feature `sum` (sum x) and `sumsq` (sum x^2): the fleet mean and spread;
- `score_hist`: counts of scores in fixed bins (`score_edges`, the profile's score
  quantiles, the same on every gateway running the same model);
- optionally, for a closed-form refit of a linear output layer y = [h, 1] W (ridge
  regression), the Gram matrices `xtx` = sum h^T h and `xty` = sum h^T y over the rows of
  (augmented) hidden activations h and targets y.

Because all of these are sums, `merge` of many gateways' statistics equals the statistics
of the union of their data (up to floating-point summation order), and `fleet_fit` of the
merged statistics equals the same fit on the union: per-feature shift from the mean
`(mean - mu_ref) / sd_ref`, scale `sd / sd_ref`, the ridge weights
`(xtx + lambda I)^-1 xty` (or, towards a prior layer W0 as the device's refit does,
`(xtx + lambda I)^-1 (xty + lambda W0)`: edgerund.inference.outlayer), and the threshold at the target quantile of the merged
histogram (linear inside the bin). The tests check max |merged - union| near machine
precision. What a publisher does with the fleet calibration (review, sign into the next
bundle) is outside the device.

`encode`/`decode` give the compact JSON the `drift.stats` telemetry event carries (plain
lists of floats; Python's repr round-trips float64 exactly).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FORMAT",
    "Stats",
    "decode",
    "encode",
    "fleet_fit",
    "gram",
    "merge",
    "ridge",
    "stats_of",
]

FORMAT = "edgerund.fedstats/1"
F64 = npt.NDArray[np.float64]


@dataclass
class Stats:
    count: int
    sum: F64
    sumsq: F64
    score_edges: F64
    score_hist: npt.NDArray[np.int64]
    xtx: F64 | None = None
    xty: F64 | None = None


def stats_of(
    x: npt.ArrayLike,
    scores: npt.ArrayLike,
    score_edges: Sequence[float],
    *,
    h: npt.ArrayLike | None = None,
    y: npt.ArrayLike | None = None,
) -> Stats:
    """Sufficient statistics of rows `x` (n, F) with their `scores`; with `h` (n, H) and
    `y` (n, K), the Gram matrices of the ridge refit (h gets a column of ones)."""
    xa = np.asarray(x, np.float64)
    s = np.asarray(scores, np.float64).reshape(-1)
    edges = np.asarray(score_edges, np.float64)
    hist = np.bincount(np.searchsorted(edges, s, side="right"), minlength=len(edges) + 1)
    xtx = xty = None
    if h is not None and y is not None:
        xtx, xty = gram(h, y)
    return Stats(
        count=len(xa),
        sum=xa.sum(axis=0),
        sumsq=(xa * xa).sum(axis=0),
        score_edges=edges,
        score_hist=hist.astype(np.int64),
        xtx=xtx,
        xty=xty,
    )


def gram(h: npt.ArrayLike, y: npt.ArrayLike) -> tuple[F64, F64]:
    """(A^T A, A^T y) with A = [h, 1]: the sufficient statistics of a linear layer's
    least-squares fit (the bias is the last row)."""
    ha = np.asarray(h, np.float64)
    ha = np.hstack([ha, np.ones((len(ha), 1))])
    xtx: F64 = ha.T @ ha
    xty: F64 = ha.T @ np.asarray(y, np.float64)
    return xtx, xty


def merge(parts: Iterable[Stats]) -> Stats:
    items = list(parts)
    if not items:
        raise ValueError("merge: no statistics")
    first = items[0]
    for p in items[1:]:
        if not np.array_equal(p.score_edges, first.score_edges) or p.sum.shape != first.sum.shape:
            raise ValueError("merge: statistics of different models (features or score bins)")
    xtxs = [p.xtx for p in items if p.xtx is not None and p.xty is not None]
    xtys = [p.xty for p in items if p.xtx is not None and p.xty is not None]
    return Stats(
        count=sum(p.count for p in items),
        sum=np.sum([p.sum for p in items], axis=0),
        sumsq=np.sum([p.sumsq for p in items], axis=0),
        score_edges=first.score_edges.copy(),
        score_hist=np.sum([p.score_hist for p in items], axis=0),
        xtx=np.sum(xtxs, axis=0) if xtxs else None,
        xty=np.sum(xtys, axis=0) if xtys else None,
    )


def ridge(xtx: F64, xty: F64, lam: float, prior: F64 | None = None) -> F64:
    """Closed-form ridge weights from Gram matrices (the bias row is not penalised),
    shrunk towards `prior` (same shape as the result) when given, else towards zero."""
    reg = lam * np.eye(len(xtx))
    reg[-1, -1] = 0.0
    rhs = xty if prior is None else xty + reg @ np.asarray(prior, np.float64)
    out = np.linalg.solve(xtx + reg, rhs)
    return np.asarray(out, np.float64)


def fleet_fit(
    st: Stats,
    *,
    mu_ref: Sequence[float] | F64,
    sd_ref: Sequence[float] | F64,
    quantile: float = 0.999,
    lam: float = 1e-3,
    prior: F64 | None = None,
) -> dict[str, Any]:
    """The fleet calibration from merged statistics (see the module docstring)."""
    n = st.count
    if n < 2:
        raise ValueError("fleet_fit: fewer than 2 windows")
    mean = st.sum / n
    var = np.maximum(st.sumsq / n - mean * mean, 0.0)
    mu = np.asarray(mu_ref, np.float64)
    sd = np.asarray(sd_ref, np.float64)
    out: dict[str, Any] = {
        "count": n,
        "mean": mean,
        "std": np.sqrt(var),
        "shift_sd": (mean - mu) / sd,
        "scale": np.sqrt(var) / sd,
        "score_quantile": _hist_quantile(st.score_edges, st.score_hist, quantile),
    }
    if st.xtx is not None and st.xty is not None:
        out["ridge"] = ridge(st.xtx, st.xty, lam, prior)
    return out


def _hist_quantile(edges: F64, hist: npt.NDArray[np.int64], q: float) -> float:
    """The q-quantile from bin counts: linear inside the bin; the open end bins are
    closed at the outermost edge (a conservative figure a publisher reviews)."""
    total = float(hist.sum())
    if total <= 0:
        return float("nan")
    cum = np.cumsum(hist) / total
    i = int(np.searchsorted(cum, q, side="left"))
    lo = edges[i - 1] if i > 0 else edges[0]
    hi = edges[i] if i < len(edges) else edges[-1]
    prev = cum[i - 1] if i > 0 else 0.0
    frac = (q - prev) / max(cum[i] - prev, 1e-300)
    return float(lo + frac * (hi - lo))


def encode(st: Stats, *, model: str, version: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "model": model,
        "version": version,
        "count": st.count,
        "sum": st.sum.tolist(),
        "sumsq": st.sumsq.tolist(),
        "score_edges": st.score_edges.tolist(),
        "score_hist": st.score_hist.tolist(),
    }
    if st.xtx is not None and st.xty is not None:
        doc["xtx"] = st.xtx.tolist()
        doc["xty"] = st.xty.tolist()
    return doc


def decode(doc: Mapping[str, Any]) -> Stats:
    if doc.get("format", FORMAT) != FORMAT:
        raise ValueError(f"expected format {FORMAT!r}, got {doc.get('format')!r}")
    try:
        st = Stats(
            count=int(doc["count"]),
            sum=np.asarray(doc["sum"], np.float64),
            sumsq=np.asarray(doc["sumsq"], np.float64),
            score_edges=np.asarray(doc["score_edges"], np.float64),
            score_hist=np.asarray(doc["score_hist"], np.int64),
            xtx=None if doc.get("xtx") is None else np.asarray(doc["xtx"], np.float64),
            xty=None if doc.get("xty") is None else np.asarray(doc["xty"], np.float64),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad statistics document ({exc})") from None
    if st.sum.shape != st.sumsq.shape or len(st.score_hist) != len(st.score_edges) + 1:
        raise ValueError("bad statistics document (shapes)")
    return st
