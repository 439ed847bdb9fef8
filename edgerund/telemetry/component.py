"""The `telemetry` component: samples and events in, sealed batches into the spool, the
uplink draining it.

Theory of operation
-------------------
The component is the I/O shell around three parts that each have one job:

* `batcher.Batcher` (no I/O): the sample source calls `_on_sample` on the loop for every
  sample, which hands it to the batcher (O(1) appends). The sealer task wakes twice a
  second and writes what `Batcher.tick` sealed (raw, agg and loss batches) to the spool.
  Events matching `telemetry.events` are queued by the event-bus subscriber (cheap, never
  blocks the publisher; a full queue is an `overflow` loss) and turned into urgent `evt`
  batches by the events task, which also wakes when an after-anomaly window falls due.
* `spool.Spool`: assigns sequences, encodes and commits on its own writer thread; a batch
  it could not store goes back to the batcher as a loss (`Batcher.write_failed`).
* `uplink.Uplink`: drains the spool to the broker and passes `cmd/*` requests to
  `commands.Dispatcher`, which routes them through the root's `RemoteCommands`; telemetry's
  own commands (resend, upload_raw, rebirth) are in `commands.TelemetryCommands`.

Series ids are stable: kept in the spool's `series` table. The retained `meta` message
maps them to names, units, channels and scales; its content gets a small version number
(`schema_ver`, stored in the spool) that every batch carries.

Every task runs in the component's `TaskScope`. On exit the uplink says goodbye, the
scope's tasks are stopped (so nothing seals concurrently), what is open is sealed (a clean
stop loses nothing) and the spool commits and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import structlog

from edgerund.component import Command, Peer
from edgerund.telemetry.batcher import Batcher, Sealed
from edgerund.telemetry.codec import Cls, LossReason
from edgerund.telemetry.commands import Dispatcher, TelemetryCommands
from edgerund.telemetry.signing import Signer, meta_with_ver
from edgerund.telemetry.spool import Spool

if TYPE_CHECKING:
    from edgerund import ports
    from edgerund.config.schema import Config
    from edgerund.context import Event, EventBus, TaskScope
    from edgerund.remote import RemoteCommands
    from edgerund.telemetry.uplink import Uplink

log = structlog.get_logger("edgerund.telemetry")

# The `telemetry` section when telemetry is disabled (the DESIGN.md keys; the daemon does
# not hard-code them).
EMPTY_STATUS: dict[str, object] = {
    "telemetry": {"connected": False, "backlog_batches": 0, "sent_batches": 0, "lost_samples": 0}
}

SEAL_TICK_S = 0.5
EVENT_QUEUE_MAX = 10_000


class TelemetryComponent:
    name = "telemetry"

    def __init__(
        self,
        cfg: Config,
        *,
        scope: TaskScope,
        events: EventBus,
        samples: ports.SampleSource | None,
        signer: ports.Signer | None,
        router: RemoteCommands,
    ) -> None:
        self.cfg = cfg.telemetry
        self.ucfg = cfg.uplink
        self.site, self.gateway = cfg.gateway.site, cfg.gateway.id
        self._scope = scope
        self._bus = events
        self._samples = samples
        self._identity = signer
        self._router = router
        self._started_wall = time.time()
        spool_dir = (
            Path(self.cfg.spool_dir)
            if self.cfg.spool_dir
            else Path(cfg.paths.state_dir) / "telemetry"
        )
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
        self.batcher = Batcher(self.cfg, now_mono=time.monotonic())
        self.schema_ver = 0
        self.meta_text = "{}"
        self.uplink: Uplink | None = None
        self._signer: Signer | None = None
        self._unsubs: list[Callable[[], None]] = []
        self._events: asyncio.Queue[Event] = asyncio.Queue(maxsize=EVENT_QUEUE_MAX)
        self.seal_failures = 0
        self.dispatcher = Dispatcher(router, max_bytes=self.ucfg.cmd_max_bytes)
        TelemetryCommands(
            spool=self.spool,
            batcher=self.batcher,
            write=self._write,
            uplink=lambda: self.uplink,
            schema_ver=lambda: self.schema_ver,
        ).register(router)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.spool.open)
        src = self._samples
        for sensor_id, channel, unit in src.channels() if src is not None else []:
            self.batcher.add_series(sensor_id, channel, unit)
        if self._identity is not None:
            try:
                self._signer = Signer(self._identity)
            except Exception as exc:
                log.error("telemetry_signer_unavailable", error=repr(exc))
        await self._register_ids()
        if self.ucfg.enabled:
            # imported here: aiomqtt, paho, ssl cost start-up time and memory, and a
            # gateway without an uplink (the simulated mode) never needs them
            from edgerund.telemetry.uplink import Uplink

            self.uplink = Uplink(
                self.ucfg,
                site=self.site,
                gateway=self.gateway,
                spool=self.spool,
                signer=self._signer,
                meta=lambda: (self.schema_ver, self.meta_text),
                birth=self._birth,
                dispatch=self.dispatcher,
            )
        if src is not None:
            self._unsubs.append(src.subscribe(self.batcher.ingest))
        self._unsubs.append(self._bus.subscribe(self._on_event))
        self._scope.spawn("sealer", self._sealer)
        self._scope.spawn("events", self._event_worker)
        if self.uplink is not None:
            self._scope.spawn("uplink", self.uplink.run)
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
        # Stop the sealer and the events task before the final seal (the root leaves the
        # scope after this returns; closing it early is idempotent).
        await self._scope.aclose()
        with contextlib.suppress(Exception):
            for sealed in self.batcher.flush(time.monotonic(), time.time()):
                self._write(sealed)
        await asyncio.to_thread(self.spool.close)

    # ------------------------------------------------------------ ids and meta

    async def _register_ids(self) -> None:
        names = self.batcher.names()
        ids = await asyncio.wrap_future(self.spool.register_series(names))
        self.batcher.assign_ids(ids)
        key_id = self._signer.key_id.hex() if self._signer is not None else None
        content = self.batcher.describe(site=self.site, gateway=self.gateway, key_id=key_id)
        ver = await asyncio.wrap_future(self.spool.register_meta(content))
        changed = ver != self.schema_ver
        self.schema_ver = ver
        self.meta_text = meta_with_ver(content, ver)
        if changed and self.uplink is not None and self.uplink.stats.connected:
            with contextlib.suppress(Exception):
                await self.uplink.republish()

    def _birth(self) -> dict[str, Any]:
        return {
            "spool_epoch": self.spool.epoch,
            "boot_ms": int(self._started_wall * 1000),
            "boot_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started_wall)),
        }

    # ------------------------------------------------------------ sealing

    def _write(self, sealed: Sealed) -> None:
        """Hand a sealed batch to the spool; a failed write becomes a loss record."""
        fut = asyncio.wrap_future(
            self.spool.append(sealed.cls, sealed.blocks, self.schema_ver, urgent=sealed.urgent)
        )

        def done(f: asyncio.Future[int]) -> None:
            if f.cancelled() or f.exception() is None:
                return
            self.seal_failures += 1
            self.batcher.write_failed(sealed)

        fut.add_done_callback(done)

    async def _sealer(self) -> None:
        while True:
            await asyncio.sleep(SEAL_TICK_S)
            if self.batcher.ids_pending:
                await self._register_ids()
            for sealed in self.batcher.tick(time.monotonic(), time.time()):
                self._write(sealed)

    def _on_event(self, ev: Event) -> None:
        if not self.batcher.wants_event(ev.kind):
            return
        try:
            self._events.put_nowait(ev)
        except asyncio.QueueFull:
            self.batcher.record_loss(0, LossReason.OVERFLOW, int(ev.t_wall * 1000), 1)

    async def _event_worker(self) -> None:
        """Events become evt batches at once; after-anomaly windows when they fall due."""
        while True:
            due = self.batcher.next_window_due()
            ev: Event | None = None
            if due is None:
                ev = await self._events.get()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, due - time.monotonic())):
                        ev = await self._events.get()
            if ev is not None:
                self._write(self.batcher.on_event(ev, time.monotonic()))
            for sealed in self.batcher.due_windows(time.monotonic()):
                self._write(sealed)

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
            self._bus.publish(
                "telemetry.spool_quarantined", "telemetry", path=path, spool_epoch=epoch
            )
            if self.uplink is not None and self.uplink.stats.connected:
                self._scope.spawn("republish", self._republish_quietly, restart=False)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(publish)

    async def _republish_quietly(self) -> None:
        if self.uplink is not None:
            with contextlib.suppress(Exception):
                await self.uplink.republish()

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
                "lost_samples": sp.lost_samples + self.batcher.lost_samples,
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
                "cmd_handled": self.dispatcher.handled,
                "cmd_rejected": self.dispatcher.rejected,
                "sign_errors": up.sign_errors if up else 0,
                "sign_held_batches": up.sign_held if up else 0,
                # the broker PUBACKed batches 0x10 (no subscriber): held in the spool
                "no_subscriber": bool(up and up.no_subscriber),
                "no_subscriber_held_batches": up.no_subscriber_held if up else 0,
                "unsigned_batches": up.unsigned_batches if up else 0,
                "write_errors": sp.write_errors,
                "quarantined": list(sp.quarantined),
                "schema_ver": self.schema_ver,
                "series": len(self.batcher.series),
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


def build(
    cfg: Config,
    *,
    scope: TaskScope,
    events: EventBus,
    samples: ports.SampleSource | None,
    signer: ports.Signer | None,
    router: RemoteCommands,
) -> TelemetryComponent | None:
    """None when telemetry is disabled. Registers resend, upload_raw and rebirth with
    `router` and dispatches every incoming `cmd/*` through it."""
    if not cfg.telemetry.enabled:
        return None
    return TelemetryComponent(
        cfg, scope=scope, events=events, samples=samples, signer=signer, router=router
    )
