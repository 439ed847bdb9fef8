"""The "updates" component: installs signed model bundles, verify -> stage -> precheck ->
trial -> probation -> commit, around the pure trust decision (trust.py), the pure state
machine (machine.py) and the pure probation judgement (probation.py).

Wiring (edgerund/daemon.py): the slot repository (repository.py) is entered before the
models host, so start-up recovery is done and the host loads a verified slot; this
component is entered after the models host and the loops and is handed them as ports
(ports.ModelHost, ports.LoopStats), with the anti-rollback counter (ports.Counter) and the
remote command router (ports.CommandRouter, `cmd/update`) and the models' drift verdicts
(ports.DriftReports) and the twin's model pins (ports.ModelPins: a local update of a model
a twin target pins is refused unless overridden, jobs.py). Its tasks run in the TaskScope the root gives it: the worker
(jobs.py), when configured the inbox watcher (sources.py), and with drift verdicts and
`post_update_drift_window_s` > 0 the post-update drift watch: once a second it asks
postdrift.decide about every model and rolls back with reason `post_update_drift`
through the manual rollback's path (the target slot re-verified first).

Module map: recovery.py (start-up), repository.py (slots, records, keyring), jobs.py (the
job runner), steps.py (machine driver and the steps), probation.py (the verdict),
commands.py (socket commands), sources.py (inbox, MQTT), postdrift.py (the post-update
drift decision), adaptation.py (device calibrations: the `adapt` command, cooldown,
auto_adapt; with the models host as its `ports.Calibrator` and the identity as its
`ports.Signer`), calprobation.py (a calibration's extra probation verdict).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from edgerund.component import Command, Peer
from edgerund.config.schema import Config
from edgerund.context import TaskScope
from edgerund.errors import CommandError
from edgerund.ports import (
    Calibrator,
    CommandRouter,
    Counter,
    DriftReports,
    EventSink,
    LoopStats,
    ModelHost,
    ModelPins,
    Signer,
)
from edgerund.updates import machine, postdrift
from edgerund.updates.adaptation import Adaptations
from edgerund.updates.commands import UpdateCommands
from edgerund.updates.jobs import Job, JobRunner, JobTicket
from edgerund.updates.keyring import Keyring
from edgerund.updates.ratelimit import SourceLimiter
from edgerund.updates.refused import RefusedStore
from edgerund.updates.repository import SlotRepository
from edgerund.updates.slots import SlotStore
from edgerund.updates.sources import InboxSource, MqttSource
from edgerund.updates.steps import Steps
from edgerund.updates.transfer import TransferStore

# The requester of a remote rollback: an operator whose signature the gate checked.
REMOTE_PEER = Peer(pid=0, uid=-1, gid=-1, privileged=True)

log = structlog.get_logger("edgerund.updates")


class UpdatesComponent:
    name = "updates"

    def __init__(
        self,
        cfg: Config,
        *,
        slots: SlotRepository,
        scope: TaskScope,
        events: EventSink,
        counter: Counter,
        models: ModelHost | None,
        loops: LoopStats | None,
        router: CommandRouter | None,
        drift: DriftReports | None = None,
        calibrator: Calibrator | None = None,
        signer: Signer | None = None,
        pins: ModelPins | None = None,
    ) -> None:
        self.cfg = cfg.updates
        self.drift = drift
        self.drift_interval_s = 1.0
        self._drift_failed: set[tuple[str, str]] = set()  # (model, version): logged once
        self.slots = slots
        self.scope = scope
        self.counter = counter
        self.steps = Steps(
            self.cfg,
            repo=slots,
            hardware_id=cfg.gateway.hardware_id,
            events=events,
            counter=counter,
            models=models,
            loops=loops,
        )
        self.limiter = SourceLimiter(self.cfg.source_per_min, self.cfg.source_burst)
        self.runner = JobRunner(
            self.steps,
            events=events,
            manifest_max=self.cfg.manifest_max_kb * 1024,
            deferred=slots.take_deferred(),
            limiter=self.limiter,
            pins=pins,
        )
        self.refused = RefusedStore(slots.upd_dir / "inbox-refused.json")
        self.transfers = TransferStore(
            slots.upd_dir / "transfers",
            max_bytes=self.steps.limits.bundle_max_bytes,
            chunk_max=self.cfg.mqtt_chunk_max_kb * 1024,
            ttl_s=self.cfg.mqtt_transfer_ttl_s,
            max_transfers=self.cfg.mqtt_max_transfers,
        )
        self.mqtt = MqttSource(self.transfers, self.runner.submit)
        self._commands = UpdateCommands(self.steps, self.runner)
        self.adaptations = Adaptations(
            cfg,
            steps=self.steps,
            runner=self.runner,
            models=models,
            calibrator=calibrator,
            signer=signer,
            loops=loops,
            events=events,
        )
        if router is not None and self.cfg.mqtt_enabled:
            router.register("update", self.mqtt.handle)
        if router is not None:
            # cmd/rollback: admitted only with an operator signature (twin/gate.py).
            router.register("rollback", self._remote_rollback)

    async def _remote_rollback(self, payload: bytes) -> bytes:
        try:
            args = json.loads(payload or b"{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise CommandError("bad_json", "expected a JSON object {model}")
        result = await self._commands.rollback(args, REMOTE_PEER)
        return json.dumps({"ok": True, "id": args.get("id"), "result": result}).encode()

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        refusal = self.steps.counter_refusal()
        if refusal is None:
            self.steps.counter_value = await self.counter.read()
        else:
            # The daemon runs (the models keep working); updates are refused with this
            # reason (steps.refusal) and status shows it.
            log.error("update_counter_refused", reason=refusal, action="updates are refused")
        gate = self.steps.refusal()
        if gate is not None:
            log.error("updates_refused", reason=gate.code, message=str(gate).split(": ", 1)[-1])
        self.scope.spawn("worker", self.runner.run, restart=True)
        if self.adaptations.auto:
            self.scope.spawn("auto-adapt", self.adaptations.run, restart=True)
        if self.cfg.inbox_dir:
            for e in await asyncio.to_thread(self.refused.load):
                entry = {
                    "path": str(Path(self.cfg.inbox_dir) / e.name),
                    "source": f"inbox:{e.name}",
                    "model": None,
                    "reason": e.reason,
                    "message": e.message,
                    "at": e.at,
                }
                log.error("update_inbox_crashed", **entry)
                self.runner.rejections.append(entry)
            inbox = InboxSource(
                Path(self.cfg.inbox_dir),
                self.cfg.inbox_poll_ms,
                self.submit,
                refused=self.refused,
                limiter=self.limiter,
                pins_version=self._pins_version,
            )
            self.scope.spawn("inbox", inbox.run, restart=True)
        if self.drift is not None and self.cfg.post_update_drift_window_s > 0:
            self.scope.spawn("post_drift", self._watch_drift, restart=True)
        return self

    async def _watch_drift(self) -> None:
        while True:
            await asyncio.sleep(self.drift_interval_s)
            await self.check_drift_once()

    async def check_drift_once(self) -> None:
        """One pass of the post-update drift rollback (edgerund/updates/postdrift.py)."""
        assert self.drift is not None
        for name, rec in list(self.slots.records.items()):
            why = postdrift.decide(
                rec,
                self.drift.drift_status(name),
                now=time.time(),
                window_s=self.cfg.post_update_drift_window_s,
            )
            if why is None:
                continue
            key = (name, str(machine.summary(rec)["version"]))
            if key in self._drift_failed:
                continue
            log.warning("update_post_drift_rollback", model=name, message=why)
            try:
                await self._commands.rollback_settled(name, postdrift.REASON, why)
            except CommandError as exc:
                # e.g. the previous slot no longer verifies: nothing to go back to; the
                # model stays, said once
                self._drift_failed.add(key)
                log.error(
                    "update_post_drift_rollback_failed",
                    model=name,
                    reason=exc.code,
                    message=str(exc),
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The scope cancels the tasks. An update cut short here is finished or undone by
        # the recovery table at the next start.
        return None

    # -- API ------------------------------------------------------------------------------
    @property
    def stores(self) -> Mapping[str, SlotStore]:
        return self.slots.stores

    @property
    def records(self) -> Mapping[str, machine.Record]:
        return self.slots.records

    @property
    def keyring(self) -> Keyring | None:
        """The keyring bundles are verified with (None: unusable, see status)."""
        return self.slots.keyring

    @property
    def keyring_base(self) -> Keyring:
        return self.slots.keyring_base

    def slot_info(self, name: str) -> dict[str, Any]:
        rec = self.slots.records.get(name)
        return {} if rec is None else machine.summary(rec)

    async def submit(self, job: Job) -> JobTicket:
        return await self.runner.submit(job)

    async def mqtt_handler(self, payload: bytes) -> bytes | None:
        """`cmd/update` messages (transfer.py protocol); returns the JSON reply."""
        return await self.mqtt.handle(payload)

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until nothing is queued or in flight (tests, benchmark)."""
        async with asyncio.timeout(timeout_s):
            await self.steps.wait_until(self.runner.idle)

    def _pins_version(self) -> int:
        # read through the runner: the pins it checks are the ones that refused
        pins = self.runner.pins
        return pins.version if pins is not None else 0

    def status(self) -> dict[str, Any]:
        gate = self.steps.refusal()
        return {
            "updates": {
                "models": [machine.summary(r) for r in self.slots.records.values()],
                "job": self.runner.progress(),
                "transfers": self.transfers.progress(),
                "recent_rejections": list(self.runner.rejections)[-5:],
                "security_counter": self.steps.counter_value,
                "counter_kind": self.counter.kind,
                "counter_refused": self.steps.counter_refusal(),
                "keyring": self.slots.keyring_status(),
                # Why every bundle is refused right now (None: updates are possible).
                "refused": None
                if gate is None
                else {"reason": gate.code, "message": str(gate).split(": ", 1)[-1]},
                "rate_limit": self.limiter.status(),
                "last_precheck": self.steps.last_precheck,
                "adaptations": self.adaptations.last,
            }
        }

    def commands(self) -> Mapping[str, Command]:
        return {**self._commands.table(), **self.adaptations.table()}


# The root's uniform entry point (each component module has a `build`); the updates
# component is always built, so it is the constructor itself, with the same ports.
build = UpdatesComponent
