"""Model targets of the desired state: fetch, hand to the update pipeline, report
(orchestration around targets.py and fetch.py; docs/twin.md §5.1).

The applier hands every authenticated desired document here (`offer`), before and
independently of its config fragment, and also the applied document again when the
broker re-delivers it after a restart, so targets resume. A document with a version not
above the last one offered is ignored (the retained copy again). A new version replaces
the target set: the worker of the previous one is cancelled (a fetch in progress stops,
its partial file kept for a resume; a job already in the pipeline finishes there, watched
by a task of its own so its outcome is still remembered; every target first waits until
its model has no update in flight, then decides).

One worker task takes the targets in order. For each: `targets.decide` against the active
version and the remembered outcome of the bundle; then `fetch.BundleFetcher` pulls the
file; its model name (read from the manifest, unauthenticated, as the job runner does)
must be the target's, else `wrong_model`; then the file goes to the updates component's
job queue (`Installer.submit`, the same path as the socket, the inbox and `cmd/update`,
so the publisher signature, the counter, the precheck, trial and probation all apply),
and the model's record is watched to report `verifying`, `trial`, `probation`, and the
end: `committed`, `refused` (the pipeline's reason) or `rolled_back`.

Every end is remembered by sha256 (targets.Memory) in `<state_dir>/twin/model-targets.json`
(written off the loop, fsync + rename) before it is reported, so a restart never fetches a
bundle already judged. `report()` is the reported state's `desired.models`.

Each offered version also sets the pins (twin/pins.py: the updates pipeline refuses a local
update of a pinned model to another version unless overridden); the overrides are kept in
the same file, and `report()` shows a target whose model runs an override as `overridden`
and every target's `active_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from edgerund.errors import TrustError
from edgerund.twin import targets as T
from edgerund.twin.fetch import BundleFetcher, ClientFactory
from edgerund.twin.pins import OVERRIDDEN, Override, Pins
from edgerund.updates import fsutil
from edgerund.updates.bundle import peek_model_name
from edgerund.updates.jobs import Job, JobTicket
from edgerund.updates.transfer import TransferError

if TYPE_CHECKING:
    from edgerund.config.schema import Config
    from edgerund.context import TaskScope
    from edgerund.twin.desired import Desired

log = structlog.get_logger("edgerund.twin.models")

POLL_S = 0.5
_RUNNING = {
    "RECEIVED": T.VERIFYING,
    "VERIFIED": T.VERIFYING,
    "STAGED": T.VERIFYING,
    "PRECHECKED": T.VERIFYING,
    "TRIAL": T.TRIAL,
    "PROBATION": T.PROBATION,
}
_IN_FLIGHT = frozenset(_RUNNING)


class Installer(Protocol):
    """What the twin needs of the updates component."""

    @property
    def records(self) -> Mapping[str, object]: ...

    def slot_info(self, name: str) -> dict[str, Any]: ...

    async def submit(self, job: Job) -> JobTicket: ...

    async def wait_idle(self, timeout_s: float = 60.0) -> None: ...


def memory_path(cfg: Config) -> Path:
    return Path(cfg.paths.state_dir) / "twin" / "model-targets.json"


def _load_memory(path: Path) -> tuple[T.Memory, list[Override]]:
    """The remembered outcomes and the recorded overrides (twin/pins.py)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return T.Memory(), []
    except (OSError, ValueError) as exc:
        log.warning("twin_model_memory_unreadable", path=str(path), error=str(exc))
        return T.Memory(), []
    raw = data.get("overrides") if isinstance(data, dict) else None
    overrides = [Override.from_json(o) for o in raw] if isinstance(raw, list) else []
    return T.Memory.from_json(data), [o for o in overrides if o is not None]


