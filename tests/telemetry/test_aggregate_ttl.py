"""Vibration aggregates against closed-form values; TTL expiry writes a loss record."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerund.telemetry import aggregate, codec
from edgerund.telemetry.codec import Cls, LossBlock, LossReason, SeriesBlock
from edgerund.telemetry.spool import Spool


def test_vibration_stats_match_closed_form() -> None:
    fs, n = 100.0, 1000  # 10 s: 7 Hz and 23 Hz fall on FFT bins exactly
    t = np.arange(n) / fs
    a1, a2, dc = 0.05, 0.02, 1.0
    x = dc + a1 * np.sin(2 * np.pi * 7 * t) + a2 * np.sin(2 * np.pi * 23 * t + 1.0)
    bands = [(0.0, 10.0), (10.0, 30.0), (30.0, 50.0)]
    names = aggregate.stat_names(True, bands)
    st = dict(zip(names, aggregate.aggregate(t, x, vibration=True, bands_hz=bands), strict=True))
    assert st["count"] == n and abs(st["mean"] - dc) < 1e-9 and st["last"] == x[-1]
    assert abs(st["rms"] - np.sqrt(a1**2 / 2 + a2**2 / 2)) < 1e-9
    assert abs(st["band_0_10hz_rms"] - a1 / np.sqrt(2)) < 1e-9
    assert abs(st["band_10_30hz_rms"] - a2 / np.sqrt(2)) < 1e-9
    assert st["band_30_50hz_rms"] < 1e-9
    assert abs(st["crest"] - st["peak"] / st["rms"]) < 1e-12 and 1.0 < st["crest"] < 2.0
    assert len(aggregate.stat_scales(-3, True, bands)) == len(names)


def test_ttl_expiry_writes_loss_record(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    sp = Spool(
        tmp_path,
        max_bytes=1 << 20,
        ttl_s={Cls.EVT: 1e6, Cls.AGG: 1e6, Cls.RAW: 3600.0},
        commit_interval_s=0.01,
        clock=lambda: now[0],
    )
    sp.open()
    try:
        t = np.arange(10, dtype=np.int64) * 1000 + 1_767_225_600_000
        old = sp.append(Cls.RAW, [SeriesBlock(2, t, (t % 5,), (0,))], 1).result()
        now[0] += 1800
        young = sp.append(Cls.RAW, [SeriesBlock(2, t + 10_000, (t % 5,), (0,))], 1).result()
        agg = sp.append(Cls.AGG, [SeriesBlock(3, t[:1], (t[:1],), (0,))], 1).result()
        now[0] += 2000  # `old` is 3800 s old, past the raw TTL; `young` 2000 s
        sp.housekeeping().result()
        left = {r.seq for c in Cls for r in sp.fetch(c, 0, 100).result()}
        evt = sp.fetch(Cls.EVT, 0, 100).result()
    finally:
        sp.close()
    assert old not in left and young in left and agg in left
    (loss,) = [
        b for r in evt for b in codec.decode(r.payload).batch.blocks if isinstance(b, LossBlock)
    ]
    assert loss.reason is LossReason.EXPIRED_TTL and loss.seqs == (old,) and loss.n_samples == 10
    assert (loss.t_first_ms, loss.t_last_ms) == (int(t[0]), int(t[-1])) and loss.series_ids == (2,)
