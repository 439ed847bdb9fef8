"""Batching of telemetry, without I/O: samples, events and the time in; sealed batches out.

Theory of operation
-------------------
The telemetry component feeds this module and writes what it returns to the spool; the
module itself never waits, never touches a file and never reads a clock (every call that
depends on time takes it as an argument), so it is tested without an event loop.

* `ingest(sample)` is called for every hub sample: it only appends to per-series lists (the
  open raw batch, the aggregation window) and to the series' local `Ring` (the hub's ring,
  with wall-clock milliseconds as its time base) - O(1). Non-finite values (and values too
  large for the series' scaled integers) are counted as a loss with reason `nonfinite`,
  never dropped silently; a raw list that reaches 4 x `batch_max_samples` (the spool is not
  keeping up) counts `overflow` instead of growing without bound.
* `tick(now_mono, now_wall)` (twice a second) seals the open raw batch when it is
  `batch_max_age_s` old or a series holds `batch_max_samples` (the bound on what a kill -9
  loses), an agg batch every `agg_interval_s` (all series in one batch; vibration series add
  RMS, peak, crest factor and band energies) and a loss batch whenever losses were recorded.
  Sealing only builds blocks: the spool's writer thread assigns the sequence and encodes.
* `on_event(event, now_mono)` turns an event into an urgent `evt` batch; for `anomaly.start`
  the batch carries the last `event_window_s` of every ring, and a second `evt` batch with
  the window after the event becomes due `event_window_s` (+0.2 s for late samples) later:
  `next_window_due()` says when, `due_windows(now_mono)` returns it.
* A sealed batch the spool could not store comes back through `write_failed`: a loss batch
  puts its records back for the next try, any other batch becomes a `write_failed` loss.
* Series ids are assigned by the spool (they must be stable across restarts): a new series
  sets `ids_pending`; `names()` and `assign_ids()` carry the round trip, and `describe()`
  renders the `meta` document mapping the ids to names, units, channels and scales.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerund.hub.ring import Ring
from edgerund.telemetry import aggregate
from edgerund.telemetry.codec import (
    Block,
    Cls,
    EventBlock,
    LossBlock,
    LossReason,
    SeriesBlock,
    quantize,
)
from edgerund.telemetry.config import TelemetryConfig

if TYPE_CHECKING:
    from drivers.base import Sample
    from edgerund.context import Event

UPLOAD_BLOCKS_PER_BATCH = 8  # upload_raw: series blocks per raw batch
POST_WINDOW_SLACK_S = 0.2  # wait this long past the window for its last samples to arrive


@dataclass(frozen=True, slots=True)
class LossRecord:
    """Losses of one (series, reason) summed since the last loss batch."""

    series_id: int
    reason: LossReason
    t_first_ms: int
    t_last_ms: int
    n: int


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed batch to append to the spool, and what to record if that fails."""

    cls: Cls
    blocks: tuple[Block, ...]
    urgent: bool = False
    samples: int = 0  # samples a failed write loses (0 for evt/agg batches)
    t_first_ms: int = 0
    t_last_ms: int = 0
    series_id: int = 0  # the series a failed write is booked against (0: none)
    restore: tuple[LossRecord, ...] | None = None  # a loss batch: its records, to retry


class UnknownSeries(ValueError):
    """`upload_raw` with a pattern that matches no series."""


@dataclass
class Series:
    name: str
    unit: str
    scale: int
    raw: bool
    agg: bool
    vibration: bool
    period_ms: int
    sid: int | None = None
    agg_sid: int | None = None
    raw_t: list[int] = field(default_factory=list)
    raw_v: list[float] = field(default_factory=list)
    agg_t: list[int] = field(default_factory=list)
    agg_v: list[float] = field(default_factory=list)
    ring: Ring | None = None


@dataclass(frozen=True, slots=True)
class _PostWindow:
    due_mono: float
    kind: str
    source: str
    t_ms: int
    w_ms: int


