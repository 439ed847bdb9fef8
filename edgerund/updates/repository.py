"""The verified A/B slots of every managed model (implements ports.SlotSource).

Theory of operation
-------------------
The composition root enters the repository BEFORE the models host: `__aenter__` loads the
device keyring and runs start-up recovery of every configured model (recovery.py), all off
the event loop. Afterwards `active(name)` hands the models host a typed record whose
`model_dir` is a slot that re-verified at start-up (slotcheck.verify_slot; a calibrated
`X+cal.N` slot also with this device's public key, `device_key`).

The keyring: the provisioned (packaged) keyring is the root of trust; it must be
self-signed, else the daemon does not start (ConfigError). The rotations accepted at run
time are stored (keyringstore.KeyringStore: `keyrings/v<N>.json`, the version floor) and
RE-VERIFIED at every start along the whole chain from that root (keyring.verify_chain): a
stored document that does not chain (unsigned, forged, a gap) is refused and logged, and
the last keyring that chains is used. Deleting stored rotations cannot bring revoked keys
back: the floor (the highest version ever verified here) makes the keyring UNUSABLE
(`keyring_below_floor`) instead; then `keyring` is None, every bundle is refused with that
reason before it is read, signed slots cannot verify (the packaged model runs), status
shows it, and re-delivering the missing rotations makes it usable again. `keyring_base`
is always the last verified keyring: the base the next rotation must chain from. Work recovery left for running models
(rerun a precheck, retry a trial, redo a counter ratchet) waits in `deferred` until the
updates component, entered after the models host and the loops, picks it up.

The repository owns the records (`records`, one `machine.Record` per model) and the slot
stores; the updates component's steps change them, nobody else.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from edgerund.config.schema import Config
from edgerund.errors import ConfigError, TrustError
from edgerund.ports import EventSink, SlotProblem, SlotRecord
from edgerund.updates import machine
from edgerund.updates.keyring import (
    ChainVerdict,
    Keyring,
    check_rotation,
    check_self_signed,
    parse_keyring,
)
from edgerund.updates.keyringstore import KeyringStore
from edgerund.updates.recovery import recover_model
from edgerund.updates.slots import SlotStore

log = structlog.get_logger("edgerund.updates")


class SlotRepository:
    def __init__(self, cfg: Config, *, events: EventSink, device_key: str | None = None) -> None:
        self.cfg = cfg.updates
        self.events = events
        # This device's identity public key (PEM): a calibrated slot's overlay must be
        # signed by it (slotcheck 9.); None: calibrated slots cannot verify.
        self.device_key = device_key
        self.state_dir = Path(cfg.paths.state_dir)
        self.upd_dir = self.state_dir / "updates"
        self.stores = {
            mc.name: SlotStore(self.state_dir / "models" / mc.name, mc.name) for mc in cfg.models
        }
        self.shipped = {mc.name: Path(mc.path) for mc in cfg.models}
        self.records: dict[str, machine.Record] = {}
        self.deferred: list[tuple[str, machine.Action]] = []
        self.kstore = KeyringStore(self.upd_dir)
        self._keyring: Keyring | None = None
        self._base: Keyring | None = None
        self.chain: ChainVerdict | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._load_keyring)
        for name, store in self.stores.items():
            rec, deferred = await recover_model(
                store,
                self.shipped[name],
                attempts=self.cfg.attempts,
                events=self.events,
                keyring=self._keyring,
                device_key=self.device_key,
            )
            self.records[name] = rec
            self.deferred += [(name, a) for a in deferred]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Nothing to close: every write is durable when it returns; an update cut short is
        # finished or undone by recovery at the next start.
        return None

    def take_deferred(self) -> list[tuple[str, machine.Action]]:
        """The work recovery left for the updates component (handed over once)."""
        out, self.deferred = self.deferred, []
        return out

    # -- ports.SlotSource -----------------------------------------------------------------
    def active(self, name: str) -> SlotRecord | None:
        rec = self.records.get(name)
        if rec is None:
            return None
        info = rec.slots.get(rec.active) if rec.active else None
        return SlotRecord(
            name=name,
            active_slot=rec.active,
            version=info.version if info else None,
            state=str(rec.state),
            model_dir=self.stores[name].dir(rec.active) if rec.active else None,
            last_failure=_problem(rec.last_failure),
            quarantined={
                slot: SlotProblem(q.reason, q.message, q.at) for slot, q in rec.quarantined.items()
            },
        )

    # -- keyring ---------------------------------------------------------------------------
    @property
    def keyring(self) -> Keyring | None:
        """The keyring bundles are verified with; None when no keyring is usable
        (`keyring_refusal` says why)."""
        return self._keyring

    @property
    def keyring_base(self) -> Keyring:
        """The last keyring verified along the chain: the base of the next rotation."""
        assert self._base is not None, "the repository is entered first"
        return self._base

    def keyring_refusal(self) -> TrustError | None:
        """Why every bundle is refused now (keyring unusable), or None."""
        if self._keyring is not None:
            return None
        cv = self.chain
        if cv is None:
            return TrustError("keyring_unusable", "no keyring loaded")
        return TrustError(cv.reason or "keyring_unusable", cv.message)

    def keyring_status(self) -> dict[str, object]:
        base = self._base
        cv = self.chain
        out: dict[str, object] = {
            "version": None if base is None else base.version,
            "usable": self._keyring is not None,
            "floor": None if cv is None else cv.floor,
        }
        if base is not None:
            out.update(
                threshold=base.threshold, keys=len(base.keys), expires=base.signed.get("expires")
            )
        refusal = self.keyring_refusal()
        if refusal is not None:
            out.update(reason=refusal.code, message=str(refusal).split(": ", 1)[-1])
        if cv is not None and cv.refused:
            out["refused_documents"] = [
                {"version": r.version, "reason": r.reason, "message": r.message} for r in cv.refused
            ]
        return out

    def _abs(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.state_dir / path

    def _load_keyring(self) -> None:
        """The provisioned root (ConfigError when missing or not self-signed), then the
        stored chain re-verified from it (blocking)."""
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
        cv = self.kstore.load(prov)
        for r in cv.refused:
            log.error("keyring_refused", version=r.version, reason=r.reason, message=r.message)
        self.chain = cv
        self._base = cv.keyring
        self._keyring = cv.keyring if cv.usable else None
        if cv.usable:
            log.info("keyring_loaded", version=cv.keyring.version, chain=len(cv.chain))
        else:
            log.error(
                "keyring_unusable",
                reason=cv.reason,
                message=cv.message,
                verified_version=cv.keyring.version,
                floor=cv.floor,
            )

    def rotate_keyring(self, data: bytes) -> Keyring:
        """Check a successor keyring against the last verified one and store it (blocking).
        The keyring becomes usable again once the chain reaches the floor."""
        new = parse_keyring(data)
        check_rotation(self.keyring_base, new, time.time())
        self.kstore.append(new, data)
        self._base = new
        floor = self.kstore.read_floor()
        self._keyring = new if new.version >= floor else None
        cv = self.chain
        if cv is not None:
            usable = self._keyring is not None
            self.chain = ChainVerdict(
                keyring=new,
                chain=(*cv.chain, new),
                floor=floor,
                refused=cv.refused,
                reason=None if usable else cv.reason,
                message=""
                if usable
                else (
                    f"{cv.message.split(';')[0]}; keyring v{new.version} received, still below"
                    " the floor: deliver the next rotations"
                ),
            )
        return new


def build_slots(
    cfg: Config, *, events: EventSink, device_key: str | None = None
) -> SlotRepository | None:
    """None when updates are disabled or manage no model. `device_key`: the identity's
    public key (PEM), which device calibrations are verified with."""
    if not cfg.updates.enabled or not cfg.models:
        return None
    return SlotRepository(cfg, events=events, device_key=device_key)


def _problem(f: machine.Failure | None) -> SlotProblem | None:
    return None if f is None else SlotProblem(f.reason, f.message, f.at)
