"""The job runner: one worker takes jobs one at a time and drives them through the steps.

Theory of operation
-------------------
A job is a typed record (`Job`: the file, where it came from, whether the file is ours
to delete) with a `JobTicket` the submitter waits on (trial reached, done, result or
error). The worker first runs the work start-up recovery left (rerun a precheck, retry a
trial, redo a counter ratchet), then takes jobs from the queue.

A job's file is opened ONCE (bundle.BundleReader) and read front to back. Its first bytes
tell a keyring document (JSON) from a bundle (tar). For a bundle the head (manifest.json,
manifest.sig) is read and manifest.json parsed once; its model name, not yet
authenticated, only picks the model's record (unknown model or an update already in
flight: refused here; so is a version other than the one a twin model target pins, unless
the job carries `override_twin`: `pins`, ports.ModelPins); the machine then gets "receive"
and VERIFY authenticates the same parsed manifest and extracts the payload from the same
open file (steps.py). A keyring document is checked as a rotation of the current keyring
and stored.

`progress()` is what `status` shows of the job in hand: a frozen `JobProgress` that the
runner replaces as the job moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from edgerund.errors import TrustError
from edgerund.ports import EventSink, ModelPins
from edgerund.updates import machine
from edgerund.updates.bundle import BundleReader
from edgerund.updates.manifest import parse_manifest_json
from edgerund.updates.ratelimit import SourceLimiter, source_of
from edgerund.updates.steps import CalibrationOffer, Received, Steps

log = structlog.get_logger("edgerund.updates")

KEYRING_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Job:
    path: Path
    source: str  # "socket:UID", "inbox:NAME", "mqtt:ID"
    remove_after: bool = False  # MQTT transfers: the completed file is ours to delete
    admitted: bool = False  # the source already took its rate-limit token
    offer: CalibrationOffer | None = None  # a device calibration (no file to read)
    # Install even when a twin model target pins the model to another version
    # (`edgerunctl update --override-twin`); reported upstream (twin/pins.py).
    override_twin: bool = False


class JobTicket:
    """What the submitter of a job waits on."""

    def __init__(self) -> None:
        self.trial_reached = asyncio.Event()
        self.done = asyncio.Event()
        self.model: str | None = None
        self.result: dict[str, Any] | None = None
        self.error: TrustError | None = None


@dataclass(frozen=True)
class JobProgress:
    """The job in hand, as `status` shows it."""

    source: str
    phase: str
    model: str | None = None
    path: str | None = None  # None: work left by start-up recovery
    bytes_done: int = 0
    bytes_total: int | None = None
    started: float = field(default_factory=time.time)

    def to_status(self) -> dict[str, Any]:
        if self.path is None:
            return {"model": self.model, "source": self.source, "phase": self.phase}
        return {
            "path": self.path,
            "source": self.source,
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "started": self.started,
            **({"model": self.model} if self.model is not None else {}),
        }


class Tracker:
    """Holds the current JobProgress; each change replaces the record."""

    def __init__(self, progress: JobProgress) -> None:
        self.progress = progress

    def update(self, **changes: Any) -> None:
        self.progress = replace(self.progress, **changes)


class JobRunner:
    def __init__(
        self,
        steps: Steps,
        *,
        events: EventSink,
        manifest_max: int,
        deferred: list[tuple[str, machine.Action]],
        limiter: SourceLimiter | None = None,
        pins: ModelPins | None = None,
    ) -> None:
        self.steps = steps
        self.limiter = limiter
        self.pins = pins
        self.events = events
        self.manifest_max = manifest_max
        self._deferred = list(deferred)
        self._queue: asyncio.Queue[tuple[Job, JobTicket]] = asyncio.Queue()
        self._tracker: Tracker | None = None
        self.rejections: deque[dict[str, Any]] = deque(maxlen=20)

    # -- API ----------------------------------------------------------------------------------
    async def submit(self, job: Job) -> JobTicket:
        """Queue a job; a source over its rate limit gets a ticket that is already done
        with `rate_limited` (the file is not opened)."""
        ticket = JobTicket()
        wait_s = (
            0.0
            if self.limiter is None or job.admitted or job.offer is not None
            else self.limiter.take(source_of(job.source))
        )
        if wait_s > 0:
            err = TrustError(
                "rate_limited",
                f"too many bundles from {source_of(job.source)}: try again in {wait_s:.0f} s",
            )
            self._reject(job, ticket, err)
            if job.remove_after:
                with contextlib.suppress(OSError):
                    os.unlink(job.path)
            ticket.trial_reached.set()
            ticket.done.set()
            return ticket
        await self._queue.put((job, ticket))
        return ticket

    def progress(self) -> dict[str, Any] | None:
        return None if self._tracker is None else self._tracker.progress.to_status()

    def idle(self) -> bool:
        return not (
            self._queue.qsize()
            or self._deferred
            or self._tracker is not None
            or any(r.state in machine.IN_FLIGHT for r in self.steps.repo.records.values())
        )

    # -- the worker -----------------------------------------------------------------------------
    async def run(self) -> None:
        while self._deferred:
            name, action = self._deferred[0]
            try:
                await self._resume(name, action)
            except Exception:
                log.exception("update_worker_error")
            finally:
                self._deferred.pop(0)
                self._tracker = None
                self.steps.touch()
        while True:
            job, ticket = await self._queue.get()
            try:
                await self._run_job(job, ticket)
            except Exception:
                log.exception("update_worker_error")
            finally:
                self._tracker = None
                self.steps.touch()

    async def _resume(self, name: str, action: machine.Action) -> None:
        self._tracker = Tracker(JobProgress(source="recovery", phase=str(action.kind), model=name))
        if action.kind is machine.ActionKind.RATCHET:
            await self.steps.ratchet(name)
        elif action.kind is machine.ActionKind.RESUME_TRIAL:
            await self.steps.drive(
                name, machine.Event("ok", now=time.time()), tracker=self._tracker
            )
        else:
            rec = self.steps.repo.records[name]
            ev = await self.steps.execute(name, rec, [action], tracker=self._tracker)
            if ev is not None:
                await self.steps.drive(name, ev, tracker=self._tracker)

    async def _run_calibration(self, job: Job, ticket: JobTicket) -> None:
        offer = job.offer
        assert offer is not None
        name = offer.model
        tracker = Tracker(JobProgress(source=job.source, phase="calibration", model=name))
        self._tracker = tracker
        ticket.model = name
        try:
            records = self.steps.repo.records
            if name not in records:
                raise TrustError("unknown_model", f"model: expected one of {sorted(records)}")
            if records[name].state in machine.IN_FLIGHT:
                raise TrustError("busy", f"{name} has an update in {records[name].state}")
            self.steps.offers[name] = offer
            dep = machine.Deployment(kind="calibration", source=job.source, received_at=time.time())
            rec = await self.steps.drive(
                name,
                machine.Event("receive", deployment=dep, now=time.time()),
                ticket=ticket,
                tracker=tracker,
            )
            lf = rec.last_failure
            if rec.state in (machine.State.REJECTED, machine.State.ROLLED_BACK) and lf:
                ticket.error = TrustError(lf.reason, lf.message)
            ticket.result = machine.summary(rec)
        except TrustError as err:
            self._reject(job, ticket, err)
        finally:
            self.steps.offers.pop(name, None)
            ticket.trial_reached.set()
            ticket.done.set()

    async def _run_job(self, job: Job, ticket: JobTicket) -> None:
        if job.offer is not None:
            await self._run_calibration(job, ticket)
            return
        tracker = Tracker(JobProgress(source=job.source, phase="reading", path=str(job.path)))
        self._tracker = tracker
        reader: BundleReader | None = None
        try:
            try:
                reader = await asyncio.to_thread(BundleReader, job.path)
                first = await asyncio.to_thread(reader.sniff, 64)
            except OSError as exc:
                raise TrustError("not_readable", f"{job.path}: {exc.strerror}") from None
            if first.lstrip().startswith(b"{"):
                await self._rotate_keyring(reader, ticket)
                return
            # No usable keyring or counter: refuse before a byte of the bundle is parsed.
            refusal = self.steps.refusal()
            if refusal is not None:
                raise refusal
            head = await asyncio.to_thread(reader.head, self.manifest_max)
            document = parse_manifest_json(head.manifest_bytes)
            name = document.get("model_name")
            if not isinstance(name, str):
                raise TrustError("manifest_malformed", "manifest.json has no model_name")
            records = self.steps.repo.records
            if name not in records:
                raise TrustError(
                    "unknown_model",
                    f"model_name: expected one of {sorted(records)}, got {name!r}",
                )
            ticket.model = name
            tracker.update(model=name)
            if records[name].state in machine.IN_FLIGHT:
                raise TrustError("busy", f"{name} has an update in {records[name].state}")
            if self.pins is not None and source_of(job.source) == "twin":
                # the target may have been fetched while a technician overrode it
                self.pins.check_target_job(name, machine.summary(records[name]).get("version"))
            elif self.pins is not None:
                # A twin model target pins the model (its own jobs are the target). The
                # version is not authenticated yet: a bundle that lies about it to pass
                # fails the signature check of the same manifest in VERIFY.
                version = document.get("version")
                self.pins.check_local_update(
                    name,
                    version if isinstance(version, str) else None,
                    source=job.source,
                    override=job.override_twin,
                )
            dep = machine.Deployment(source=job.source, received_at=time.time())
            rec = await self.steps.drive(
                name,
                machine.Event("receive", deployment=dep, now=time.time()),
                received=Received(reader, head, document),
                ticket=ticket,
                tracker=tracker,
            )
            if (
                rec.state in (machine.State.REJECTED, machine.State.ROLLED_BACK)
                and rec.last_failure is not None
            ):
                lf = rec.last_failure
                ticket.error = TrustError(lf.reason, lf.message)
                if rec.state is machine.State.REJECTED:
                    self.rejections.append(
                        {
                            "path": str(job.path),
                            "source": job.source,
                            "model": name,
                            "reason": lf.reason,
                            "message": lf.message,
                            "at": lf.at,
                        }
                    )
            ticket.result = machine.summary(rec)
        except TrustError as err:
            self._reject(job, ticket, err)
        finally:
            if reader is not None:
                reader.close()
            if job.remove_after:
                with contextlib.suppress(OSError):
                    os.unlink(job.path)
            ticket.trial_reached.set()
            ticket.done.set()

    async def _rotate_keyring(self, reader: BundleReader, ticket: JobTicket) -> None:
        repo = self.steps.repo
        old = repo.keyring_base
        data = await asyncio.to_thread(reader.read_all, KEYRING_MAX_BYTES)
        new = await asyncio.to_thread(repo.rotate_keyring, data)
        usable = repo.keyring is not None
        log.info("keyring_rotated", old_version=old.version, new_version=new.version, usable=usable)
        self.events.publish("keyring.rotated", "updates", version=new.version)
        ticket.result = {
            "keyring": {
                "version": new.version,
                "threshold": new.threshold,
                "keys": len(new.keys),
                "usable": usable,
            }
        }

    def _reject(self, job: Job, ticket: JobTicket, err: TrustError) -> None:
        ticket.error = err
        entry = {
            "path": str(job.path),
            "source": job.source,
            "model": ticket.model,
            "reason": err.code,
            "message": str(err).split(": ", 1)[-1],
            "at": time.time(),
        }
        self.rejections.append(entry)
        log.warning("update_rejected", **entry)
        self.events.publish(
            "update.result",
            ticket.model or "?",
            result="REJECTED",
            reason=err.code,
            message=entry["message"],
        )