class ModelTargets:
    def __init__(
        self,
        cfg: Config,
        *,
        installer: Installer | None,
        managed: Callable[[], Mapping[str, object]],
        scope: TaskScope,
        notify: Callable[[], None],
        client: ClientFactory,
        pins: Pins | None = None,
    ) -> None:
        self.cfg = cfg
        self._installer = installer
        self._managed = managed
        self._scope = scope
        self._notify = notify
        u = cfg.updates
        self.max_bytes = int(u.bundle_max_mb * 1024 * 1024)
        self.manifest_max = u.manifest_max_kb * 1024
        self.fetcher = BundleFetcher(
            Path(cfg.paths.state_dir) / "twin" / "bundles",
            max_bytes=self.max_bytes,
            chunk_max=u.mqtt_chunk_max_kb * 1024,
            ttl_s=u.mqtt_transfer_ttl_s,
            client=client,
            tls=cfg.twin.fetch,
        )
        self.path = memory_path(cfg)
        self.memory = T.Memory()
        self.entries: dict[str, dict[str, Any]] = {}
        self.offered_version = 0
        self._task: asyncio.Task[None] | None = None
        self.pins = pins if pins is not None else Pins()
        self.pins.changed = self._pins_changed
        self._save_lock = asyncio.Lock()

    async def load(self) -> None:
        self.memory, overrides = await asyncio.to_thread(_load_memory, self.path)
        self.pins.restore(overrides)

    async def _save(self) -> None:
        # One write at a time, each of the state when it starts: the last one holds all.
        async with self._save_lock:
            try:
                await asyncio.to_thread(_write, self.path, _dump(self.memory, self.pins))
            except OSError as exc:
                log.error("twin_model_memory_write_failed", path=str(self.path), error=str(exc))

    def _pins_changed(self) -> None:
        """An override was recorded: persisted (off the loop) and published soon."""
        self._scope.spawn("models-override", self._save, restart=False)
        self._notify()

    def active_overrides(self) -> dict[str, Override]:
        """The models that run a version installed over their target (`twin_override`)."""
        if self._installer is None:
            return {}
        out = {}
        for name in list(self.pins.overrides):
            o = self.pins.active_override(name, self._installer.slot_info(name).get("version"))
            if o is not None:
                out[name] = o
        return out

    # -- the applier's side ---------------------------------------------------------------
    def offer(self, doc: Desired) -> None:
        """An authenticated desired document (never blocks; the work is the worker's)."""
        if doc.version <= self.offered_version:
            return
        self.offered_version = doc.version
        managed = self._managed() if self._installer is not None else {}
        targets, refused = T.parse_targets(doc.models, managed=managed, max_bytes=self.max_bytes)
        self.pins.set(doc.version, {n: t.version for n, t in targets.items()})
        if not doc.models and not self.entries:
            return
        self.entries = {}
        for name, (reason, message) in refused.items():
            if self._installer is None:
                reason, message = "unsupported", "updates are not enabled on this gateway"
            spec = doc.models.get(name)
            self.entries[name] = {
                "version": spec.get("version") if isinstance(spec, dict) else None,
                "sha256": spec.get("sha256") if isinstance(spec, dict) else None,
                "desired_version": doc.version,
                "state": T.REFUSED,
                "reason": reason,
                "message": message,
                "bytes": 0,
                "size": None,
            }
            log.warning("twin_model_target_refused", model=name, reason=reason, message=message)
        for t in targets.values():
            self.entries[t.name] = self._entry(t, doc.version, T.FETCHING)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if targets:
            self._task = self._scope.spawn(
                f"models-v{doc.version}",
                lambda: self._work(doc.version, list(targets.values())),
                restart=False,
            )
        self._notify()

    def report(self) -> dict[str, dict[str, Any]]:
        """The reported `desired.models`: each target's entry, with the version the model
        runs now (`active_version`); a target overridden locally is `overridden`."""
        out = {}
        for name, entry in self.entries.items():
            e = dict(entry)
            if self._installer is not None:
                active = self._installer.slot_info(name).get("version")
                e["active_version"] = active
                # Shown on the entry of the desired version it was made under; a newer
                # version naming the model re-applies its target (fetching...).
                o = self.pins.active_override(name, active)
                if o is not None and e.get("desired_version") == o.desired_version:
                    e.update(
                        state=OVERRIDDEN,
                        reason="twin_override",
                        message=f"version {o.version} installed locally over the target"
                        f" ({o.source}, --override-twin)",
                        override={"version": o.version, "source": o.source, "at": o.at},
                    )
            out[name] = e
        return out

    # -- the worker -------------------------------------------------------------------------
    @staticmethod
    def _entry(t: T.Target, dv: int, state: str) -> dict[str, Any]:
        return {
            "version": t.version,
            "sha256": t.sha256,
            "desired_version": dv,
            "state": state,
            "reason": None,
            "message": None,
            "bytes": 0,
            "size": t.size,
        }

    def _set(self, name: str, dv: int, **kw: Any) -> None:
        """Update the reported entry of `name`, if it still belongs to desired version `dv`
        (a job of an abandoned version finishes without touching the newer entry)."""
        entry = self.entries.get(name)
        if entry is None or entry.get("desired_version") != dv:
            return
        changed = any(entry.get(k) != v for k, v in kw.items() if k != "bytes")
        entry.update(kw)
        if changed:
            log.info("twin_model_target", model=name, **{k: v for k, v in entry.items()})
            self._notify()

    async def _work(self, dv: int, targets: list[T.Target]) -> None:
        keep = frozenset(t.sha256 for t in targets)
        for t in targets:
            try:
                await self._one(dv, t, keep)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the daemon: report it
                log.exception("twin_model_target_failed", model=t.name)
                await self._end(dv, t, T.FAILED, "internal_error", repr(exc)[:300])

    async def _end(self, dv: int, t: T.Target, state: str, reason: str | None, msg: str) -> None:
        outcome = T.Outcome(
            t.name, t.version, t.sha256, state, reason, msg or None, dv, time.time()
        )
        self.memory.put(outcome)
        await self._save()
        self._set(t.name, dv, state=state, reason=reason, message=msg or None)

    async def _idle(self, name: str) -> None:
        """Until `name` has no update in flight (an earlier job, perhaps of an abandoned
        desired version, may be in its trial or probation)."""
        assert self._installer is not None
        while self._installer.slot_info(name).get("state") in _IN_FLIGHT:
            with contextlib.suppress(TimeoutError):
                await self._installer.wait_idle(3600.0)

    async def _one(self, dv: int, t: T.Target, keep: frozenset[str]) -> None:
        assert self._installer is not None
        inst = self._installer
        await self._idle(t.name)
        decision = T.decide(
            t,
            active_version=inst.slot_info(t.name).get("version"),
            remembered=self.memory.get(t.sha256),
            desired_version=dv,
        )
        if decision == "committed":
            self._set(t.name, dv, state=T.COMMITTED, bytes=t.size, message="already active")
            return
        if decision == "remembered":
            o = self.memory.get(t.sha256)
            assert o is not None
            self._set(t.name, dv, state=o.state, reason=o.reason, message=o.message)
            log.info("twin_model_target_remembered", model=t.name, sha256=t.sha256, state=o.state)
            return
        self._set(t.name, dv, state=T.FETCHING)
        try:
            progress = lambda n: self._set(t.name, dv, bytes=n)  # noqa: E731
            if t.url is None:
                path = await self.fetcher.fetch(t, progress=progress, keep=keep)
            else:
                # Each failed attempt is in the reported message (a TLS misconfiguration
                # shows upstream, not only in the gateway's log); the state stays fetching.
                path = await self.fetcher.fetch_url(
                    t, progress=progress, keep=keep,
                    failed=lambda e: self._set(t.name, dv, message=f"url: {e}; retrying"),
                )  # fmt: skip
        except (TransferError, TrustError) as exc:
            await self._end(dv, t, T.REFUSED, exc.code, _msg(exc))
            return
        except OSError as exc:
            await self._end(dv, t, T.REFUSED, "io_error", str(exc))
            return
        submitted = False
        try:
            self._set(t.name, dv, state=T.VERIFYING, bytes=t.size, message=None)
            try:
                name = await asyncio.to_thread(peek_model_name, path, self.manifest_max)
            except TrustError as exc:
                await self._end(dv, t, T.REFUSED, exc.code, _msg(exc))
                return
            if name != t.name:
                await self._end(
                    dv, t, T.REFUSED, "wrong_model",
                    f"the bundle is for model {name!r}, the target for {t.name!r}",
                )  # fmt: skip
                return
            await self._idle(t.name)  # a local update (socket, inbox) may have started
            # Admitted: a target costs an operator signature, not a source's rate token.
            ticket = await inst.submit(
                Job(path, f"twin:{t.name}", remove_after=True, admitted=True)
            )
            submitted = True
        finally:
            if not submitted:
                path.unlink(missing_ok=True)
        # The job's end is recorded even when a newer desired version cancels this worker
        # meanwhile: the watch is a task of its own (in the component's scope), shielded.
        watch = self._scope.spawn(
            f"models-v{dv}-{t.name}", lambda: self._finish(dv, t, ticket), restart=False
        )
        await asyncio.shield(watch)

    async def _finish(self, dv: int, t: T.Target, ticket: JobTicket) -> None:
        assert self._installer is not None
        try:
            while not ticket.done.is_set():
                state = self._installer.slot_info(t.name).get("state")
                if ticket.model == t.name and state in _RUNNING:
                    self._set(t.name, dv, state=_RUNNING[str(state)])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await ticket.done.wait()
            info = self._installer.slot_info(t.name)
            err = ticket.error
            if err is None:
                got = info.get("version")
                note = "" if got == t.version else f"the bundle installed version {got}"
                await self._end(dv, t, T.COMMITTED, "version_mismatch" if note else None, note)
                return
            lf = info.get("last_failure") or {}
            rolled = info.get("state") == "ROLLED_BACK" and lf.get("reason") == err.code
            await self._end(dv, t, T.ROLLED_BACK if rolled else T.REFUSED, err.code, _msg(err))
        except Exception as exc:  # restart=False: an escape would stop the daemon
            log.exception("twin_model_target_failed", model=t.name)
            await self._end(dv, t, T.FAILED, "internal_error", repr(exc)[:300])


def _msg(exc: Exception) -> str:
    return str(exc).split(": ", 1)[-1]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fsutil.atomic_write(path, data, mode=0o600)


def _dump(mem: T.Memory, pins: Pins) -> bytes:
    doc = {**mem.to_json(), "overrides": [o.to_json() for o in pins.overrides.values()]}
    return json.dumps(doc, separators=(",", ":")).encode()
