"""The batcher without an event loop: samples, events and time in, sealed batches out."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest

from drivers.base import Sample
from edgerund.context import Event
from edgerund.telemetry.batcher import Batcher, Sealed, UnknownSeries
from edgerund.telemetry.codec import Cls, EventBlock, LossBlock, LossReason, SeriesBlock
from edgerund.telemetry.config import TelemetryConfig

T0 = 1_767_225_600.0  # wall clock, s


def _batcher(**over: Any) -> Batcher:
    base: dict[str, Any] = {
        "batch_max_age_s": 10.0,
        "batch_max_samples": 100,
        "agg_interval_s": 60.0,
        "event_window_s": 2.0,
        "series": [{"match": "env.*", "scale_exp": -2, "raw": True}],
    }
    base.update(over)
    b = Batcher(msgspec.convert(base, TelemetryConfig), now_mono=0.0)
    b.add_series("env", "temp", "degC")
    b.add_series("vib", "x", "g")
    names = b.names()
    b.assign_ids({n: i + 1 for i, n in enumerate(names)})
    return b


def _emit(b: Batcher, sensor: str, channel: str, t_wall: float, v: float) -> None:
    b.ingest(Sample(sensor, channel, 0.0, t_wall, v, ""))


def _series(s: Sealed) -> list[SeriesBlock]:
    return [x for x in s.blocks if isinstance(x, SeriesBlock)]


def test_raw_batch_sealed_by_age_with_scaled_integers_in_time_order() -> None:
    b = _batcher()
    for t, v in [(2.0, 20.02), (1.0, 20.01), (3.0, 20.03)]:  # one out of order
        _emit(b, "env", "temp", T0 + t, v)
    assert b.tick(9.9, T0 + 9.9) == []  # younger than batch_max_age_s: nothing due
    (raw,) = b.tick(10.0, T0 + 10.0)
    assert raw.cls is Cls.RAW and not raw.urgent and raw.samples == 3
    (blk,) = _series(raw)
    assert blk.series_id == 1 and blk.scale_exp == (-2,)
    assert blk.t_ms.tolist() == [int((T0 + t) * 1000) for t in (1.0, 2.0, 3.0)]
    assert blk.values[0].tolist() == [2001, 2002, 2003]
    assert (raw.t_first_ms, raw.t_last_ms) == (int((T0 + 1) * 1000), int((T0 + 3) * 1000))
    assert b.tick(15.0, T0 + 15.0) == []  # the batch was emptied; the age restarted at 10


def test_full_raw_batch_sealed_early_and_agg_on_interval() -> None:
    b = _batcher(batch_max_samples=5)
    for i in range(5):
        _emit(b, "env", "temp", T0 + i, 20.0 + i)
    (raw,) = b.tick(1.0, T0 + 5)
    assert raw.cls is Cls.RAW and raw.samples == 5
    (agg,) = b.tick(60.0, T0 + 60)
    assert agg.cls is Cls.AGG
    (blk,) = _series(agg)
    assert blk.series_id == 2  # env.temp:agg
    lo, hi = (float(blk.values[i][0]) * 10.0 ** blk.scale_exp[i] for i in (0, 1))
    assert (lo, hi) == pytest.approx((20.0, 24.0))  # min, max of the window
    # A stalled loop does not produce a burst of empty agg batches afterwards.
    assert b.tick(600.0, T0 + 600) == [] and b.tick(601.0, T0 + 601) == []


def test_nonfinite_and_overflow_become_loss_records() -> None:
    b = _batcher(batch_max_samples=2)
    _emit(b, "env", "temp", T0 + 1, float("nan"))
    _emit(b, "env", "temp", T0 + 2, 1e300)  # too large for the scaled integers
    for i in range(9):  # 4 x batch_max_samples fit, the 9th overflows
        _emit(b, "env", "temp", T0 + 3 + i, 20.0)
    assert b.lost_samples == 3
    sealed = b.seal_losses()
    assert sealed is not None and sealed.cls is Cls.EVT and sealed.urgent
    losses = {x.reason: x for x in sealed.blocks if isinstance(x, LossBlock)}
    assert losses[LossReason.NONFINITE].n_samples == 2
    assert losses[LossReason.NONFINITE].series_ids == (1,)
    assert losses[LossReason.OVERFLOW].n_samples == 1
    assert b.seal_losses() is None


def test_failed_writes_are_booked_as_losses_and_loss_batches_retried() -> None:
    b = _batcher()
    for i in range(4):
        _emit(b, "env", "temp", T0 + i, 20.0)
    raw = b.seal_raw(10.0)
    assert raw is not None
    b.write_failed(raw)  # the disk was full: the batch is gone
    loss = b.seal_losses()
    assert loss is not None
    (blk,) = [x for x in loss.blocks if isinstance(x, LossBlock)]
    assert blk.reason is LossReason.WRITE_FAILED and blk.n_samples == 4
    assert (blk.t_first_ms, blk.t_last_ms) == (raw.t_first_ms, raw.t_last_ms)
    b.write_failed(loss)  # the loss batch itself failed: its records come back, once
    again = b.seal_losses()
    assert again is not None and again.blocks == loss.blocks
    assert b.lost_samples == 4


def test_anomaly_carries_the_window_before_and_schedules_the_one_after() -> None:
    b = _batcher(event_window_s=2.0)
    for i in range(50):  # 10 Hz from T0
        _emit(b, "env", "temp", T0 + i * 0.1, 20.0 + i * 0.01)
    t_ev = T0 + 4.9
    ev = Event("anomaly.start", "loop1", t_ev, 100.0, {"score": 0.9})
    first = b.on_event(ev, 100.0)
    assert first.cls is Cls.EVT and first.urgent
    assert isinstance(first.blocks[0], EventBlock) and first.blocks[0].fields == {"score": 0.9}
    (pre,) = _series(first)
    t_ms = int(t_ev * 1000)
    assert pre.t_ms.min() >= t_ms - 2000 and pre.t_ms.max() <= t_ms and 19 <= pre.n <= 21
    assert b.next_window_due() == pytest.approx(102.2)
    assert b.due_windows(102.0) == []
    for i in range(50, 80):  # 3 s more
        _emit(b, "env", "temp", T0 + i * 0.1, 21.0)
    (after,) = b.due_windows(102.2)
    head = after.blocks[0]
    assert isinstance(head, EventBlock) and head.kind == "anomaly.start.window"
    assert head.fields == {"window": "after", "window_s": 2.0}
    (post,) = _series(after)
    assert post.t_ms.min() > t_ms and post.t_ms.max() <= t_ms + 2000
    assert b.next_window_due() is None and b.due_windows(200.0) == []
    # Other events carry no window and schedule nothing.
    other = b.on_event(Event("sensor.state", "env", t_ev, 0.0, {}), 103.0)
    assert len(other.blocks) == 1 and b.next_window_due() is None
    assert b.wants_event("anomaly.end") and not b.wants_event("debug.tick")


def test_upload_raw_splits_into_batches_and_refuses_unknown_series() -> None:
    b = Batcher(
        msgspec.convert({"series": [{"match": "*", "raw": False}]}, TelemetryConfig), now_mono=0
    )
    for k in range(20):
        b.add_series("s", f"c{k}", "")
    b.assign_ids({n: i + 1 for i, n in enumerate(b.names())})
    for k in range(20):
        _emit(b, "s", f"c{k}", T0, 1.0)
    batches, n = b.upload_raw("s.*", int(T0 * 1000), int(T0 * 1000))
    assert n == 20 and [len(s.blocks) for s in batches] == [8, 8, 4]
    assert all(s.cls is Cls.RAW for s in batches)
    with pytest.raises(UnknownSeries, match="nope"):
        b.upload_raw("nope*", 0, 1)
    assert b.upload_raw("s.c1", 0, 1) == ([], 0)  # a known series, nothing in the range


def test_meta_describes_every_series_with_the_key_id() -> None:
    b = _batcher()
    meta = json.loads(b.describe(site="lab", gateway="gw1", key_id="9f3a01c2"))
    assert meta["key_id"] == "9f3a01c2" and meta["format"] == "edgerund.tlm"
    names = [(e["id"], e["name"], e["kind"]) for e in meta["series"]]
    assert names == [
        (1, "env.temp", "raw"),
        (2, "env.temp:agg", "agg"),
        (3, "vib.x", "raw"),
        (4, "vib.x:agg", "agg"),
    ]
    assert not b.ids_pending
    b.ingest(Sample("new", "c", 0.0, T0, 1.0, "V"))
    assert b.ids_pending  # a series seen first in a sample needs ids from the spool
    assert np.isfinite(T0)
