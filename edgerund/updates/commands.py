"""The updates component's diagnostics-socket commands: `update`, `rollback`,
`models-slots` (argument checks, waiting, error mapping; the work is the runner's and the
steps').

- `update {path, wait?, override_twin?}`: submit a bundle or keyring file (absolute path)
  and wait until the new model is in probation (`wait: "trial"`, default: PROBATION is
  durable, the watch has just started), the job is done (`"commit"`) or not at all
  (`"none"`). A
  refusal or rollback is always an error answer with the reason code and message (so
  `edgerunctl update` exits 1), never a result. A model a twin model target pins to
  another version is refused with `pinned_by_twin` unless `override_twin: true`
  (`edgerunctl update --override-twin`), which the twin reports upstream (twin/pins.py).
- `rollback {model}`: during TRIAL/PROBATION the probation is told to roll back; otherwise
  the machine reverts to the other valid slot.
- `models-slots`: both slots of every model, versions, states, last failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgerund.component import Command, CommandError, Peer
from edgerund.updates import machine
from edgerund.updates.jobs import Job, JobRunner
from edgerund.updates.slotcheck import verify_slot
from edgerund.updates.steps import Steps


class UpdateCommands:
    def __init__(self, steps: Steps, runner: JobRunner) -> None:
        self.steps = steps
        self.runner = runner

    def table(self) -> Mapping[str, Command]:
        return {
            "update": Command(
                self.update,
                mutating=True,
                help="install a signed model bundle (or rotate the keyring):"
                " {path, wait?, override_twin?}",
            ),
            "rollback": Command(
                self.rollback,
                mutating=True,
                help="roll a model back to its other slot: {model}",
            ),
            "models-slots": Command(self.slots, help="both slots, versions, states, last failure"),
        }

    async def update(self, args: dict[str, Any], peer: Peer) -> Any:
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise CommandError("bad_args", "expected {'path': '/absolute/path/to/bundle'}")
        p = Path(path)
        if not p.is_absolute():
            raise CommandError(
                "bad_args", f"path must be absolute (the daemon's cwd is not yours), got {path!r}"
            )
        wait = args.get("wait", "trial")
        if wait not in ("none", "trial", "commit"):
            raise CommandError("bad_args", f"wait: expected none|trial|commit, got {wait!r}")
        override = args.get("override_twin", False)
        if not isinstance(override, bool):
            raise CommandError("bad_args", f"override_twin: expected true|false, got {override!r}")
        ticket = await self.runner.submit(Job(p, f"socket:{peer.uid}", override_twin=override))
        if wait == "none":
            return {"accepted": True, "path": path}
        if wait == "trial":
            await asyncio.wait(
                [
                    asyncio.ensure_future(ticket.trial_reached.wait()),
                    asyncio.ensure_future(ticket.done.wait()),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        else:
            await ticket.done.wait()
        if ticket.error is not None:
            raise CommandError(ticket.error.code, str(ticket.error).split(": ", 1)[-1])
        if ticket.result is None and ticket.model is not None:
            rec = self.steps.repo.records[ticket.model]
            lf = rec.last_failure
            if rec.state in (machine.State.REJECTED, machine.State.ROLLED_BACK) and lf:
                # Never an "ok" answer for an update that did not take (edgerunctl exits 1).
                raise CommandError(lf.reason, lf.message)
            return machine.summary(rec)
        return ticket.result

    async def rollback(self, args: dict[str, Any], peer: Peer) -> Any:
        records = self.steps.repo.records
        name = args.get("model")
        if not isinstance(name, str) or name not in records:
            raise CommandError(
                "unknown_model", f"model: expected one of {sorted(records)}, got {name!r}"
            )
        rec = records[name]
        if rec.state in (machine.State.TRIAL, machine.State.PROBATION):
            self.steps.aborts[name] = ("manual", f"rolled back by hand (uid {peer.uid})")
            async with asyncio.timeout(30):
                await self.steps.wait_until(lambda: records[name].state not in machine.IN_FLIGHT)
            return machine.summary(records[name])
        if rec.state in machine.IN_FLIGHT:
            raise CommandError("busy", f"{name} is in {rec.state}; nothing to roll back to yet")
        return await self.rollback_settled(name, "manual", f"rolled back by hand (uid {peer.uid})")

    async def rollback_settled(self, name: str, reason: str, message: str) -> Any:
        """Revert a model that is not in flight to its other slot, re-verified first (a
        manual rollback, or the post-update drift rollback). Raises CommandError."""
        records = self.steps.repo.records
        rec = records[name]
        if rec.state in machine.IN_FLIGHT:
            raise CommandError("busy", f"{name} is in {rec.state}; nothing to roll back to yet")
        if rec.active is None or rec.slots.get(machine.other(rec.active)) is None:
            raise CommandError(
                "no_previous", f"{name}: the other slot holds no valid model to roll back to"
            )
        # The target was verified at start-up; it may have been touched since.
        target = machine.other(rec.active)
        repo = self.steps.repo
        v = await asyncio.to_thread(
            verify_slot,
            repo.stores[name].dir(target),
            repo.keyring,
            model=name,
            shipped_dir=repo.shipped[name],
            device_key=repo.device_key,
        )
        if not v.ok:
            raise CommandError(
                v.reason or "slot_corrupt", f"{name}: not rolling back to it: {v.message}"
            )
        await self.steps.drive(
            name, machine.Event("rollback", reason=reason, message=message, now=time.time())
        )
        return machine.summary(records[name])

    async def slots(self, args: dict[str, Any], peer: Peer) -> Any:
        return [machine.summary(r) for r in self.steps.repo.records.values()]
