"""The verified A/B slots of every managed model (implements ports.SlotSource).

Theory of operation
-------------------
The composition root enters the repository BEFORE the models host: `__aenter__` loads the
device keyring (the provisioned one, or the rotated one stored at run time when it is
newer) and runs start-up recovery of every configured model (recovery.py), all off the
event loop. Afterwards `active(name)` hands the models host a typed record whose
`model_dir` is a slot that re-hashed at start-up. Work recovery left for running models
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
from edgerund.ports import EventSink, SlotRecord
from edgerund.updates import fsutil, machine
from edgerund.updates.keyring import Keyring, check_rotation, check_self_signed, parse_keyring
from edgerund.updates.recovery import recover_model
from edgerund.updates.slots import SlotStore

log = structlog.get_logger("edgerund.updates")


class SlotRepository:
    def __init__(self, cfg: Config, *, events: EventSink) -> None:
        self.cfg = cfg.updates
        self.events = events
        self.state_dir = Path(cfg.paths.state_dir)
        self.upd_dir = self.state_dir / "updates"
        self.stores = {
            mc.name: SlotStore(self.state_dir / "models" / mc.name, mc.name) for mc in cfg.models
        }
        self.shipped = {mc.name: Path(mc.path) for mc in cfg.models}
        self.records: dict[str, machine.Record] = {}
        self.deferred: list[tuple[str, machine.Action]] = []
        self._keyring: Keyring | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._keyring = await asyncio.to_thread(self._load_keyring)
        for name, store in self.stores.items():
            rec, deferred = await recover_model(
                store, self.shipped[name], attempts=self.cfg.attempts, events=self.events
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
        )

    # -- keyring ---------------------------------------------------------------------------
    @property
    def keyring(self) -> Keyring:
        assert self._keyring is not None, "the repository is entered first"
        return self._keyring

    def _abs(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.state_dir / path

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

    def rotate_keyring(self, data: bytes) -> Keyring:
        """Check a successor keyring against the current one and store it (blocking)."""
        new = parse_keyring(data)
        check_rotation(self.keyring, new, time.time())
        self.upd_dir.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write(self.upd_dir / "keyring.json", data)
        self._keyring = new
        return new


def build_slots(cfg: Config, *, events: EventSink) -> SlotRepository | None:
    """None when updates are disabled or manage no model."""
    if not cfg.updates.enabled or not cfg.models:
        return None
    return SlotRepository(cfg, events=events)
