"""The `telemetry` component: samples and events in, sealed batches into the spool, the
uplink draining it.

Theory of operation
-------------------
* `hub.subscribe` calls `_on_sample` on the loop for every sample: it only appends to
  per-series lists (agg window, open raw batch, local ring) - O(1), no allocation beyond
  the list slot. Non-finite values cannot travel as scaled integers: they are counted as a
  loss (reason `nonfinite`), never dropped silently.
* The sealer task wakes twice a second: it seals the open raw batch when it is
  `batch_max_age_s` old or holds `batch_max_samples` (this bounds what a kill -9 can lose),
  an agg batch every `agg_interval_s` (all series in one batch; vibration series add RMS,
  peak, crest factor and band energies) and a loss batch whenever losses were recorded.
  Sealing = building the blocks; assigning the sequence, encoding, zstd and the commit
  happen on the spool's writer thread.
* Events matching `telemetry.events` (fnmatch) become `evt` batches at once (urgent
  commit), with the last `event_window_s` of every ring for `anomaly.start`, and a second
  `evt` batch `event_window_s` later with the window after it.
* Series ids are stable: kept in the spool's `series` table. The retained `meta` message
  maps them to names, units, channels and scales; its content gets a small version number
  (`schema_ver`, stored in the spool) that every batch carries.
* MQTT commands (`cmd/resend`, `cmd/upload_raw`, `cmd/rebirth`, and what other components
  add with `register_command`) are routed by the uplink to the handlers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt
import structlog

from edgerund.component import Command, Peer
from edgerund.errors import CommandError as CommandRejected
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
from edgerund.telemetry.spool import Spool
from edgerund.telemetry.uplink import CmdHandler, Signer, Uplink, meta_with_ver

if TYPE_CHECKING:
    from drivers.base import Sample
    from edgerund.context import Context, Event

log = structlog.get_logger("edgerund.telemetry")

BUILTIN_COMMANDS = ("resend", "upload_raw", "rebirth")


# The `telemetry` section when telemetry is disabled (DESIGN.md keys; #13: the daemon no
# longer hard-codes it).
EMPTY_STATUS: dict[str, object] = {
    "telemetry": {"connected": False, "backlog_batches": 0, "sent_batches": 0, "lost_samples": 0}
}


class Ring:
    """Fixed-size ring of (t_ms, value) in two numpy arrays."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.t = np.zeros(size, dtype=np.int64)
        self.v = np.zeros(size, dtype=np.float64)
        self.n = 0
        self.i = 0

    def push(self, t_ms: int, v: float) -> None:
        self.t[self.i] = t_ms
        self.v[self.i] = v
        self.i = (self.i + 1) % self.size
        self.n = min(self.n + 1, self.size)

    def window(
        self, t_from: int, t_to: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        if self.n < self.size:
            t, v = self.t[: self.n], self.v[: self.n]
        else:
            t, v = np.roll(self.t, -self.i), np.roll(self.v, -self.i)
        m = (t >= t_from) & (t <= t_to)
        return t[m].copy(), v[m].copy()


@dataclass
class _Series:
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


@dataclass
class _Loss:
    t_first: int
    t_last: int
    n: int


class TelemetryComponent:
    name = "telemetry"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg: TelemetryConfig = ctx.config.telemetry
        self.ucfg = ctx.config.uplink
        gw = ctx.config.gateway
        self.site, self.gateway = gw.site, gw.id
        spool_dir = Path(self.cfg.spool_dir) if self.cfg.spool_dir else ctx.state_dir / "telemetry"
        t = self.cfg.ttl
        self._loop: asyncio.AbstractEventLoop | None = None
        self.spool = Spool(
            spool_dir,
            max_bytes=int(self.cfg.spool_max_mb * 1024 * 1024),
            ttl_s={Cls.EVT: t.evt_h * 3600, Cls.AGG: t.agg_h * 3600, Cls.RAW: t.raw_h * 3600},
            keep_acked_s=self.cfg.keep_acked_h * 3600,
            commit_interval_s=self.cfg.commit_interval_ms / 1000.0,
            on_commit=self._on_commit_thread,
            on_quarantine=self._on_quarantine_thread,
        )
        self.series: dict[tuple[str, str], _Series] = {}
        self.losses: dict[tuple[int, LossReason], _Loss] = {}
        self.lost_samples = 0
        self.schema_ver = 0
        self.meta_text = "{}"
        self.uplink: Uplink | None = None
        self._commands: dict[str, CmdHandler] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubs: list[Callable[[], None]] = []
        self._events: asyncio.Queue[Event] = asyncio.Queue(maxsize=10000)
        self._raw_opened = time.monotonic()
        self._next_agg = time.monotonic() + self.cfg.agg_interval_s
        self._agg_window_start_ms = int(time.time() * 1000)
        self._pending_ids = False
        self._seal_failures = 0
        self._post_windows: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ public API

    def register_command(
        self, name: str, handler: Callable[[bytes], Awaitable[bytes | None]]
    ) -> None:
        """Route MQTT messages on `.../cmd/<name>` to `handler`; its bytes go to `.../reply`."""
        if name in BUILTIN_COMMANDS or not name or any(c in name for c in "/#+"):
            raise ValueError(f"command name {name!r} is reserved or not a single topic level")
        self._commands[name] = handler
        if self.uplink is not None:
            self.uplink.commands[name] = handler

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.spool.open)
        hub = self.ctx.get("hub")
        names: list[tuple[str, str, str]] = list(hub.channels()) if hub is not None else []
        for sensor_id, channel, unit in names:
            self._series_for(sensor_id, channel, unit)
        await self._register_ids()
        signer = None
        identity = self.ctx.get("identity")
        if identity is not None:
            try:
                signer = Signer(identity)
            except Exception as exc:
                log.error("telemetry_signer_unavailable", error=repr(exc))
        self._signer = signer
        if self.ucfg.enabled:
            self.uplink = Uplink(
                self.ucfg,
                site=self.site,
                gateway=self.gateway,
                spool=self.spool,
                signer=signer,
                meta=lambda: (self.schema_ver, self.meta_text),
                birth=self._birth,
            )
            self.uplink.commands.update(
                {
                    "resend": self._cmd_resend,
                    "upload_raw": self._cmd_upload_raw,
                    "rebirth": self._cmd_rebirth,
                }
            )
            self.uplink.commands.update(self._commands)
        if hub is not None:
            self._unsubs.append(hub.subscribe(self._on_sample))
        self._unsubs.append(self.ctx.events.subscribe(self._on_event))
        sup = self.ctx.supervisor
        self._tasks.append(sup.spawn("telemetry.sealer", self._sealer))
        self._tasks.append(sup.spawn("telemetry.events", self._event_worker))
        if self.uplink is not None:
            self._tasks.append(sup.spawn("telemetry.uplink", self.uplink.run))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for u in self._unsubs:
            u()
        self._unsubs.clear()
        if self.uplink is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.uplink.stop(), 6.0)
        for t in [*self._tasks, *self._post_windows]:
            t.cancel()
        for t in [*self._tasks, *self._post_windows]:
            with contextlib.suppress(BaseException):
                await t
        # Seal what is open so a clean stop loses nothing, then commit and close.
        with contextlib.suppress(Exception):
            await self._seal_raw()
            await self._seal_agg(final=True)
            await self._seal_losses()
        await asyncio.to_thread(self.spool.close)

    # ------------------------------------------------------------ ingest

    def _series_for(self, sensor_id: str, channel: str, unit: str) -> _Series:
        key = (sensor_id, channel)
        st = self.series.get(key)
        if st is None:
            sc = self.cfg.series_for(sensor_id, channel)
            ring_n = (
                sc.ring_samples if sc.ring_samples is not None else self.cfg.default_ring_samples
            )
            st = _Series(
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
            self._pending_ids = True
        return st

    def _on_sample(self, s: Sample) -> None:
        st = self.series.get((s.sensor_id, s.channel))
        if st is None:
            st = self._series_for(s.sensor_id, s.channel, s.unit)
        t_ms = round(s.t_wall * 1000.0)
        v = float(s.value)
        if not math.isfinite(v) or abs(v) * 10.0 ** (-st.scale) >= 2.0**60:
            self._loss(st.sid or 0, LossReason.NONFINITE, t_ms, 1)
            return
        if st.agg:
            st.agg_t.append(t_ms)
            st.agg_v.append(v)
        if st.raw:
            if len(st.raw_t) >= 4 * self.cfg.batch_max_samples:  # spool stalled: bound RAM
                self._loss(st.sid or 0, LossReason.OVERFLOW, t_ms, 1)
            else:
                st.raw_t.append(t_ms)
                st.raw_v.append(v)
        if st.ring is not None:
            st.ring.push(t_ms, v)

    def _loss(self, sid: int, reason: LossReason, t_ms: int, n: int) -> None:
        self.lost_samples += n
        cur = self.losses.get((sid, reason))
        if cur is None:
            self.losses[(sid, reason)] = _Loss(t_ms, t_ms, n)
        else:
            cur.t_first, cur.t_last, cur.n = (
                min(cur.t_first, t_ms),
                max(cur.t_last, t_ms),
                cur.n + n,
            )

    def _on_event(self, ev: Event) -> None:
        if not any(fnmatch.fnmatchcase(ev.kind, p) for p in self.cfg.events):
            return
        try:
            self._events.put_nowait(ev)
        except asyncio.QueueFull:
            self._loss(0, LossReason.OVERFLOW, int(ev.t_wall * 1000), 1)

    # ------------------------------------------------------------ ids and meta

    async def _register_ids(self) -> None:
        self._pending_ids = False
        names: list[str] = []
        for st in self.series.values():
            names += [st.name, f"{st.name}:agg"]
        ids = await asyncio.wrap_future(self.spool.register_series(names))
        for st in self.series.values():
            st.sid, st.agg_sid = ids[st.name], ids[f"{st.name}:agg"]
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
        content = json.dumps(
            {
                "format": "edgerund.tlm",
                "version": 1,
                "site": self.site,
                "gateway": self.gateway,
                "key_id": self._signer_key_hex(),
                "series": entries,
            },
            separators=(",", ":"),
        )
        ver = await asyncio.wrap_future(self.spool.register_meta(content))
        changed = ver != self.schema_ver
        self.schema_ver = ver
        self.meta_text = meta_with_ver(content, ver)
        if changed and self.uplink is not None and self.uplink.stats.connected:
            with contextlib.suppress(Exception):
                await self.uplink.republish()

    def _signer_key_hex(self) -> str | None:
        s = getattr(self, "_signer", None)
        return s.key_id.hex() if s is not None else None

    def _birth(self) -> dict[str, Any]:
        return {
            "spool_epoch": self.spool.epoch,
            "boot_ms": int(self.ctx.started_wall * 1000),
            "boot_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.ctx.started_wall)),
        }

    # ------------------------------------------------------------ sealing

    async def _sealer(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._pending_ids:
                await self._register_ids()
            now = time.monotonic()
            full = any(len(st.raw_t) >= self.cfg.batch_max_samples for st in self.series.values())
            if full or now - self._raw_opened >= self.cfg.batch_max_age_s:
                await self._seal_raw()
            if now >= self._next_agg:
                self._next_agg += self.cfg.agg_interval_s
                if self._next_agg < now:  # the loop stalled: do not seal a burst of empties
                    self._next_agg = now + self.cfg.agg_interval_s
                await self._seal_agg()
            if self.losses:
                await self._seal_losses()

    def _append(
        self,
        cls: Cls,
        blocks: list[Block],
        samples: int,
        t_first: int,
        t_last: int,
        sids: list[int],
        urgent: bool = False,
        restore: dict[tuple[int, LossReason], _Loss] | None = None,
    ) -> asyncio.Future[int]:
        fut = asyncio.wrap_future(self.spool.append(cls, blocks, self.schema_ver, urgent=urgent))

        def done(f: asyncio.Future[int]) -> None:
            if f.cancelled() or f.exception() is None:
                return
            self._seal_failures += 1
            if restore is not None:
                # A loss batch that could not be stored: keep its records for the next try.
                for key, v in restore.items():
                    cur = self.losses.setdefault(key, _Loss(v.t_first, v.t_last, 0))
                    cur.t_first, cur.t_last = min(cur.t_first, v.t_first), max(cur.t_last, v.t_last)
                    cur.n += v.n
                return
            # The batch is gone (disk full, I/O error): say so in the next loss batch.
            sid = sids[0] if sids else 0
            self._loss(sid, LossReason.WRITE_FAILED, t_first, samples)
            if t_last > t_first:
                self._loss(sid, LossReason.WRITE_FAILED, t_last, 0)

        fut.add_done_callback(done)
        return fut

    async def _seal_raw(self) -> None:
        self._raw_opened = time.monotonic()
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
        if blocks:
            self._append(Cls.RAW, blocks, n, t_first, t_last, sids)

    async def _seal_agg(self, final: bool = False) -> None:
        blocks: list[Block] = []
        bands = self.cfg.vibration_bands_hz
        end_ms = int(time.time() * 1000)
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
        self._agg_window_start_ms = end_ms
        if blocks:
            self._append(Cls.AGG, blocks, 0, end_ms, end_ms, sids)

    async def _seal_losses(self) -> None:
        losses, self.losses = self.losses, {}
        blocks: list[Block] = [
            LossBlock(reason, Cls.RAW, v.t_first, v.t_last, v.n, (), (sid,) if sid else ())
            for (sid, reason), v in losses.items()
        ]
        if blocks:
            self._append(
                Cls.EVT,
                blocks,
                0,
                min(v.t_first for v in losses.values()),
                max(v.t_last for v in losses.values()),
                [],
                urgent=True,
                restore=losses,
            )

    def _windows(self, t_from: int, t_to: int, match: str = "*") -> tuple[list[Block], int]:
        blocks: list[Block] = []
        n = 0
        for st in self.series.values():
            if st.ring is None or st.sid is None or not fnmatch.fnmatchcase(st.name, match):
                continue
            t, v = st.ring.window(t_from, t_to)
            if len(t):
                ints, _ = quantize(v, st.scale)
                blocks.append(SeriesBlock(st.sid, t, (ints,), (st.scale,), st.period_ms))
                n += len(t)
        return blocks, n

    async def _event_worker(self) -> None:
        while True:
            ev = await self._events.get()
            t_ms = int(ev.t_wall * 1000)
            blocks: list[Block] = [EventBlock(t_ms, ev.kind, ev.source, dict(ev.fields))]
            w_ms = int(self.cfg.event_window_s * 1000)
            if ev.kind == "anomaly.start" and w_ms > 0:
                blocks += self._windows(t_ms - w_ms, t_ms)[0]
                task = asyncio.create_task(self._post_window(ev, t_ms, w_ms))
                self._post_windows.add(task)
                task.add_done_callback(self._post_windows.discard)
            self._append(Cls.EVT, blocks, 0, t_ms, t_ms, [], urgent=True)

    async def _post_window(self, ev: Event, t_ms: int, w_ms: int) -> None:
        await asyncio.sleep(w_ms / 1000.0 + 0.2)
        blocks, _ = self._windows(t_ms + 1, t_ms + w_ms)
        ev_block = EventBlock(
            t_ms, f"{ev.kind}.window", ev.source, {"window": "after", "window_s": w_ms / 1000.0}
        )
        self._append(Cls.EVT, [ev_block, *blocks], 0, t_ms, t_ms + w_ms, [], urgent=True)

    # ------------------------------------------------------------ spool callbacks (writer thread)

    def _on_commit_thread(self) -> None:
        loop, up = self._loop, self.uplink
        if loop is not None and up is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(up.wake)

    def _on_quarantine_thread(self, epoch: int, path: str) -> None:
        loop = self._loop
        if loop is None:
            return

        def publish() -> None:
            self.ctx.events.publish(
                "telemetry.spool_quarantined", "telemetry", path=path, spool_epoch=epoch
            )
            if self.uplink is not None and self.uplink.stats.connected:
                task = asyncio.ensure_future(self._republish_quietly())
                self._post_windows.add(task)
                task.add_done_callback(self._post_windows.discard)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(publish)

    async def _republish_quietly(self) -> None:
        if self.uplink is not None:
            with contextlib.suppress(Exception):
                await self.uplink.republish()

    # ------------------------------------------------------------ MQTT commands

    @staticmethod
    def _json_obj(payload: bytes) -> dict[str, Any]:
        if not payload.strip():
            return {}
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CommandRejected(
                "bad_json", f"expected a JSON object, got invalid JSON ({exc})"
            ) from None
        if not isinstance(obj, dict):
            raise CommandRejected("bad_json", f"expected a JSON object, got {type(obj).__name__}")
        return obj

    @staticmethod
    def _int(obj: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
        v = obj.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise CommandRejected("bad_args", f"{key}: expected an integer {lo}..{hi}, got {v!r}")
        return v

    async def _cmd_resend(self, payload: bytes) -> bytes:
        obj = self._json_obj(payload)
        epoch = self._int(obj, "epoch")
        first = self._int(obj, "from_seq", 1)
        last = self._int(obj, "to_seq", first)
        if last - first > 1_000_000:
            raise CommandRejected(
                "bad_args", f"range too large: expected <= 1000000 batches, got {last - first + 1}"
            )
        if epoch != self.spool.epoch:
            raise CommandRejected(
                "wrong_epoch", f"expected the current spool epoch {self.spool.epoch}, got {epoch}"
            )
        requeued, missing = await asyncio.wrap_future(self.spool.requeue(epoch, first, last))
        if self.uplink is not None:
            self.uplink.reset_cursors()
        return json.dumps(
            {"ok": True, "id": obj.get("id"), "requeued": len(requeued), "missing": missing}
        ).encode()

    async def _cmd_upload_raw(self, payload: bytes) -> bytes:
        obj = self._json_obj(payload)
        pattern = obj.get("series", "*")
        if not isinstance(pattern, str) or not pattern or len(pattern) > 200:
            raise CommandRejected("bad_args", f"series: expected a glob string, got {pattern!r}")
        t_from = self._int(obj, "from_ms")
        t_to = self._int(obj, "to_ms", t_from)
        blocks, n = self._windows(t_from, t_to, pattern)
        if not blocks and not any(
            fnmatch.fnmatchcase(st.name, pattern) for st in self.series.values()
        ):
            raise CommandRejected(
                "unknown_series",
                f"expected a glob matching one of {sorted(st.name for st in self.series.values())}, got {pattern!r}",
            )
        k = 0
        for i in range(0, len(blocks), 8):
            part = blocks[i : i + 8]
            self._append(Cls.RAW, part, 0, t_from, t_to, [])
            k += 1
        return json.dumps({"ok": True, "id": obj.get("id"), "batches": k, "samples": n}).encode()

    async def _cmd_rebirth(self, payload: bytes) -> bytes:
        obj = self._json_obj(payload)
        if self.uplink is not None:
            await self.uplink.republish()
        return json.dumps({"ok": True, "id": obj.get("id"), "schema_ver": self.schema_ver}).encode()

    # ------------------------------------------------------------ status and socket

    def status(self) -> dict[str, Any]:
        sp = self.spool.stats
        up = self.uplink.stats if self.uplink is not None else None
        oldest = round(time.time() - sp.oldest_created, 1) if sp.oldest_created else 0.0
        return {
            "telemetry": {
                "connected": bool(up and up.connected),
                "broker": self.uplink.broker if self.uplink is not None else None,
                "backlog_batches": sp.backlog_batches,
                "backlog_bytes": sp.backlog_bytes,
                "oldest_age_s": oldest,
                "sent_batches": up.sent_batches if up else 0,
                "sent_bytes": up.sent_bytes if up else 0,
                "replayed_batches": up.replayed_batches if up else 0,
                "lost_samples": sp.lost_samples + self.lost_samples,
                "lost_batches": sp.lost_batches,
                "last_error": (up.last_error if up else None) or sp.last_error,
                "spool_epoch": sp.epoch,
                "spool_bytes": sp.file_bytes,
                "spool_max_bytes": self.spool.max_bytes,
                "appended_batches": sp.appended_batches,
                "inflight": up.inflight if up else 0,
                "inflight_peak": up.inflight_peak if up else 0,
                "reconnects": up.reconnects if up else 0,
                "connect_failures": up.connect_failures if up else 0,
                "publish_rejected": up.publish_rejected if up else 0,
                "cmd_handled": up.cmd_handled if up else 0,
                "cmd_rejected": up.cmd_rejected if up else 0,
                "sign_errors": up.sign_errors if up else 0,
                "write_errors": sp.write_errors,
                "quarantined": list(sp.quarantined),
                "schema_ver": self.schema_ver,
                "series": len(self.series),
            }
        }

    def commands(self) -> Mapping[str, Command]:
        async def telemetry(args: dict[str, Any], peer: Peer) -> Any:
            return self.status()["telemetry"]

        return {
            "telemetry": Command(
                telemetry, help="uplink and spool state: connected, backlog, sent, lost"
            )
        }


def build(ctx: Context) -> TelemetryComponent | None:
    if not ctx.config.telemetry.enabled:
        return None
    return TelemetryComponent(ctx)
