"""The "updates" component: orchestrates verify -> stage -> precheck -> trial -> probation ->
commit for model bundles, around the pure trust decision (trust.py) and the pure state
machine (machine.py).

Start-up (entered BEFORE "models"): load the keyring, then for every configured model read
its record (a corrupt state.json is moved aside and rebuilt from the slots), seed slot `a`
from the shipped model on first start, and apply the recovery table: `current` ends up on
the committed slot, which is re-hashed before it is trusted, so `model_dir(name)` hands the
models registry a verified directory. Work that needs running models (rerun a precheck,
retry a trial) is queued for the worker, which waits for the models registry.

At run time one worker task takes jobs (bundle paths from the socket, the inbox directory
or a completed MQTT transfer; keyring rotations) one at a time and drives the machine:
`_drive` feeds an event, gets (record, actions), executes the actions in order (the first
is always PERSIST: state.json is durable before any side effect) and turns their outcome
into the next event. Blocking work (tar reading, hashing, fsync, renames) runs in threads;
the precheck runs in a subprocess; the loop never waits on disk or onnxruntime.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from edgerund import __version__
from edgerund.component import Command, CommandError, Peer
from edgerund.context import Context
from edgerund.errors import ConfigError, TrustError
from edgerund.updates import bundle as bundle_io
from edgerund.updates import fsutil
from edgerund.updates import machine as m
from edgerund.updates.config import UpdatesConfig
from edgerund.updates.counter import FileCounter, IdentityCounter
from edgerund.updates.keyring import Keyring, check_rotation, check_self_signed, parse_keyring
from edgerund.updates.manifest import decode_manifest, parse_time
from edgerund.updates.precheck import run_precheck
from edgerund.updates.slots import SlotStore
from edgerund.updates.transfer import TransferError, TransferStore, parse_message
from edgerund.updates.trust import Device, Installed, Limits

log = structlog.get_logger("edgerund.updates")

MODELS_WAIT_S = 60.0


def runtime_max_opset() -> int:
    """The highest ONNX opset the installed onnxruntime runs (from its version)."""
    try:
        import onnxruntime as ort

        major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    except Exception:
        return 17
    table = [((1, 20), 21), ((1, 18), 20), ((1, 17), 20), ((1, 16), 19), ((1, 14), 18)]
    if (major, minor) >= (1, 22):
        return 22
    for ver, opset in table:
        if (major, minor) >= ver:
            return opset
    return 17


@dataclass
class Job:
    path: Path
    source: str
    remove_after: bool = False  # MQTT transfers: the completed file is ours to delete
    trial_reached: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    model: str | None = None
    result: dict[str, Any] | None = None
    error: TrustError | None = None


class UpdatesComponent:
    name = "updates"

    def __init__(self, ctx: Context, cfg: UpdatesConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        state_dir = ctx.state_dir
        self.upd_dir = state_dir / "updates"
        self.stores = {
            mc.name: SlotStore(state_dir / "models" / mc.name, mc.name) for mc in ctx.config.models
        }
        self.shipped = {mc.name: Path(mc.path) for mc in ctx.config.models}
        self.records: dict[str, m.Record] = {}
        self.keyring: Keyring | None = None
        self.counter: FileCounter | IdentityCounter | None = None
        self.limits = Limits(
            bundle_max_bytes=int(cfg.bundle_max_mb * 1024 * 1024),
            file_max_bytes=int(cfg.file_max_mb * 1024 * 1024),
            max_counter_jump=cfg.max_counter_jump,
            max_version_jump=cfg.max_version_jump,
        )
        self.device = Device(
            hardware_id=ctx.config.gateway.hardware_id,
            daemon_version=__version__,
            max_opset=runtime_max_opset(),
            models=tuple(self.stores),
        )
        self.transfers = TransferStore(
            self.upd_dir / "transfers",
            max_bytes=self.limits.bundle_max_bytes,
            chunk_max=cfg.mqtt_chunk_max_kb * 1024,
            ttl_s=cfg.mqtt_transfer_ttl_s,
            max_transfers=cfg.mqtt_max_transfers,
        )
        self._queue: asyncio.Queue[Job | tuple[str, m.Action]] = asyncio.Queue()
        self._job: dict[str, Any] | None = None  # progress of the job in hand
        self._abort: dict[str, tuple[str, str]] = {}  # model -> (reason, message): manual rollback
        self._rejections: deque[dict[str, Any]] = deque(maxlen=20)
        self._counter_value: int | None = None
        self._last_precheck: dict[str, dict[str, Any]] = {}
        self._mqtt_registered = False
        self._inbox_seen: set[tuple[str, int, int]] = set()
        self._last_rollback_ms: float | None = None
        self._rb_t0 = 0.0
        self._changed = asyncio.Event()
        self._staged_bytes: tuple[bytes, bytes, str] = (b"", b"", "")

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self.keyring = await asyncio.to_thread(self._load_keyring)
        ident = self.ctx.get("identity")
        if ident is not None and getattr(ident, "kind", None) == "tpm":
            self.counter = IdentityCounter(ident, max_steps=max(1000, self.cfg.max_counter_jump))
        else:
            self.counter = FileCounter(self._abs(self.cfg.counter_file))
        self._counter_value = await self.counter.read()
        for name in self.stores:
            await self._recover(name)
        sup = self.ctx.supervisor
        sup.spawn("updates.worker", self._worker, restart=True)
        if self.cfg.inbox_dir:
            sup.spawn("updates.inbox", self._inbox_loop, restart=True)
        if self.cfg.mqtt_enabled:
            sup.spawn("updates.mqtt-register", self._register_mqtt, restart=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Tasks are owned by the supervisor (cancelled by the daemon). An update cut short
        # here is finished or undone by the recovery table at the next start.
        return None

    def _abs(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.ctx.state_dir / path

    # -- keyring -----------------------------------------------------------------------
    def _load_keyring(self) -> Keyring:
        provisioned_path = self._abs(self.cfg.keyring_file)
        try:
            prov = parse_keyring(provisioned_path.read_bytes())
            check_self_signed(prov)
        except FileNotFoundError:
            raise ConfigError(
                f"keyring file {provisioned_path} does not exist (create one with `edgerund bundle keyring create`)",
                path="updates.keyring_file",
            ) from None
        except TrustError as exc:
            raise ConfigError(
                f"keyring file {provisioned_path}: {exc}", path="updates.keyring_file"
            ) from None
        stored_path = self.upd_dir / "keyring.json"
        try:
            stored = parse_keyring(stored_path.read_bytes())
        except FileNotFoundError:
            return prov
        except TrustError as exc:
            log.error("stored_keyring_unreadable", error=str(exc))
            return prov
        # A rotated keyring accepted at run time outranks an older provisioned one; a newer
        # provisioned one (installed by the administrator) outranks the stored one.
        return stored if stored.version > prov.version else prov

    def _rotate_keyring(self, data: bytes) -> Keyring:
        assert self.keyring is not None
        new = parse_keyring(data)
        check_rotation(self.keyring, new, time.time())
        fsutil.make_dirs(self.upd_dir)
        fsutil.atomic_write(self.upd_dir / "keyring.json", data)
        return new

    # -- start-up recovery -------------------------------------------------------------
    async def _recover(self, name: str) -> None:
        store = self.stores[name]
        rec, note = await asyncio.to_thread(store.load_record)
        if note:
            log.error(
                "update_state_corrupt", model=name, action="moved to state.json.broken, rebuilt"
            )
        if rec is None:
            cur = fsutil.read_link(store.current)
            if cur is not None:
                rec = await asyncio.to_thread(store.rebuild_record)
            else:
                rec = m.Record(model=name)
        if rec.active is None:
            rec = await self._seed(name, rec)
        new, acts = m.recover(rec, max_attempts=self.cfg.attempts, now=time.time())
        self.records[name] = new
        if new.state != rec.state:
            log.warning(
                "update_recovered",
                model=name,
                found=str(rec.state),
                now=str(new.state),
                table=m.RECOVERY[rec.state],
            )
        for a in acts:
            if a.kind in (m.A.PRECHECK, m.A.RESUME_TRIAL):
                self._queue.put_nowait((name, a))
            elif a.kind is m.A.RATCHET:
                await self._ratchet(name)
            else:
                await self._execute_one(name, a, recovering=True)
        # Trust `current` only if its slot verifies (re-hash).
        active = self.records[name].active
        if active is not None and not await asyncio.to_thread(
            store.verify_slot, active, quiet=True
        ):
            await self._active_corrupt(name, active)

    async def _seed(self, name: str, rec: m.Record) -> m.Record:
        src = self.shipped[name]
        store = self.stores[name]
        if not src.is_dir():
            log.warning("update_no_shipped_model", model=name, path=str(src))
            return rec
        info = await asyncio.to_thread(store.seed, src, "a")
        slots = dict(rec.slots)
        slots["a"] = info
        rec = m.Record(model=name, active="a", slots=slots, last_failure=rec.last_failure)
        await asyncio.to_thread(store.save_record, rec)
        log.info("update_seeded", model=name, version=info.version, source=str(src))
        return rec

    async def _active_corrupt(self, name: str, active: str) -> None:
        store = self.stores[name]
        rec = self.records[name]
        other = m.other(active)
        slots = dict(rec.slots)
        slots[active] = None
        fail = m.Failure(
            reason="slot_corrupt",
            message=f"slot {active} failed its re-hash at start-up",
            state=str(rec.state),
            at=time.time(),
        )
        if rec.slots.get(other) is not None and await asyncio.to_thread(
            store.verify_slot, other, quiet=True
        ):
            new = m.Record(
                model=name,
                active=other,
                slots=slots,
                last_failure=fail,
                last_result="ROLLED_BACK",
                state=m.S.ROLLED_BACK,
            )
        else:
            new = m.Record(model=name, slots={"a": None, "b": None}, last_failure=fail)
            await asyncio.to_thread(store.invalidate, active)
            new = await self._seed(name, new)
        await asyncio.to_thread(store.save_record, new)
        if new.active:
            await asyncio.to_thread(store.flip, new.active)
        await asyncio.to_thread(store.sync_slots, new)
        self.records[name] = new
        log.error("update_slot_corrupt", model=name, slot=active, now_active=new.active)

    # -- public API ---------------------------------------------------------------------
    def model_dir(self, name: str) -> Path | None:
        rec = self.records.get(name)
        if rec is None or rec.active is None:
            return None
        return self.stores[name].dir(rec.active)

    def slot_info(self, name: str) -> dict[str, Any]:
        rec = self.records.get(name)
        if rec is None:
            return {}
        return m.summary(rec)

    def status(self) -> dict[str, Any]:
        kr = self.keyring
        return {
            "updates": {
                "models": [m.summary(r) for r in self.records.values()],
                "job": self._job,
                "transfers": self.transfers.progress(),
                "recent_rejections": list(self._rejections)[-5:],
                "security_counter": self._counter_value,
                "counter_kind": getattr(self.counter, "kind", None),
                "keyring": None
                if kr is None
                else {
                    "version": kr.version,
                    "threshold": kr.threshold,
                    "keys": len(kr.keys),
                    "expires": kr.signed.get("expires"),
                },
                "last_precheck": self._last_precheck,
            }
        }

    def commands(self) -> Mapping[str, Command]:
        return {
            "update": Command(
                self._cmd_update,
                mutating=True,
                help="install a signed model bundle (or rotate the keyring): {path, wait?}",
            ),
            "rollback": Command(
                self._cmd_rollback,
                mutating=True,
                help="roll a model back to its other slot: {model}",
            ),
            "models-slots": Command(
                self._cmd_slots, help="both slots, versions, states, last failure"
            ),
        }

    async def submit(self, path: Path, source: str, *, remove_after: bool = False) -> Job:
        job = Job(path=path, source=source, remove_after=remove_after)
        await self._queue.put(job)
        return job

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until nothing is queued or in flight (tests, benchmark)."""
        async with asyncio.timeout(timeout_s):
            await self._wait_until(
                lambda: (
                    not (
                        self._queue.qsize()
                        or self._job
                        or any(r.state in m.IN_FLIGHT for r in self.records.values())
                    )
                )
            )

    async def _wait_until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            self._changed.clear()
            await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()

    # -- commands -----------------------------------------------------------------------
    async def _cmd_update(self, args: dict[str, Any], peer: Peer) -> Any:
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
        job = await self.submit(p, f"socket:{peer.uid}")
        if wait == "none":
            return {"accepted": True, "path": path}
        if wait == "trial":
            await asyncio.wait(
                [
                    asyncio.ensure_future(job.trial_reached.wait()),
                    asyncio.ensure_future(job.done.wait()),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        else:
            await job.done.wait()
        if job.error is not None:
            raise CommandError(job.error.code, str(job.error).split(": ", 1)[-1])
        if job.result is None and job.model is not None:
            return self.slot_info(job.model)
        return job.result

    async def _cmd_rollback(self, args: dict[str, Any], peer: Peer) -> Any:
        name = args.get("model")
        if not isinstance(name, str) or name not in self.stores:
            raise CommandError(
                "unknown_model", f"model: expected one of {sorted(self.stores)}, got {name!r}"
            )
        rec = self.records[name]
        if rec.state in (m.S.TRIAL, m.S.PROBATION):
            self._abort[name] = ("manual", f"rolled back by hand (uid {peer.uid})")
            async with asyncio.timeout(30):
                await self._wait_until(lambda: self.records[name].state not in m.IN_FLIGHT)
            return self.slot_info(name)
        if rec.state in m.IN_FLIGHT:
            raise CommandError("busy", f"{name} is in {rec.state}; nothing to roll back to yet")
        if rec.active is None or rec.slots.get(m.other(rec.active)) is None:
            raise CommandError(
                "no_previous", f"{name}: the other slot holds no valid model to roll back to"
            )
        await self._drive(
            name,
            m.Event(
                "rollback",
                reason="manual",
                message=f"rolled back by hand (uid {peer.uid})",
                now=time.time(),
            ),
        )
        return self.slot_info(name)

    async def _cmd_slots(self, args: dict[str, Any], peer: Peer) -> Any:
        return [m.summary(r) for r in self.records.values()]

    # -- worker -------------------------------------------------------------------------
    async def _models_ready(self, name: str) -> Any | None:
        """The models registry once it runs `name`; None when no registry is configured
        (then an update only flips `current`, loaded at the next start)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < MODELS_WAIT_S:
            models = self.ctx.get("models")
            if models is None:
                if time.monotonic() - t0 > 2.0:
                    return None
            else:
                with contextlib.suppress(Exception):
                    if models.runner(name) is not None:
                        return models
            await asyncio.sleep(0.05)
        return self.ctx.get("models")

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, Job):
                    await self._run_job(item)
                else:
                    name, action = item
                    await self._models_ready(name)
                    self._job = {"model": name, "source": "recovery", "phase": str(action.kind)}
                    if action.kind is m.A.RESUME_TRIAL:
                        await self._drive(name, m.Event("ok", now=time.time()))
                    else:
                        ev = await self._execute(name, self.records[name], [action])
                        if ev is not None:
                            await self._drive(name, ev)
            except Exception:
                log.exception("update_worker_error")
            finally:
                self._job = None
                self._touch()

    def _reject(self, job: Job, err: TrustError, model: str | None) -> None:
        job.error = err
        entry = {
            "path": str(job.path),
            "source": job.source,
            "model": model,
            "reason": err.code,
            "message": str(err).split(": ", 1)[-1],
            "at": time.time(),
        }
        self._rejections.append(entry)
        log.warning("update_rejected", **entry)
        self.ctx.events.publish(
            "update.result",
            model or "?",
            result="REJECTED",
            reason=err.code,
            message=entry["message"],
        )

    async def _run_job(self, job: Job) -> None:
        try:
            self._job = {
                "path": str(job.path),
                "source": job.source,
                "phase": "reading",
                "bytes_done": 0,
                "bytes_total": None,
                "started": time.time(),
            }
            try:
                head = await asyncio.to_thread(_read_head, job.path)
            except OSError as exc:
                raise TrustError("not_readable", f"{job.path}: {exc.strerror}") from None
            if head.lstrip().startswith(b"{"):
                await self._run_keyring_job(job)
                return
            name = await asyncio.to_thread(
                bundle_io.peek_model_name, job.path, self.cfg.manifest_max_kb * 1024
            )
            if name not in self.stores:
                raise TrustError(
                    "unknown_model",
                    f"model_name: expected one of {sorted(self.stores)}, got {name!r}",
                )
            job.model = name
            self._job["model"] = name
            if self.records[name].state in m.IN_FLIGHT:
                raise TrustError("busy", f"{name} has an update in {self.records[name].state}")
            dep = m.Deployment(source=job.source, received_at=time.time())
            rec = await self._drive(name, m.Event("receive", deployment=dep, now=time.time()), job)
            if rec.state in (m.S.REJECTED, m.S.ROLLED_BACK) and rec.last_failure is not None:
                lf = rec.last_failure
                job.error = TrustError(lf.reason, lf.message)
                if rec.state is m.S.REJECTED:
                    self._rejections.append(
                        {
                            "path": str(job.path),
                            "source": job.source,
                            "model": name,
                            "reason": lf.reason,
                            "message": lf.message,
                            "at": lf.at,
                        }
                    )
            job.result = self.slot_info(name)
        except TrustError as err:
            self._reject(job, err, job.model)
        finally:
            if job.remove_after:
                with contextlib.suppress(OSError):
                    os.unlink(job.path)
            job.trial_reached.set()
            job.done.set()

    async def _run_keyring_job(self, job: Job) -> None:
        data = await asyncio.to_thread(_read_capped, job.path, 1 << 20)
        new = await asyncio.to_thread(self._rotate_keyring, data)
        old = self.keyring
        self.keyring = new
        log.info(
            "keyring_rotated", old_version=old.version if old else None, new_version=new.version
        )
        self.ctx.events.publish("keyring.rotated", "updates", version=new.version)
        job.result = {
            "keyring": {"version": new.version, "threshold": new.threshold, "keys": len(new.keys)}
        }

    # -- the machine driver ---------------------------------------------------------------
    async def _drive(self, name: str, ev: m.Event, job: Job | None = None) -> m.Record:
        next_ev: m.Event | None = ev
        while next_ev is not None:
            rec = self.records[name]
            if (
                next_ev.kind == "ok"
                and rec.state in m.IN_FLIGHT
                and rec.writes >= self.cfg.max_state_writes
            ):
                next_ev = m.Event(
                    "fail",
                    reason="state_loop",
                    message=f"more than {self.cfg.max_state_writes} state writes in one deployment",
                    now=time.time(),
                )
            new, acts = m.step(rec, next_ev)
            self.records[name] = new
            self._touch()
            if self._job is not None:
                self._job["phase"] = str(new.state)
            next_ev = await self._execute(name, new, acts, job)
            if job is not None and new.state in (m.S.PROBATION, *m.TERMINAL):
                job.trial_reached.set()
        return self.records[name]

    async def _execute(
        self, name: str, rec: m.Record, acts: list[m.Action], job: Job | None = None
    ) -> m.Event | None:
        result: m.Event | None = None
        for a in acts:
            try:
                ev = await self._execute_one(name, a, job=job)
            except TrustError as exc:
                ev = m.Event(
                    "fail", reason=exc.code, message=str(exc).split(": ", 1)[-1], now=time.time()
                )
            except OSError as exc:
                reason = "no_space" if exc.errno == errno.ENOSPC else "io_error"
                ev = m.Event("fail", reason=reason, message=f"{a.kind}: {exc}", now=time.time())
            except Exception as exc:
                ev = m.Event("fail", reason=f"{a.kind}_failed", message=repr(exc), now=time.time())
            if ev is not None and ev.kind == "fail" and rec.state in m.TERMINAL:
                # Failing while rolling back or cleaning up: keep going, the rest still helps.
                log.error(
                    "update_cleanup_step_failed",
                    model=name,
                    action=str(a.kind),
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
        self, name: str, a: m.Action, *, recovering: bool = False, job: Job | None = None
    ) -> m.Event | None:
        store = self.stores[name]
        rec = self.records[name]
        dep = rec.deployment
        k = a.kind
        if k is m.A.PERSIST:
            await asyncio.to_thread(store.save_record, rec)
            if not recovering:
                fsutil.abort_point(str(rec.state))
            self._publish_state(name, rec)
            return None
        if k is m.A.VERIFY:
            assert job is not None
            return await self._verify(name, job)
        if k is m.A.STAGE:
            assert dep is not None and a.slot is not None
            return await self._stage(name, a.slot)
        if k is m.A.PRECHECK:
            assert a.slot is not None
            return await self._precheck(name, a.slot)
        if k is m.A.RESUME_TRIAL:
            return m.Event("ok", now=time.time())
        if k is m.A.FLIP:
            assert a.slot is not None
            t0 = time.perf_counter()
            await asyncio.to_thread(store.flip, a.slot)
            if rec.state is m.S.ROLLED_BACK:
                self._rb_t0 = t0
            if not recovering:
                fsutil.abort_point(f"{rec.state}.flipped")
            return None
        if k is m.A.SWAP:
            assert a.slot is not None
            await self._swap(name, a.slot)
            if rec.state is m.S.ROLLED_BACK:
                self._last_rollback_ms = (time.perf_counter() - self._rb_t0) * 1e3
            return m.Event("ok", now=time.time()) if rec.state is m.S.TRIAL else None
        if k is m.A.WATCH:
            return await self._watch(name)
        if k is m.A.RATCHET:
            await self._ratchet(name)
            return m.Event("ratcheted", now=time.time()) if not recovering else None
        if k is m.A.INVALIDATE:
            assert a.slot is not None
            await asyncio.to_thread(store.invalidate, a.slot)
            return None
        if k is m.A.SYNC_SLOTS:
            keep = dep.target if (dep is not None and rec.state in m.IN_FLIGHT) else None
            await asyncio.to_thread(store.sync_slots, rec, keep)
            return None
        if k is m.A.DISCARD:
            await asyncio.to_thread(store.clean_staging)
            return None
        raise AssertionError(f"unhandled action {a}")

    def _publish_state(self, name: str, rec: m.Record) -> None:
        d = rec.deployment
        fields: dict[str, Any] = {"state": str(rec.state), "version": d.version if d else None}
        if rec.state in (m.S.REJECTED, m.S.ROLLED_BACK) and rec.last_failure is not None:
            fields.update(reason=rec.last_failure.reason, message=rec.last_failure.message)
        log.info("update_state", model=name, **fields)
        self.ctx.events.publish("update.state", name, **fields)
        if rec.state in (m.S.COMMITTED, m.S.ROLLED_BACK, m.S.REJECTED):
            self.ctx.events.publish("update.result", name, result=str(rec.state), **fields)

    # -- steps ----------------------------------------------------------------------------
    def _installed(self, name: str) -> Installed:
        rec = self.records[name]
        info = rec.slots.get(rec.active) if rec.active else None
        return Installed(
            counter=self._counter_value or 0,
            version=info.version if info else None,
            bundle_id=info.bundle_id if info else None,
            created=info.created if info else None,
        )

    async def _verify(self, name: str, job: Job) -> m.Event:
        store = self.stores[name]
        assert self.keyring is not None and self.counter is not None
        self._counter_value = await self.counter.read()
        staging = await asyncio.to_thread(store.reset_staging)
        loop = asyncio.get_running_loop()
        job_state = self._job

        def progress(done: int, total: int) -> None:
            # Called from the worker thread: hand the figures to the loop.
            if job_state is not None:
                loop.call_soon_threadsafe(
                    job_state.update, {"bytes_done": done, "bytes_total": total}
                )

        verdict, mbytes, sbytes = await asyncio.to_thread(
            bundle_io.read_bundle,
            job.path,
            staging,
            self.keyring,
            now=time.time(),
            device=self.device,
            installed=self._installed(name),
            limits=self.limits,
            manifest_max=self.cfg.manifest_max_kb * 1024,
            progress=progress,
        )
        man = verdict.manifest
        if man.model_name != name:
            raise TrustError(
                "unknown_model", f"model_name changed between reads: {name!r} vs {man.model_name!r}"
            )
        self._staged_bytes = (mbytes, sbytes, verdict.manifest_sha256)
        probation = (
            man.health.probation_s if man.health.probation_s is not None else self.cfg.probation_s
        )
        probation = min(probation, self.cfg.probation_max_s)
        dep = m.Deployment(
            bundle_id=man.bundle_id,
            version=man.version,
            security_counter=man.security_counter,
            manifest_sha256=verdict.manifest_sha256,
            created=parse_time(man.created, "created"),
            probation_s=probation,
        )
        return m.Event("ok", deployment=dep, now=time.time())

    async def _stage(self, name: str, slot: str) -> m.Event:
        store = self.stores[name]
        mbytes, sbytes, msha = self._staged_bytes
        man, _ = decode_manifest(mbytes)
        dep = self.records[name].deployment
        await asyncio.to_thread(
            store.install_staging, slot, man, msha, mbytes, sbytes, dep.created if dep else None
        )
        return m.Event("ok", now=time.time())

    async def _precheck(self, name: str, slot: str) -> m.Event:
        store = self.stores[name]
        ok = await asyncio.to_thread(store.verify_slot, slot, quiet=True)
        if not ok:
            return m.Event(
                "fail",
                reason="slot_corrupt",
                message=f"slot {slot} failed its re-hash before the precheck",
                now=time.time(),
            )
        mbytes = await asyncio.to_thread((store.dir(slot) / "bundle.json").read_bytes)
        man, raw = decode_manifest(mbytes)
        rec = self.records[name]
        baseline = store.dir(rec.active) if rec.active and rec.active != slot else None
        health = dict(raw.get("health") or {})
        for key, val in (
            ("golden_file", man.health.golden_file),
            ("atol", man.health.atol),
            ("rtol", man.health.rtol),
            ("latency_p95_ms", man.health.latency_p95_ms),
            ("max_rel_latency", man.health.max_rel_latency),
        ):
            health[key] = val
        timeout = self.cfg.precheck_timeout_s
        res = await run_precheck(
            store.dir(slot),
            baseline,
            raw["io_signature"],
            health,
            timeout_s=timeout,
            cpu_s=self.cfg.precheck_cpu_s or self.cfg.precheck_timeout_s,
            runs=self.cfg.precheck_runs,
        )
        self._last_precheck[name] = {"ok": res.ok, "reason": res.reason, "figures": res.figures}
        if not res.ok:
            return m.Event("fail", reason=res.reason, message=res.message, now=time.time())
        return m.Event("ok", now=time.time())

    async def _swap(self, name: str, slot: str) -> None:
        models = self.ctx.get("models")
        if models is None:
            return  # no registry: the flipped `current` is loaded at the next start
        await models.swap(name, self.stores[name].dir(slot))

    def _loops_missed(self) -> int:
        loops = self.ctx.get("loops")
        if loops is None:
            return 0
        try:
            st = loops.status()
        except Exception:
            return 0
        items = st.get("loops", st) if isinstance(st, dict) else st
        if isinstance(items, dict):
            items = list(items.values())
        total = 0
        for it in items if isinstance(items, list) else []:
            if isinstance(it, dict):
                total += int(it.get("missed", 0) or 0)
        return total

    async def _watch(self, name: str) -> m.Event:
        rec = self.records[name]
        dep = rec.deployment
        assert dep is not None
        pc = self.cfg.probation
        models = self.ctx.get("models")
        mbytes = await asyncio.to_thread(
            (self.stores[name].dir(dep.target) / "bundle.json").read_bytes
        )
        man, _ = decode_manifest(mbytes)

        def stats() -> dict[str, Any]:
            if models is None:
                return {}
            try:
                s = models.stats(name)
                return s if isinstance(s, dict) else {}
            except Exception:
                return {}

        s0 = stats()
        missed0 = self._loops_missed()
        end = time.monotonic() + dep.probation_s
        while True:
            if name in self._abort:
                reason, msg = self._abort.pop(name)
                return m.Event("rollback", reason=reason, message=msg, now=time.time())
            s = stats()
            d_faults = int(s.get("faults", 0) or 0) - int(s0.get("faults", 0) or 0)
            d_nan = int(s.get("nan_outputs", 0) or 0) - int(s0.get("nan_outputs", 0) or 0)
            d_missed = self._loops_missed() - missed0
            if d_faults > pc.max_faults:
                return m.Event(
                    "fail",
                    reason="probation_faults",
                    message=f"{d_faults} model fault(s) during probation (max {pc.max_faults})",
                    now=time.time(),
                )
            if d_nan > pc.max_nan_outputs:
                return m.Event(
                    "fail",
                    reason="probation_nan",
                    message=f"{d_nan} NaN/Inf output(s) during probation (max {pc.max_nan_outputs})",
                    now=time.time(),
                )
            if d_missed > pc.max_missed_ticks:
                return m.Event(
                    "fail",
                    reason="probation_missed_ticks",
                    message=f"{d_missed} missed loop tick(s) during probation (max {pc.max_missed_ticks})",
                    now=time.time(),
                )
            sc = s.get("score")
            mean = sc.get("mean") if isinstance(sc, dict) else s.get("score_mean")
            n_inf = int(s.get("inferences", 0) or 0) - int(s0.get("inferences", 0) or 0)
            if isinstance(mean, (int, float)) and n_inf > 0:
                if not math.isfinite(mean):
                    return m.Event(
                        "fail",
                        reason="probation_score",
                        message="recent score mean is not finite",
                        now=time.time(),
                    )
                lo, hi = man.health.score_min, man.health.score_max
                if (lo is not None and mean < lo) or (hi is not None and mean > hi):
                    return m.Event(
                        "fail",
                        reason="probation_score",
                        message=f"recent score mean {mean:.4g} outside [{lo}, {hi}]",
                        now=time.time(),
                    )
            if time.monotonic() >= end:
                return m.Event("ok", now=time.time())
            await asyncio.sleep(
                min(pc.poll_interval_ms / 1000.0, max(0.0, end - time.monotonic()) + 0.001)
            )

    async def _ratchet(self, name: str) -> None:
        rec = self.records[name]
        info = rec.slots.get(rec.active) if rec.active else None
        if info is None or self.counter is None:
            return
        self._counter_value = await self.counter.ratchet(info.security_counter)
        fsutil.abort_point("COMMITTED.ratcheted")

    # -- sources --------------------------------------------------------------------------
    async def _register_mqtt(self) -> None:
        while True:
            tel = self.ctx.get("telemetry")
            if tel is not None and hasattr(tel, "register_command"):
                tel.register_command("update", self.mqtt_handler)
                self._mqtt_registered = True
                log.info("update_mqtt_registered")
                return
            await asyncio.sleep(0.5)

    async def mqtt_handler(self, payload: bytes) -> bytes | None:
        """`cmd/update` messages (transfer.py protocol); returns the JSON reply."""
        tid: Any = None
        try:
            hdr, data = parse_message(payload)
            tid = hdr.get("id")
            reply, done = await asyncio.to_thread(self.transfers.handle, hdr, data, time.time())
            if done is not None:
                await self.submit(done, f"mqtt:{tid}", remove_after=True)
        except TransferError as exc:
            reply = {"ok": False, "id": tid, "error": {"code": exc.code, "message": exc.message}}
        except OSError as exc:
            reply = {"ok": False, "id": tid, "error": {"code": "io_error", "message": str(exc)}}
        return json.dumps(reply).encode()

    async def _inbox_loop(self) -> None:
        inbox = Path(self.cfg.inbox_dir)
        sizes: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(self.cfg.inbox_poll_ms / 1000.0)
            try:
                entries = await asyncio.to_thread(_scan_inbox, inbox)
            except OSError:
                continue  # stick not inserted / unreadable: look again later
            for path, size, mtime in entries:
                key = (str(path), size, mtime)
                if key in self._inbox_seen:
                    continue
                # Only files whose size held still across two polls (copy finished).
                if sizes.get(str(path)) != (size, mtime):
                    sizes[str(path)] = (size, mtime)
                    continue
                self._inbox_seen.add(key)
                log.info("update_inbox_found", path=str(path), size=size)
                await self.submit(path, f"inbox:{path.name}")


def _read_head(path: Path) -> bytes:
    f, _ = bundle_io.open_bundle(path)  # regular files only, never blocks on a FIFO
    with f:
        return f.read(64)


def _read_capped(path: Path, cap: int) -> bytes:
    f, _ = bundle_io.open_bundle(path)
    with f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise TrustError("too_large", f"{path}: expected at most {cap} bytes")
    return data


def _scan_inbox(inbox: Path) -> list[tuple[Path, int, int]]:
    out = []
    for p in sorted(inbox.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix in (".tar", ".bundle") or (
            p.suffix == ".json" and p.name.startswith("keyring")
        ):
            st = p.stat()
            out.append((p, st.st_size, st.st_mtime_ns))
    return out


def build(ctx: Context) -> UpdatesComponent | None:
    cfg = ctx.config.updates
    if not cfg.enabled:
        return None
    return UpdatesComponent(ctx, cfg)