class Batcher:
    def __init__(self, cfg: TelemetryConfig, *, now_mono: float) -> None:
        self.cfg = cfg
        self.series: dict[tuple[str, str], Series] = {}
        self.lost_samples = 0
        self.ids_pending = False
        self._losses: dict[tuple[int, LossReason], list[int]] = {}  # -> [t_first, t_last, n]
        self._raw_opened = now_mono
        self._next_agg = now_mono + cfg.agg_interval_s
        self._post: list[_PostWindow] = []

    # ------------------------------------------------------------ series and ids

    def add_series(self, sensor_id: str, channel: str, unit: str) -> Series:
        key = (sensor_id, channel)
        st = self.series.get(key)
        if st is None:
            sc = self.cfg.series_for(sensor_id, channel)
            ring_n = (
                sc.ring_samples if sc.ring_samples is not None else self.cfg.default_ring_samples
            )
            st = Series(
                name=f"{sensor_id}.{channel}",
                unit=unit,
                scale=sc.effective_scale_exp(self.cfg.default_scale_exp),
                raw=sc.raw,
                agg=sc.agg,
                vibration=sc.vibration,
                period_ms=sc.period_ms or 0,
                ring=Ring(ring_n) if ring_n > 0 else None,
            )
            self.series[key] = st
            self.ids_pending = True
        return st

    def names(self) -> list[str]:
        """Every series name the spool must number (raw and agg of each series)."""
        self.ids_pending = False
        out: list[str] = []
        for st in self.series.values():
            out += [st.name, f"{st.name}:agg"]
        return out

    def assign_ids(self, ids: Mapping[str, int]) -> None:
        for st in self.series.values():
            st.sid, st.agg_sid = ids[st.name], ids[f"{st.name}:agg"]

    def describe(self, *, site: str, gateway: str, key_id: str | None) -> str:
        """The `meta` document (without `schema_ver`, which the spool assigns to it)."""
        bands = self.cfg.vibration_bands_hz
        entries: list[dict[str, Any]] = []
        for (sensor, channel), st in sorted(self.series.items()):
            entries.append(
                {
                    "id": st.sid,
                    "name": st.name,
                    "sensor": sensor,
                    "channel": channel,
                    "unit": st.unit,
                    "kind": "raw",
                    "channels": ["value"],
                    "scale_exp": [st.scale],
                    "period_ms": st.period_ms or None,
                }
            )
            entries.append(
                {
                    "id": st.agg_sid,
                    "name": f"{st.name}:agg",
                    "sensor": sensor,
                    "channel": channel,
                    "unit": st.unit,
                    "kind": "agg",
                    "channels": aggregate.stat_names(st.vibration, bands),
                    "scale_exp": aggregate.stat_scales(st.scale, st.vibration, bands),
                    "interval_s": self.cfg.agg_interval_s,
                }
            )
        return json.dumps(
            {
                "format": "edgerund.tlm",
                "version": 1,
                "site": site,
                "gateway": gateway,
                "key_id": key_id,
                "series": entries,
            },
            separators=(",", ":"),
        )

    # ------------------------------------------------------------ ingest

    def ingest(self, s: Sample) -> None:
        st = self.series.get((s.sensor_id, s.channel))
        if st is None:
            st = self.add_series(s.sensor_id, s.channel, s.unit)
        t_ms = round(s.t_wall * 1000.0)
        v = float(s.value)
        if not math.isfinite(v) or abs(v) * 10.0 ** (-st.scale) >= 2.0**60:
            self.record_loss(st.sid or 0, LossReason.NONFINITE, t_ms, 1)
            return
        if st.agg:
            st.agg_t.append(t_ms)
            st.agg_v.append(v)
        if st.raw:
            if len(st.raw_t) >= 4 * self.cfg.batch_max_samples:  # spool stalled: bound RAM
                self.record_loss(st.sid or 0, LossReason.OVERFLOW, t_ms, 1)
            else:
                st.raw_t.append(t_ms)
                st.raw_v.append(v)
        if st.ring is not None:
            st.ring.push(float(t_ms), v)

    def record_loss(self, sid: int, reason: LossReason, t_ms: int, n: int) -> None:
        self.lost_samples += n
        cur = self._losses.get((sid, reason))
        if cur is None:
            self._losses[(sid, reason)] = [t_ms, t_ms, n]
        else:
            cur[0], cur[1], cur[2] = min(cur[0], t_ms), max(cur[1], t_ms), cur[2] + n

    def wants_event(self, kind: str) -> bool:
        return any(fnmatch.fnmatchcase(kind, p) for p in self.cfg.events)

    def write_failed(self, sealed: Sealed) -> None:
        """The spool could not store `sealed`."""
        if sealed.restore is not None:
            # A loss batch: keep its records for the next try (already counted as lost).
            for r in sealed.restore:
                cur = self._losses.setdefault(
                    (r.series_id, r.reason), [r.t_first_ms, r.t_last_ms, 0]
                )
                cur[0], cur[1] = min(cur[0], r.t_first_ms), max(cur[1], r.t_last_ms)
                cur[2] += r.n
            return
        # The batch is gone (disk full, I/O error): say so in the next loss batch.
        sid = sealed.series_id
        self.record_loss(sid, LossReason.WRITE_FAILED, sealed.t_first_ms, sealed.samples)
        if sealed.t_last_ms > sealed.t_first_ms:
            self.record_loss(sid, LossReason.WRITE_FAILED, sealed.t_last_ms, 0)

    # ------------------------------------------------------------ sealing

    def tick(self, now_mono: float, now_wall: float) -> list[Sealed]:
        """What is due at `now`: the raw batch, the agg batch, the loss batch."""
        out: list[Sealed | None] = []
        full = any(len(st.raw_t) >= self.cfg.batch_max_samples for st in self.series.values())
        if full or now_mono - self._raw_opened >= self.cfg.batch_max_age_s:
            out.append(self.seal_raw(now_mono))
        if now_mono >= self._next_agg:
            self._next_agg += self.cfg.agg_interval_s
            if self._next_agg < now_mono:  # the loop stalled: do not seal a burst of empties
                self._next_agg = now_mono + self.cfg.agg_interval_s
            out.append(self.seal_agg(now_wall))
        if self._losses:
            out.append(self.seal_losses())
        return [s for s in out if s is not None]

    def flush(self, now_mono: float, now_wall: float) -> list[Sealed]:
        """Seal everything that is open (a clean stop loses nothing)."""
        out = [self.seal_raw(now_mono), self.seal_agg(now_wall), self.seal_losses()]
        return [s for s in out if s is not None]

    def seal_raw(self, now_mono: float) -> Sealed | None:
        self._raw_opened = now_mono
        blocks: list[Block] = []
        n = 0
        sids: list[int] = []
        t_first, t_last = 1 << 62, 0
        for st in self.series.values():
            if not st.raw_t or st.sid is None:
                continue
            t = np.asarray(st.raw_t, dtype=np.int64)
            ints, _ = quantize(np.asarray(st.raw_v), st.scale)
            st.raw_t, st.raw_v = [], []
            order = np.argsort(t, kind="stable")
            blocks.append(SeriesBlock(st.sid, t[order], (ints[order],), (st.scale,), st.period_ms))
            n += len(t)
            sids.append(st.sid)
            t_first, t_last = min(t_first, int(t.min())), max(t_last, int(t.max()))
        if not blocks:
            return None
        return Sealed(Cls.RAW, tuple(blocks), False, n, t_first, t_last, sids[0])

    def seal_agg(self, now_wall: float) -> Sealed | None:
        blocks: list[Block] = []
        bands = self.cfg.vibration_bands_hz
        end_ms = int(now_wall * 1000)
        sids: list[int] = []
        for st in self.series.values():
            if not st.agg_v or st.agg_sid is None:
                continue
            t = np.asarray(st.agg_t, dtype=np.int64)
            stats = aggregate.aggregate(
                t / 1000.0, np.asarray(st.agg_v), vibration=st.vibration, bands_hz=bands
            )
            st.agg_t, st.agg_v = [], []
            scales = aggregate.stat_scales(st.scale, st.vibration, bands)
            cols = tuple(quantize(np.array([x]), s)[0] for x, s in zip(stats, scales, strict=True))
            blocks.append(
                SeriesBlock(
                    st.agg_sid,
                    np.array([max(end_ms, int(t.max()))], dtype=np.int64),
                    cols,
                    tuple(scales),
                )
            )
            sids.append(st.agg_sid)
        if not blocks:
            return None
        return Sealed(Cls.AGG, tuple(blocks), False, 0, end_ms, end_ms, sids[0])

    def seal_losses(self) -> Sealed | None:
        losses, self._losses = self._losses, {}
        if not losses:
            return None
        records = tuple(
            LossRecord(sid, reason, v[0], v[1], v[2]) for (sid, reason), v in losses.items()
        )
        blocks: tuple[Block, ...] = tuple(
            LossBlock(
                r.reason,
                Cls.RAW,
                r.t_first_ms,
                r.t_last_ms,
                r.n,
                (),
                (r.series_id,) if r.series_id else (),
            )
            for r in records
        )
        return Sealed(
            Cls.EVT,
            blocks,
            True,
            0,
            min(r.t_first_ms for r in records),
            max(r.t_last_ms for r in records),
            0,
            restore=records,
        )

    # ------------------------------------------------------------ windows

    def windows(self, t_from: int, t_to: int, match: str = "*") -> tuple[list[Block], int]:
        """Raw blocks of every ring's samples in [t_from, t_to] (ms) of series matching."""
        blocks: list[Block] = []
        n = 0
        for st in self.series.values():
            if st.ring is None or st.sid is None or not fnmatch.fnmatchcase(st.name, match):
                continue
            t, v = st.ring.between(float(t_from), float(t_to))
            if len(t):
                ints, _ = quantize(v, st.scale)
                blocks.append(
                    SeriesBlock(st.sid, t.astype(np.int64), (ints,), (st.scale,), st.period_ms)
                )
                n += len(t)
        return blocks, n

    def on_event(self, ev: Event, now_mono: float) -> Sealed:
        """The urgent evt batch of one event (with the window before an anomaly)."""
        t_ms = int(ev.t_wall * 1000)
        blocks: list[Block] = [EventBlock(t_ms, ev.kind, ev.source, dict(ev.fields))]
        w_ms = int(self.cfg.event_window_s * 1000)
        if ev.kind == "anomaly.start" and w_ms > 0:
            blocks += self.windows(t_ms - w_ms, t_ms)[0]
            due = now_mono + w_ms / 1000.0 + POST_WINDOW_SLACK_S
            self._post.append(_PostWindow(due, ev.kind, ev.source, t_ms, w_ms))
        return Sealed(Cls.EVT, tuple(blocks), True, 0, t_ms, t_ms, 0)

    def next_window_due(self) -> float | None:
        """The monotonic time the next after-event window is due, None if none is pending."""
        return min((p.due_mono for p in self._post), default=None)

    def due_windows(self, now_mono: float) -> list[Sealed]:
        """The after-event windows due at `now_mono`, in the order they fell due."""
        due = sorted((p for p in self._post if p.due_mono <= now_mono), key=lambda p: p.due_mono)
        if not due:
            return []
        self._post = [p for p in self._post if p.due_mono > now_mono]
        out: list[Sealed] = []
        for p in due:
            blocks, _ = self.windows(p.t_ms + 1, p.t_ms + p.w_ms)
            ev_block = EventBlock(
                p.t_ms,
                f"{p.kind}.window",
                p.source,
                {"window": "after", "window_s": p.w_ms / 1000.0},
            )
            out.append(Sealed(Cls.EVT, (ev_block, *blocks), True, 0, p.t_ms, p.t_ms + p.w_ms, 0))
        return out

    def upload_raw(self, pattern: str, t_from: int, t_to: int) -> tuple[list[Sealed], int]:
        """Raw batches of the rings' samples in [t_from, t_to] of the series matching
        `pattern` (cmd/upload_raw), and the number of samples they hold."""
        blocks, n = self.windows(t_from, t_to, pattern)
        if not blocks and not any(
            fnmatch.fnmatchcase(st.name, pattern) for st in self.series.values()
        ):
            raise UnknownSeries(
                f"expected a glob matching one of "
                f"{sorted(st.name for st in self.series.values())}, got {pattern!r}"
            )
        out = [
            Sealed(
                Cls.RAW, tuple(blocks[i : i + UPLOAD_BLOCKS_PER_BATCH]), False, 0, t_from, t_to, 0
            )
            for i in range(0, len(blocks), UPLOAD_BLOCKS_PER_BATCH)
        ]
        return out, n
