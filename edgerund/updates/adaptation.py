"""Device calibrations through the update gate: the `adapt` command, the cooldown and
automatic adaptation (`auto_adapt`).

Theory of operation
-------------------
`adapt {model, dry_run?, force?, wait?}` (and the auto-adapt task) does, for a model that
runs from its active slot with no update in flight:

1. cooldown: the signed policy's `cooldown_s` since the last adaptation *attempt* of this
   model (installed, rolled back or rejected: an attempt that failed is no reason to try
   again at once) must have passed, else the answer is the error `cooldown` with the
   seconds left. `force: true` (`edgerunctl adapt MODEL --force`) skips this one check
   for a technician on site; it is logged and the attempt starts a new cooldown. Nothing
   else is skipped: policy, must-detect, signatures, precheck and probation all apply.
   The last attempt and the last N are kept in `models/NAME/adapt.json` (atomic write),
   so a restart does not reset the cooldown nor reuse a `cal.N`.
2. fit: `ports.Calibrator.fit_calibration` (the models component: a worker thread at
   nice +10, relative to the signed model, checked against the policy and the must-detect
   vectors); a refusal is the error answer with its reason (`too_few_samples`,
   `shift_out_of_bounds`, `must_detect_lost`, ...) and starts no cooldown. `dry_run`
   stops here and answers what would change.
3. the overlay (calibration.make_overlay, version `X+cal.N`, N one more than any before
   on this device) is signed by the device identity key (`ports.Signer`: TPM or
   software ECDSA P-256) and handed to the job runner as a calibration job: VERIFY
   (overlay trust decision), STAGE, PRECHECK, TRIAL, PROBATION, COMMIT or ROLLED_BACK /
   REJECTED with a reason (steps.py), like a bundle; it survives a power cut the same way.

Automatic adaptation (`models[].auto_adapt: true`), checked once a second: the drift
monitor of the running runner says `drift` (a broad feature shift that persisted through
its anomaly window; not `anomaly`, a trip the drift does not explain, nor
`sensor_fault`), has said so for `auto_adapt_after_s`, and the plant is judged healthy:
no new sensor-fault block and no control loop running on its fallback rules (a model
fault, a stale input) over that time. Then an adaptation starts as if a technician had
asked (without force: the cooldown applies). A fit refused for `too_few_samples` is
retried after RETRY_S; one refused by the policy or the must-detect guard once half the
fitting window (the drift task's last 64 blocks) is new data, 32 monitor blocks later,
then 64, 128, ... up to 2,048 while the refusals go on (a refused fit is not an
adaptation and starts no cooldown); within a cooldown the check repeats every minute.

`test-adapt {model, shift_sd?, wait?}` (registered only when EDGERUND_TEST_HOOKS=1 is in
the daemon's environment, like the root's other test hooks) installs a calibration that
is not fitted (edgerund.inference.adapt.forced_calibration: every vibration band shifted
by `shift_sd`, default -3: deliberately bad) through the same gate, forced past the
cooldown, so tests can watch the gate roll it back (or, with 0, cut the power while
a harmless one installs).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edgerund.component import Command, Peer
from edgerund.config.schema import Config
from edgerund.errors import CommandError
from edgerund.inference.adapt import BAD_SHIFT_SD, FittedCalibration
from edgerund.inference.calibration import CalibrationRefused, make_overlay, overlay_digest
from edgerund.inference.overlay import overlay_bytes, overlay_seq
from edgerund.ports import Calibrator, EventSink, LoopStats, ModelCounters, ModelHost, Signer
from edgerund.updates import fsutil, machine
from edgerund.updates.jobs import Job, JobRunner, JobTicket
from edgerund.updates.steps import CalibrationOffer, Steps

log = structlog.get_logger("edgerund.updates.adapt")

STATE_FILE = "adapt.json"
RETRY_S = 3.0  # a fit short of data (too_few_samples) or an update in flight
FIT_WINDOW_BLOCKS = 64  # the drift task keeps this many labelled blocks to fit on
MAX_BACKOFF_DOUBLINGS = 6  # a refused fit waits 32, 64, ... 2048 monitor blocks
COOLDOWN_RECHECK_S = 60.0
CHECK_INTERVAL_S = 1.0


@dataclass
class AutoAdaptState:
    """What the auto-adapt task remembers of one model between checks."""

    drift_seen: float | None = None  # monotonic time drift was first seen (this run)
    fault_blocks: int = 0
    fallback_ticks: int = 0
    not_before: float = 0.0  # monotonic: a fit short of data waits until then
    runner: object = None  # the runner the block counts below belong to
    retry_at_blocks: int = 0  # a refused fit waits until the monitor has this many blocks
    refusals: int = 0  # consecutive policy / must-detect refusals

    def due(
        self, c: ModelCounters, runner: object, fallback_ticks: int, now: float, after_s: float
    ) -> bool:
        """Whether an automatic adaptation is due now (pure: the module docstring's rule
        on the monitor's counters of `runner` and the loops' fallback ticks)."""
        if runner is not self.runner:  # a swap: the monitor's block counts start again
            self.runner, self.retry_at_blocks, self.refusals = runner, 0, 0
        healthy = (
            c.drift_state == "drift"
            and c.drift_fault_blocks == self.fault_blocks
            and fallback_ticks == self.fallback_ticks
        )
        self.fault_blocks, self.fallback_ticks = c.drift_fault_blocks, fallback_ticks
        if not healthy:
            self.drift_seen = None
            return False
        if self.drift_seen is None:
            self.drift_seen = now
        return (
            now - self.drift_seen >= after_s
            and now >= self.not_before
            and c.drift_blocks >= self.retry_at_blocks
        )


class Adaptations:
    def __init__(
        self,
        cfg: Config,
        *,
        steps: Steps,
        runner: JobRunner,
        models: ModelHost | None,
        calibrator: Calibrator | None,
        signer: Signer | None,
        loops: LoopStats | None,
        events: EventSink,
    ) -> None:
        self.steps = steps
        self.jobs = runner
        self.models = models
        self.calibrator = calibrator
        self.signer = signer
        self.loops = loops
        self.events = events
        self.auto = {m.name: m for m in cfg.models if m.auto_adapt}
        self._auto: dict[str, AutoAdaptState] = {n: AutoAdaptState() for n in self.auto}
        self._busy: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}  # model -> the last attempt, for status

    # -- state --------------------------------------------------------------------------
    def _state_path(self, name: str) -> Path:
        # Unsigned: a rate limit, not a trust anchor (every overlay is verified on its
        # own). Removing it resets the cooldown, never lets an unverified overlay run.
        return self.steps.repo.stores[name].root / STATE_FILE

    def _read_state(self, name: str) -> dict[str, Any]:
        try:
            doc = json.loads(self._state_path(name).read_bytes())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _write_state(self, name: str, doc: dict[str, Any]) -> None:
        path = self._state_path(name)
        fsutil.make_dirs(path.parent)
        fsutil.atomic_write(path, json.dumps(doc, sort_keys=True).encode())

    def _next_seq(self, name: str, state: dict[str, Any]) -> int:
        seq = state.get("seq", 0)
        seqs = [seq if isinstance(seq, int) else 0]
        for info in self.steps.repo.records[name].slots.values():
            parsed = overlay_seq(info.version) if info is not None else None
            if parsed is not None:
                seqs.append(parsed[1])
        return max(seqs) + 1

    def cooldown_left(self, name: str, fitted_policy_s: float, now: float) -> float:
        last = self._read_state(name).get("last_at")
        if not isinstance(last, int | float):
            return 0.0
        return max(0.0, float(last) + fitted_policy_s - now)

    # -- the command --------------------------------------------------------------------
    def table(self) -> Mapping[str, Command]:
        cmds = {
            "adapt": Command(
                self._cmd_adapt,
                help="fit a device calibration of a model and install it through the gate:"
                " {model, dry_run?, force?, wait?}",
            )
        }
        if os.environ.get("EDGERUND_TEST_HOOKS") == "1":
            # Test-only (never a config key): a bad calibration through the real gate.
            cmds["test-adapt"] = Command(self._cmd_test_adapt, mutating=True)
        return cmds

    async def _cmd_adapt(self, args: dict[str, Any], peer: Peer) -> Any:
        name = args.get("model")
        if not isinstance(name, str) or name not in self.steps.repo.records:
            raise CommandError(
                "unknown_model",
                f"model: expected one of {sorted(self.steps.repo.records)}, got {name!r}",
            )
        wait = args.get("wait", "trial")
        if wait not in ("none", "trial", "commit"):
            raise CommandError("bad_args", f"wait: expected none|trial|commit, got {wait!r}")
        if args.get("dry_run"):
            return await self.dry_run(name)
        if not peer.privileged:
            raise CommandError(
                "permission_denied",
                "installing a calibration changes the gateway; run it as root or as a member"
                f" of the edgerund group (you are uid {peer.uid}); --dry-run needs no privilege",
            )
        ticket = await self.start(name, source=f"adapt:{peer.uid}", force=bool(args.get("force")))
        return await self._answer(ticket, wait)

    async def _cmd_test_adapt(self, args: dict[str, Any], peer: Peer) -> Any:
        name = args.get("model")
        if not isinstance(name, str) or name not in self.steps.repo.records:
            raise CommandError("unknown_model", f"got {name!r}")
        shift = float(args.get("shift_sd", BAD_SHIFT_SD))
        ticket = await self.start(name, source="test-adapt", force=True, forced_shift_sd=shift)
        return await self._answer(ticket, str(args.get("wait", "commit")))

    async def _answer(self, ticket: JobTicket, wait: str) -> Any:
        if wait == "trial":
            await asyncio.wait(
                [
                    asyncio.ensure_future(ticket.trial_reached.wait()),
                    asyncio.ensure_future(ticket.done.wait()),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        elif wait == "commit":
            await ticket.done.wait()
        if ticket.error is not None:
            raise CommandError(ticket.error.code, str(ticket.error).split(": ", 1)[-1])
        if ticket.result is not None:
            return ticket.result
        assert ticket.model is not None
        return machine.summary(self.steps.repo.records[ticket.model])

    async def dry_run(self, name: str) -> dict[str, Any]:
        fitted = await self._fit(name, None, dry_run=True)
        if isinstance(fitted, dict):
            return fitted
        state = await asyncio.to_thread(self._read_state, name)
        return {
            "ok": True,
            "would_be": f"{fitted.base_version}+cal.{self._next_seq(name, state)}",
            "threshold_before": self._threshold_now(name),
            **fitted.report(),
        }

    def _threshold_now(self, name: str) -> float | None:
        r = self.models.runner(name) if self.models is not None else None
        return None if r is None else float(r.threshold)

    async def _fit(
        self, name: str, forced_shift_sd: float | None, *, dry_run: bool
    ) -> FittedCalibration | dict[str, Any]:
        if self.calibrator is None:
            raise CommandError("not_available", "no models are running")
        try:
            return await self.calibrator.fit_calibration(name, forced_shift_sd=forced_shift_sd)
        except CalibrationRefused as exc:
            if dry_run:
                return {"ok": False, "refused": exc.reason, "message": exc.detail}
            raise CommandError(exc.reason, exc.detail) from None

    # -- one adaptation -----------------------------------------------------------------
    async def start(
        self, name: str, *, source: str, force: bool, forced_shift_sd: float | None = None
    ) -> JobTicket:
        """Fit, sign and submit (module docstring); CommandError when it may not."""
        if self.signer is None or self.models is None:
            raise CommandError("not_available", "no device identity or no models to calibrate")
        if name in self._busy:
            raise CommandError("busy", f"{name}: an adaptation is being fitted")
        rec = self.steps.repo.records[name]
        if rec.state in machine.IN_FLIGHT:
            raise CommandError("busy", f"{name} has an update in {rec.state}")
        runner = self.models.runner(name)
        store = self.steps.repo.stores[name]
        if runner is None or rec.active is None:
            raise CommandError("not_available", f"{name} is not running from a slot")
        same = await asyncio.to_thread(
            lambda: runner.model_dir.resolve() == store.dir(rec.active or "a").resolve()
        )
        if not same:
            raise CommandError(
                "not_from_slot",
                f"{name} runs from {runner.model_dir}, not its active slot: nothing to calibrate",
            )
        policy = runner.base_manifest.adaptation
        if policy is None:
            raise CommandError("no_policy", f"{name}: the signed manifest allows no adaptation")
        now = time.time()
        left = await asyncio.to_thread(self.cooldown_left, name, policy.cooldown_s, now)
        if left > 0 and not force:
            raise CommandError(
                "cooldown",
                f"{name}: {left:.0f} s left of the signed cooldown_s {policy.cooldown_s:g}"
                " since the last adaptation (a technician may pass --force)",
            )
        if left > 0:
            log.warning("adapt_forced", model=name, cooldown_left_s=round(left), source=source)
        self._busy.add(name)
        try:
            fitted = await self._fit(name, forced_shift_sd, dry_run=False)
            assert isinstance(fitted, FittedCalibration)
            state = await asyncio.to_thread(self._read_state, name)
            seq = self._next_seq(name, state)
            doc = make_overlay(
                fitted.calibration,
                model=name,
                base_version=fitted.base_version,
                seq=seq,
                manifest_sha256=fitted.manifest_sha256,
                policy=fitted.policy,
                device_key_id=self.signer.key_id,
                created=round(now, 3),
            )
            signature = await self.signer.sign_digest(overlay_digest(doc))
            # The attempt counts from here (cooldown, N): durable before the gate starts.
            await asyncio.to_thread(
                self._write_state,
                name,
                {"seq": seq, "last_at": now, "last_version": doc["version"], "source": source},
            )
        finally:
            self._busy.discard(name)
        offer = CalibrationOffer(
            model=name,
            version=str(doc["version"]),
            overlay=overlay_bytes(doc),
            signature=signature,
        )
        self.last[name] = {"version": offer.version, "source": source, "at": now}
        log.info(
            "adapt_started",
            model=name,
            version=offer.version,
            source=source,
            forced=force and left > 0,
            samples=fitted.calibration.samples,
            max_shift_sd=fitted.calibration.summary()["max_shift_sd"],
            threshold=fitted.calibration.threshold,
        )
        self.events.publish("adapt.started", name, version=offer.version, origin=source)
        return await self.jobs.submit(Job(path=store.root, source=source, offer=offer))

    # -- automatic adaptation -----------------------------------------------------------
    async def run(self) -> None:
        """The auto-adapt task (module docstring)."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            for name, mc in self.auto.items():
                try:
                    await self._auto_check(name, mc.auto_adapt_after_s)
                except Exception:
                    log.exception("adapt_auto_failed", model=name)

    async def _auto_check(self, name: str, after_s: float) -> None:
        st = self._auto[name]
        if self.models is None:
            return
        c = self.models.counters(name)
        fb = self.loops.counters().fallback_ticks if self.loops is not None else 0
        now = time.monotonic()
        if not st.due(c, self.models.runner(name), fb, now, after_s):
            return
        rec = self.steps.repo.records[name]
        if rec.state in machine.IN_FLIGHT or name in self._busy:
            return
        try:
            await self.start(name, source="auto", force=False)
        except CommandError as exc:
            retry: dict[str, float] = {}
            if exc.code in ("too_few_samples", "busy"):
                st.not_before = now + RETRY_S
                retry["retry_in_s"] = RETRY_S
            elif exc.code == "cooldown":
                st.not_before = now + COOLDOWN_RECHECK_S
                retry["retry_in_s"] = COOLDOWN_RECHECK_S
            else:
                # The policy or the must-detect guard said no on this data: try again
                # once half the fitting window is new data, then twice as long, ...
                st.refusals += 1
                wait = (FIT_WINDOW_BLOCKS // 2) << min(st.refusals - 1, MAX_BACKOFF_DOUBLINGS)
                st.retry_at_blocks = c.drift_blocks + wait
                retry["retry_in_blocks"] = wait
            log.info(
                "adapt_auto_not_now",
                model=name,
                reason=exc.code,
                message=str(exc).split(": ", 1)[-1],
                **retry,
            )
            return
        st.drift_seen = None
        st.refusals = 0
        st.not_before = now + RETRY_S
