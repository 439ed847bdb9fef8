"""The steps of an update: the machine driver and the executor of each action.

Theory of operation
-------------------
`drive(name, event)` feeds the pure state machine (machine.step) one event, gets the new
record and its actions, and executes the actions in order; the first is always PERSIST
(state.json is durable before any side effect). The outcome of the actions is the next
event ("ok" with what VERIFY learnt, or "fail" with a reason), until an action yields
none. A failure while cleaning up (rolling back, discarding) is logged and the remaining
cleanup still runs. Blocking work (tar reading, hashing, fsync, renames) runs in threads;
the precheck runs in a subprocess; the probation samples counters and asks the pure
`probation.judge` for a verdict.

A bundle is read once: the job runner opened it and read its head (manifest.json,
manifest.sig) to pick the model's record; VERIFY authenticates that same parsed
manifest and extracts the payload from the same open file. The verified manifest is then
kept as the model's `Candidate` for STAGE, PRECHECK and WATCH (after a restart it is read
back once from the slot's bundle.json).

A device calibration (deployment kind "calibration", version `X+cal.N`) takes the same
path with a `CalibrationOffer` (the overlay bytes and the device key's signature, made by
edgerund/updates/adaptation.py) instead of a bundle: VERIFY checks the overlay against
this device's public key, the running model's manifest and the signed policy
(edgerund.inference.overlay.check_overlay) and prepares the staging directory (the active
slot's files + the overlay); STAGE moves it into the inactive slot under a `X+cal.N`
marker; PRECHECK re-verifies the slot (publisher signature of the model files AND the
device signature of the overlay) and runs the precheck child in calibration mode (golden
vectors under the signed normalisation, must-detect vectors under the calibration); the
probation adds the calibration's own verdict (edgerund/updates/calprobation.py: drift
gone, no trips, no sensor fault) to the usual one. The io_signature and health of a
calibrated slot are its base bundle's, or, for a calibration of the packaged model, the
model manifest's graph signature and the default health.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from edgerund import __version__
from edgerund.errors import TrustError
from edgerund.inference.calibration import CalibrationRefused
from edgerund.inference.manifest import parse_manifest
from edgerund.inference.overlay import OVERLAY_FILE, OVERLAY_SIG, check_overlay, overlay_seq
from edgerund.ports import Counter, EventSink, LoopStats, ModelHost
from edgerund.updates import calprobation, fsutil, machine, probation
from edgerund.updates.abi import IoSignature, runtime_max_opset
from edgerund.updates.bundle import BundleHead, BundleReader
from edgerund.updates.config import UpdatesConfig
from edgerund.updates.manifest import BundleManifest, Health, decode_manifest, parse_time
from edgerund.updates.precheck import run_precheck
from edgerund.updates.recovery import publish_state
from edgerund.updates.repository import SlotRepository
from edgerund.updates.slotcheck import verify_slot
from edgerund.updates.trust import Device, Installed, Limits, check_size, verify_document

if TYPE_CHECKING:
    from edgerund.updates.jobs import JobTicket, Tracker

log = structlog.get_logger("edgerund.updates")


@dataclass(frozen=True)
class Received:
    """A bundle as the job runner read it: the open file, its head, manifest.json parsed."""

    reader: BundleReader
    head: BundleHead
    document: dict[str, Any]


@dataclass(frozen=True)
class CalibrationOffer:
    """A device calibration to install: `X+cal.N` of the model in the active slot."""

    model: str
    version: str  # X+cal.N
    overlay: bytes  # calibration.json: the canonical JSON that was signed
    signature: bytes  # calibration.sig: DER ECDSA by the device identity key
    probation_s: float | None = None  # None: updates.probation_s


@dataclass(frozen=True)
class Candidate:
    """The verified bundle being installed for one model."""

    manifest: BundleManifest
    manifest_sha256: str
    head: BundleHead | None  # the signed bytes to store in the slot (None once staged)


class Steps:
    def __init__(
        self,
        cfg: UpdatesConfig,
        *,
        repo: SlotRepository,
        hardware_id: str,
        events: EventSink,
        counter: Counter,
        models: ModelHost | None,
        loops: LoopStats | None,
    ) -> None:
        self.cfg = cfg
        self.repo = repo
        self.events = events
        self.counter = counter
        self.models = models
        self.loops = loops
        self.limits = Limits(
            bundle_max_bytes=int(cfg.bundle_max_mb * 1024 * 1024),
            file_max_bytes=int(cfg.file_max_mb * 1024 * 1024),
            max_counter_jump=cfg.max_counter_jump,
            max_version_jump=cfg.max_version_jump,
        )
        self.device = Device(
            hardware_id=hardware_id,
            daemon_version=__version__,
            max_opset=runtime_max_opset(),
            models=tuple(repo.stores),
        )
        self.counter_value: int | None = None
        self.candidates: dict[str, Candidate] = {}
        self.aborts: dict[str, tuple[str, str]] = {}  # model -> (reason, message): by hand
        self.last_precheck: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, probation.Baseline] = {}
        self.offers: dict[str, CalibrationOffer] = {}  # model -> calibration being verified
        self._changed = asyncio.Event()

    # -- change notification ---------------------------------------------------------------
    def touch(self) -> None:
        self._changed.set()

    async def wait_until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            self._changed.clear()
            await self._changed.wait()

    # -- the machine driver ----------------------------------------------------------------
    async def drive(
        self,
        name: str,
        ev: machine.Event,
        *,
        received: Received | None = None,
        ticket: JobTicket | None = None,
        tracker: Tracker | None = None,
    ) -> machine.Record:
        next_ev: machine.Event | None = ev
        records = self.repo.records
        while next_ev is not None:
            rec = records[name]
            if (
                next_ev.kind == "ok"
                and rec.state in machine.IN_FLIGHT
                and rec.writes >= self.cfg.max_state_writes
            ):
                next_ev = machine.Event(
                    "fail",
                    reason="state_loop",
                    message=f"more than {self.cfg.max_state_writes} state writes in one deployment",
                    now=time.time(),
                )
            new, actions = machine.step(rec, next_ev)
            records[name] = new
            self.touch()
            if tracker is not None:
                tracker.update(phase=str(new.state))
            if ticket is not None and new.state is machine.State.PROBATION:
                # `wait: "trial"` returns once PROBATION is durable, not after the watch
                # (issue #12 item 16); a refusal or rollback ends the job with its error.
                first = await self.execute(name, new, actions[:1], received, tracker)
                ticket.trial_reached.set()
                next_ev = (
                    first
                    if first is not None and first.kind == "fail"
                    else await self.execute(name, new, actions[1:], received, tracker)
                )
            else:
                next_ev = await self.execute(name, new, actions, received, tracker)
        if records[name].state in machine.TERMINAL:
            self.candidates.pop(name, None)
        return records[name]

    async def execute(
        self,
        name: str,
        rec: machine.Record,
        actions: list[machine.Action],
        received: Received | None = None,
        tracker: Tracker | None = None,
    ) -> machine.Event | None:
        result: machine.Event | None = None
        for action in actions:
            try:
                ev = await self._execute_one(name, action, received, tracker)
            except TrustError as exc:
                ev = machine.Event("fail", reason=exc.code, message=_message(exc), now=time.time())
            except OSError as exc:
                reason = "no_space" if exc.errno == errno.ENOSPC else "io_error"
                ev = machine.Event(
                    "fail", reason=reason, message=f"{action.kind}: {exc}", now=time.time()
                )
            except Exception as exc:
                ev = machine.Event(
                    "fail", reason=f"{action.kind}_failed", message=repr(exc), now=time.time()
                )
            if ev is not None and ev.kind == "fail" and rec.state in machine.TERMINAL:
                # Failing while rolling back or cleaning up: keep going, the rest still helps.
                log.error(
                    "update_cleanup_step_failed",
                    model=name,
                    action=str(action.kind),
                    reason=ev.reason,
                    message=ev.message,
                )
                continue
            if ev is not None:
                result = ev
                if ev.kind == "fail":
                    return ev
        return result

    async def _execute_one(
        self,
        name: str,
        action: machine.Action,
        received: Received | None,
        tracker: Tracker | None,
    ) -> machine.Event | None:
        store = self.repo.stores[name]
        rec = self.repo.records[name]
        kind = action.kind
        if kind is machine.ActionKind.PERSIST:
            await asyncio.to_thread(store.save_record, rec)
            fsutil.abort_point(str(rec.state))
            publish_state(self.events, name, rec)
            return None
        if kind is machine.ActionKind.VERIFY:
            offer = self.offers.pop(name, None)
            if offer is not None:
                return await self._verify_calibration(name, offer)
            assert received is not None
            return await self._verify(name, received, tracker)
        if kind is machine.ActionKind.STAGE:
            assert action.slot is not None
            dep = rec.deployment
            if dep is not None and dep.kind == "calibration":
                assert rec.active is not None
                await asyncio.to_thread(
                    store.install_calibration, action.slot, rec.active, dep.version
                )
                return machine.Event("ok", now=time.time())
            return await self._stage(name, action.slot)
        if kind is machine.ActionKind.PRECHECK:
            assert action.slot is not None
            return await self.precheck(name, action.slot)
        if kind is machine.ActionKind.RESUME_TRIAL:
            await self._measure_baseline(name)
            return machine.Event("ok", now=time.time())
        if kind is machine.ActionKind.FLIP:
            assert action.slot is not None
            await asyncio.to_thread(store.flip, action.slot)
            fsutil.abort_point(f"{rec.state}.flipped")
            return None
        if kind is machine.ActionKind.SWAP:
            assert action.slot is not None
            if self.models is not None:  # else the flipped `current` loads at the next start
                await self.models.swap(name, store.dir(action.slot))
            return (
                machine.Event("ok", now=time.time()) if rec.state is machine.State.TRIAL else None
            )
        if kind is machine.ActionKind.WATCH:
            return await self._watch(name)
        if kind is machine.ActionKind.RATCHET:
            await self.ratchet(name)
            return machine.Event("ratcheted", now=time.time())
        if kind is machine.ActionKind.INVALIDATE:
            assert action.slot is not None
            await asyncio.to_thread(store.invalidate, action.slot)
            return None
        if kind is machine.ActionKind.SYNC_SLOTS:
            dep = rec.deployment
            keep = dep.target if (dep is not None and rec.state in machine.IN_FLIGHT) else None
            await asyncio.to_thread(store.sync_slots, rec, keep)
            return None
        if kind is machine.ActionKind.DISCARD:
            await asyncio.to_thread(store.clean_staging)
            return None
        raise AssertionError(f"unhandled action {action}")

    # -- refusing everything ------------------------------------------------------------------
    def counter_refusal(self) -> str | None:
        """Why the anti-rollback counter cannot be trusted (TPM missing under the software
        fallback), or None."""
        reason = getattr(self.counter, "refusal", None)
        return None if reason is None else str(reason)

    def refusal(self) -> TrustError | None:
        """Why EVERY bundle is refused right now, before it is read: no usable keyring, or
        no trustworthy anti-rollback counter."""
        err = self.repo.keyring_refusal()
        if err is not None:
            return err
        reason = self.counter_refusal()
        if reason is not None:
            return TrustError(
                "counter_unavailable",
                f"the anti-rollback counter cannot be trusted ({reason}); updates are refused",
            )
        return None

    # -- the steps ---------------------------------------------------------------------------
    def installed(self, name: str) -> Installed:
        rec = self.repo.records[name]
        info = rec.slots.get(rec.active) if rec.active else None
        version = info.version if info else None
        cal = overlay_seq(version) if version else None
        return Installed(
            counter=self.counter_value or 0,
            # a device calibration X+cal.N runs the publisher's X: bundles compare with X
            version=cal[0] if cal is not None else version,
            bundle_id=info.bundle_id if info else None,
            created=info.created if info else None,
        )

    async def _verify(
        self, name: str, received: Received, tracker: Tracker | None
    ) -> machine.Event:
        store = self.repo.stores[name]
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        keyring = self.repo.keyring
        assert keyring is not None  # refusal() said it is usable
        self.counter_value = await self.counter.read()
        staging = await asyncio.to_thread(store.reset_staging)
        check_size(received.reader.size, self.limits)
        head = received.head
        verdict = verify_document(
            received.document,
            head.sig_bytes,
            keyring,
            now=time.time(),
            device=self.device,
            installed=self.installed(name),
            limits=self.limits,
        )
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            # Called from the worker thread: hand the figures to the loop.
            if tracker is not None:
                loop.call_soon_threadsafe(
                    lambda: tracker.update(bytes_done=done, bytes_total=total)
                )

        await asyncio.to_thread(
            received.reader.extract, staging, verdict.manifest, self.limits, progress
        )
        man = verdict.manifest
        self.candidates[name] = Candidate(man, verdict.manifest_sha256, head)
        probation_s = (
            man.health.probation_s if man.health.probation_s is not None else self.cfg.probation_s
        )
        dep = machine.Deployment(
            bundle_id=man.bundle_id,
            version=man.version,
            security_counter=man.security_counter,
            manifest_sha256=verdict.manifest_sha256,
            created=parse_time(man.created, "created"),
            probation_s=min(probation_s, self.cfg.probation_max_s),
        )
        return machine.Event("ok", deployment=dep, now=time.time())

    async def _verify_calibration(self, name: str, offer: CalibrationOffer) -> machine.Event:
        """The trust decision on a device calibration, then the staging directory."""
        rec = self.repo.records[name]
        store = self.repo.stores[name]
        if rec.active is None:
            raise TrustError("no_active_slot", f"{name}: no active slot to calibrate")
        active = store.dir(rec.active)
        try:
            mm = await asyncio.to_thread((active / "manifest.json").read_bytes)
            manifest = parse_manifest(mm, f"slot {rec.active}/manifest.json")
            doc = json.loads(offer.overlay)
            if not isinstance(doc, dict):
                raise CalibrationRefused("overlay_format", "the overlay is not a JSON object")
            # off the loop: an ECDSA verification and, for a refit, the signed layer's file
            await asyncio.to_thread(
                check_overlay, doc, offer.signature, manifest, self.repo.device_key, active
            )
        except CalibrationRefused as exc:
            raise TrustError(exc.reason, exc.detail) from None
        except (OSError, ValueError) as exc:
            raise TrustError("overlay_format", f"{name}: {exc}") from None
        if doc.get("version") != offer.version:
            raise TrustError(
                "overlay_binding", f"offer {offer.version}, overlay {doc.get('version')}"
            )
        info = rec.slots.get(rec.active)
        assert info is not None
        await asyncio.to_thread(
            store.prepare_calibration,
            rec.active,
            {OVERLAY_FILE: offer.overlay, OVERLAY_SIG: offer.signature},
        )
        probation_s = offer.probation_s if offer.probation_s is not None else self.cfg.probation_s
        dep = machine.Deployment(
            kind="calibration",
            bundle_id=info.bundle_id,
            version=offer.version,
            security_counter=info.security_counter,
            manifest_sha256=info.manifest_sha256,
            created=info.created,
            probation_s=min(probation_s, self.cfg.probation_max_s),
        )
        return machine.Event("ok", deployment=dep, now=time.time())

    async def _gate_spec(self, name: str, slot: str) -> tuple[IoSignature, Health]:
        """The io_signature and health the precheck and probation use for `slot`: its
        bundle's; a calibration of the packaged model (no bundle.json): the model
        manifest's graph signature and the default health."""
        dep = self.repo.records[name].deployment
        d = self.repo.stores[name].dir(slot)
        if dep is None or dep.kind != "calibration" or (d / "bundle.json").exists():
            if dep is not None and dep.kind == "calibration":
                data = await asyncio.to_thread((d / "bundle.json").read_bytes)
                man, _ = decode_manifest(data)
            else:
                man = await self._candidate(name, slot)
            return man.io_signature, man.health
        mm = parse_manifest(await asyncio.to_thread((d / "manifest.json").read_bytes))
        return IoSignature(inputs=mm.model_inputs, outputs=mm.model_outputs), Health()

    async def _stage(self, name: str, slot: str) -> machine.Event:
        store = self.repo.stores[name]
        cand = self.candidates[name]
        assert cand.head is not None and cand.head.sig_bytes is not None
        dep = self.repo.records[name].deployment
        await asyncio.to_thread(
            store.install_staging,
            slot,
            cand.manifest,
            cand.manifest_sha256,
            cand.head.manifest_bytes,
            cand.head.sig_bytes,
            dep.created if dep else None,
        )
        self.candidates[name] = Candidate(cand.manifest, cand.manifest_sha256, None)
        return machine.Event("ok", now=time.time())

    async def _candidate(self, name: str, slot: str) -> BundleManifest:
        """The candidate's manifest: from memory, or (after a restart) from the slot."""
        cand = self.candidates.get(name)
        if cand is None:
            data = await asyncio.to_thread(
                (self.repo.stores[name].dir(slot) / "bundle.json").read_bytes
            )
            man, _ = decode_manifest(data)
            dep = self.repo.records[name].deployment
            cand = Candidate(man, dep.manifest_sha256 if dep else "", None)
            self.candidates[name] = cand
        return cand.manifest

    async def precheck(self, name: str, slot: str) -> machine.Event:
        store = self.repo.stores[name]
        # The same full check as at start-up (signature under the current keyring, every
        # hash, nothing extra): the slot may have waited across a restart.
        v = await asyncio.to_thread(
            verify_slot,
            store.dir(slot),
            self.repo.keyring,
            model=name,
            shipped_dir=self.repo.shipped[name],
            device_key=self.repo.device_key,
        )
        if not v.ok:
            return machine.Event(
                "fail",
                reason=v.reason or "slot_corrupt",
                message=f"before the precheck: {v.message}",
                now=time.time(),
            )
        io_signature, health = await self._gate_spec(name, slot)
        rec = self.repo.records[name]
        baseline = store.dir(rec.active) if rec.active and rec.active != slot else None
        res = await run_precheck(
            store.dir(slot),
            baseline,
            io_signature,
            health,
            timeout_s=self.cfg.precheck_timeout_s,
            cpu_s=self.cfg.precheck_cpu_s or self.cfg.precheck_timeout_s,
            runs=self.cfg.precheck_runs,
            calibration=rec.deployment is not None and rec.deployment.kind == "calibration",
        )
        self.last_precheck[name] = {"ok": res.ok, "reason": res.reason, "figures": res.figures}
        if not res.ok:
            return machine.Event("fail", reason=res.reason, message=res.message, now=time.time())
        return machine.Event("ok", now=time.time())

    def _sample(self, name: str) -> probation.Sample:
        return probation.Sample(
            model=self.models.counters(name) if self.models is not None else probation.NO_MODEL,
            loops=self.loops.counters() if self.loops is not None else probation.NO_LOOPS,
        )

    async def _measure_baseline(self, name: str) -> None:
        """The previous model's loop miss rate just before the swap, over a window as
        long as the probation (at most baseline_max_s): what the probation compares the
        new model's missed ticks with (probation.Baseline)."""
        self.baselines.pop(name, None)
        dep = self.repo.records[name].deployment
        window = min(dep.probation_s if dep else 0.0, self.cfg.probation.baseline_max_s)
        if self.loops is None or window <= 0:
            return
        start = self._sample(name)
        await asyncio.sleep(window)
        b = probation.baseline_of(start, self._sample(name))
        self.baselines[name] = b
        log.info(
            "update_probation_baseline", model=name, ticks=b.ticks, missed=b.missed,
            inferences=b.inferences, input_faults=b.input_faults,
        )  # fmt: skip

    async def _watch(self, name: str) -> machine.Event:
        dep = self.repo.records[name].deployment
        assert dep is not None
        policy = self.cfg.probation
        _, health = await self._gate_spec(name, dep.target)
        calibration = dep.kind == "calibration"
        baseline = self.baselines.pop(name, None)
        start = self._sample(name)
        started = time.monotonic()
        while True:
            if name in self.aborts:
                reason, message = self.aborts.pop(name)
                return machine.Event("rollback", reason=reason, message=message, now=time.time())
            elapsed = time.monotonic() - started
            now = self._sample(name)
            verdict = probation.judge(
                start,
                now,
                elapsed_s=elapsed,
                window_s=dep.probation_s,
                health=health,
                policy=policy,
                baseline=baseline,
            )
            if calibration and verdict.kind != "fail":
                verdict = calprobation.combine(
                    verdict,
                    calprobation.judge(start, now, elapsed_s=elapsed, window_s=dep.probation_s),
                )
            if verdict.kind == "fail":
                return machine.Event(
                    "fail", reason=verdict.reason, message=verdict.message, now=time.time()
                )
            if verdict.kind == "pass":
                return machine.Event("ok", now=time.time())
            left = max(0.0, dep.probation_s - elapsed)
            poll_s = policy.poll_interval_ms / 1000.0
            # (a calibration's window may run on past its length while data is missing)
            await asyncio.sleep(min(poll_s, left + 0.001) if left > 0 else poll_s)

    async def ratchet(self, name: str) -> None:
        rec = self.repo.records[name]
        info = rec.slots.get(rec.active) if rec.active else None
        if info is None:
            return
        self.counter_value = await self.counter.ratchet(info.security_counter)
        fsutil.abort_point("COMMITTED.ratcheted")


def _message(exc: TrustError) -> str:
    """The human half of a TrustError ("code: message")."""
    return str(exc).split(": ", 1)[-1]
