"""Pure arithmetic of the soak invariants: slopes, telemetry accounting, tick bounds.

No I/O here: the harness (harness.py) samples the daemon from outside and hands the
numbers in; these functions say what they mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


def pooled_slope(segments: Iterable[Sequence[tuple[float, float]]]) -> float | None:
    """Slope (units per second) of y over t fitted WITHIN each segment (one segment per
    daemon process: a restart resets memory, which is not a negative leak), pooled: every
    segment's points are centred on its own means and one least-squares slope is fitted."""
    sxy = sxx = 0.0
    for seg in segments:
        if len(seg) < 3:
            continue
        mt = sum(t for t, _ in seg) / len(seg)
        my = sum(y for _, y in seg) / len(seg)
        for t, y in seg:
            sxy += (t - mt) * (y - my)
            sxx += (t - mt) ** 2
    return sxy / sxx if sxx > 0 else None


def robust_slope(
    segments: Iterable[Sequence[tuple[float, float]]],
    min_dt_s: float = 60.0,
    max_points: int = 1200,
) -> float | None:
    """Theil-Sen slope (units per second), pooled over segments: the median of the slopes
    between every two samples of one segment at least `min_dt_s` apart. Least squares lets
    a few minutes of transient load steer the whole fit: hung and flooding diagnostics
    clients hold fds for up to their timeout, and where in a 10-minute window they land
    tilted an fd count that ended where it began by -7.5 to +5.1 /h (the 2026-12-06 runs,
    against a 5 /h bound). The median ignores such
    excursions (it breaks down only past ~29 % outlying points) while a leak, which moves
    every later sample, still moves it. A segment longer than `max_points` is thinned
    evenly: pairs grow with its square."""
    parts = []
    for seg in segments:
        if len(seg) < 3:
            continue
        step = -(-len(seg) // max_points)
        a = np.asarray(seg[::step], dtype=float)
        dt = a[None, :, 0] - a[:, None, 0]
        dy = a[None, :, 1] - a[:, None, 1]
        far = dt >= min_dt_s
        parts.append(dy[far] / dt[far])
    if not parts:
        return None
    every = np.concatenate(parts)
    return float(np.median(every)) if every.size else None


def steady_segments(
    segments: Iterable[Sequence[tuple[float, float]]], warmup_s: float, min_span_s: float
) -> list[list[tuple[float, float]]]:
    """Each process's samples from `warmup_s` after its first one, for the processes that
    then still span `min_span_s`. A process fills bounded things lazily in its first
    minutes (the default executor up to its max_workers, the first model loads, malloc's
    arenas, rings): growth that stops is not a leak, and only what grows after that is."""
    out = []
    for seg in segments:
        if not seg:
            continue
        rest = [(t, y) for t, y in seg if t >= seg[0][0] + warmup_s]
        if rest and rest[-1][0] - rest[0][0] >= min_span_s:
            out.append(rest)
    return out


def long_segments(
    segments: Iterable[Sequence[tuple[float, float]]], min_span_s: float = 120.0
) -> list[list[tuple[float, float]]]:
    """The processes that lived at least `min_span_s` past their first sample, if any did
    (else all of them): a slope over 20 s of one process is noise."""
    segs = [list(s) for s in segments if s]
    long = [s for s in segs if s[-1][0] - s[0][0] >= min_span_s]
    return long or segs


@dataclass(frozen=True)
class Slope:
    """One resource's growth over a run, in units per hour.

    `per_h` is the judged figure: the steady-state slope (each process's samples after
    its warm-up, pooled, by the robust estimator) when at least one process lived long
    enough for one, else the least-squares pooled slope of the whole run (`basis` says
    which). `pooled_per_h` is always the whole-run least-squares slope, warm-ups
    included, and `steady_ls_per_h` the least-squares fit of the steady samples, so a
    reader sees what the median set aside."""

    per_h: float | None
    pooled_per_h: float | None
    steady_per_h: float | None
    steady_ls_per_h: float | None
    basis: str  # "steady" | "pooled"
    steady_processes: int


def resource_slope(
    segments: Sequence[Sequence[tuple[float, float]]], warmup_s: float, min_span_s: float
) -> Slope:
    """The slopes of one resource sampled per process (t in s): see `Slope`. A leak per
    fault or per request grows after the warm-up as before it, so the steady slope sees
    it; what a process fills once in its first minutes (pools, arenas, rings) does not
    count against it, however often the run restarts the daemon."""

    def per_h(v: float | None) -> float | None:
        return None if v is None else v * 3600

    pooled = per_h(pooled_slope(long_segments(segments)))
    steady_segs = steady_segments(segments, warmup_s, min_span_s)
    steady = per_h(robust_slope(steady_segs))
    steady_ls = per_h(pooled_slope(steady_segs))
    if steady is not None:
        return Slope(steady, pooled, steady, steady_ls, "steady", len(steady_segs))
    return Slope(pooled, pooled, None, None, "pooled", 0)


def in_ranges(x: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(lo <= x <= hi for lo, hi in ranges)


@dataclass
class Accounting:
    samples_acknowledged: int = 0
    samples_received: int = 0
    samples_in_loss_records: int = 0
    samples_unaccounted: int = 0
    samples_pending: int = 0
    batches_acknowledged: int = 0
    batches_received: int = 0
    batches_lost: int = 0
    unaccounted_seqs: list[tuple[int, int]] = field(default_factory=list)  # (epoch, seq)


def account(
    acknowledged: Mapping[int, Mapping[int, int]],
    max_seq: Mapping[int, int],
    received: Mapping[int, Sequence[tuple[int, int]]],
    lost: Mapping[int, set[int]],
    pending: Mapping[int, set[int]],
) -> Accounting:
    """Every batch the daemon committed to its spool (epoch -> seq -> samples; seqs
    1..max_seq of an epoch were all committed: AUTOINCREMENT never reuses or skips a
    committed seq) is received by the consumer, named in a loss record, or still pending
    in the spool. A seq committed and evicted between two looks at the spool, whose
    sample count the harness never saw, counts as a batch with 0 known samples."""
    a = Accounting()
    for epoch, top in max_seq.items():
        counts = acknowledged.get(epoch, {})
        rec = received.get(epoch, [])
        lo_set = lost.get(epoch, set())
        pend = pending.get(epoch, set())
        for seq in range(1, top + 1):
            n = counts.get(seq, 0)
            a.batches_acknowledged += 1
            a.samples_acknowledged += n
            if in_ranges(seq, rec):
                a.batches_received += 1
                a.samples_received += n
            elif seq in lo_set:
                a.batches_lost += 1
                a.samples_in_loss_records += n
            elif seq in pend:  # still in the spool after the final stop: sent at next start
                a.samples_pending += n
            else:
                a.samples_unaccounted += n
                a.unaccounted_seqs.append((epoch, seq))
    return a


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
