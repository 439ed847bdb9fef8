"""Applying desired state: verify, merge, validate, apply through the reload path, judge a
probation, keep or revert, persist (the I/O and orchestration around desired.py).

Order for one desired document (docs/twin.md §5):

1. `desired.open_desired`: operator signature, this gateway, version above the last one
   seen (applied or refused), not expired; then `check_allowed` against `twin.allow`.
2. The file's config data merged with the patch (`merged_data`) is validated by the same
   loader as the file (`parse_config`, off the loop); an error names the key path.
3. The root applies it (`apply`: the reload path, which applies every changed key live or
   names it as needing a restart) and a probation of `twin.probation_s` watches the
   health (`Health`: missed loop ticks, sensors ok, uplink connected) against the snapshot
   taken before. Worse: the previous config is applied again and the outcome is
   `reverted` with the reason. Healthy: the envelope is written to
   `<state_dir>/twin/applied.json` (atomic rename, fsync) and the outcome is `applied`.
4. Every outcome (applied, refused with reason, reverted with reason) is in `outcome`,
   which the reported state carries.

Model targets (the document's `models`) are handed to `models` (twin/modeltargets.py) right
after step 1, before and independently of the config fragment: a refused or reverted
fragment does not stop them, and they do not wait for the fragment's probation.

Start-up (`load_applied`): the stored envelope is re-verified from its signature against
the verified keyring (never trusted because it is on disk; expiry is not re-checked: it
was valid when applied) and merged over the file; a document that no longer verifies or
validates is ignored with its reason and the file's config runs.

The newest authenticated document is also kept, whatever its config fragment's fate, in
`<state_dir>/twin/offered.json`: its model targets pin their models (twin/pins.py) even
when its fragment was refused or reverted, and a restart while the broker is out of reach
must not lift those pins. `load_offered` re-verifies it the same way at start-up; it only
ever seeds pins, never config.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from edgerund.config.loader import load_config, parse_config
from edgerund.errors import ConfigError, TrustError
from edgerund.twin.desired import Desired, check_allowed, merged_data, open_desired, origins

if TYPE_CHECKING:
    from edgerund.config.schema import Config
    from edgerund.updates.keyring import Keyring

log = structlog.get_logger("edgerund.twin.applier")


@dataclass(frozen=True, slots=True)
class Health:
    missed_ticks: int  # summed over loops
    # WHICH sensors are ok, not how many: with a count, a sensor the change broke was
    # hidden by another one recovering meanwhile
    sensors_ok: frozenset[str]
    connected: bool


def applied_path(cfg: Config) -> Path:
    return Path(cfg.paths.state_dir) / "twin" / "applied.json"


def config_with_patch(config_path: Path, patch: dict[str, Any], version: int) -> Config:
    """The file's config with a desired patch merged (blocking: reads the file).

    The file is parsed once by the loader's C parser and the patch merged into the parsed
    data (no pure-Python YAML load, dump and re-parse): this runs in a worker thread while
    the control loops tick, and CPU-bound Python there competes with them for the GIL
    (a pure-Python round trip was ~80 ms of it per desired document, README #18)."""
    if not patch:
        return load_config(config_path)
    return parse_config(
        config_path.read_text(encoding="utf-8"),
        f"{config_path} + twin desired v{version}",
        transform=lambda data: merged_data(data, patch),
    )


def offered_path(cfg: Config) -> Path:
    return Path(cfg.paths.state_dir) / "twin" / "offered.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def startup_keyring(cfg: Config) -> Keyring | None:
    """The verified keyring before any component runs (blocking): the provisioned root and,
    when updates keep a rotation chain, the chain re-verified from it."""
    from edgerund.twin.gate import provisioned_keyring
    from edgerund.updates.keyringstore import KeyringStore

    root = provisioned_keyring(cfg)
    if root is None or not cfg.updates.enabled:
        return root
    verdict = KeyringStore(Path(cfg.paths.state_dir) / "updates").load(root)
    return verdict.keyring if verdict.usable else None


def _stored(cfg: Config, path: Path) -> Desired | None:
    """A stored envelope re-verified from its signature (blocking); None when absent.
    Raises TrustError (unreadable, no keyring, no longer verifies)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrustError("unreadable", str(exc)) from None
    kr = startup_keyring(cfg)
    if kr is None:
        raise TrustError("no_operator_keys", "no verified keyring")
    return open_desired(
        data,
        gateway=cfg.gateway.id,
        operators=kr.operators,
        publishers=kr.keys,
        last_version=0,
        now_ms=None,
    )


def load_offered(cfg: Config, applied: Desired | None) -> Desired | None:
    """The newest authenticated desired document, when newer than `applied` (blocking):
    the source of the model pins at start-up."""
    path = offered_path(cfg)
    try:
        doc = _stored(cfg, path)
    except TrustError as exc:
        log.error("twin_offered_state_ignored", path=str(path), reason=str(exc))
        return None
    if doc is None or (applied is not None and doc.version <= applied.version):
        return None
    log.info("twin_offered_state_loaded", version=doc.version)
    return doc


def load_applied(cfg: Config, config_path: Path) -> tuple[Config, Desired | None, str]:
    """(effective config, the applied desired document or None, why none) (blocking)."""
    path = applied_path(cfg)
    try:
        doc = _stored(cfg, path)
        if doc is None:
            return cfg, None, ""
        check_allowed(doc.config, cfg.twin.allow)
        eff = config_with_patch(config_path, doc.config, doc.version)
    except (TrustError, ConfigError) as exc:
        log.error("twin_applied_state_ignored", path=str(path), reason=str(exc))
        return cfg, None, str(exc)
    log.info("twin_applied_state_loaded", version=doc.version)
    return eff, doc, ""


class DesiredApplier:
    def __init__(
        self,
        *,
        cfg: Config,
        config_path: Path,
        keyring: Callable[[], Keyring | None],
        apply: Callable[[Config], Awaitable[list[str]]],
        current: Callable[[], Config],
        health: Callable[[], Health],
        notify: Callable[[], None],
        applied: Desired | None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._keyring = keyring
        self._apply = apply
        self._current = current
        self._health = health
        self._notify = notify
        self.applied = applied
        self.last_version = applied.version if applied else 0
        self.outcome: dict[str, Any] = {
            "applied_version": applied.version if applied else None,
            "version": applied.version if applied else None,
            "outcome": "applied" if applied else None,
        }
        self._last_raw: bytes | None = None
        # The document on probation: a SIGHUP meanwhile merges it, not the previous one.
        self.pending: Desired | None = None
        self._lock = asyncio.Lock()
        self.refused = 0
        # Model targets (twin/modeltargets.py): every authenticated document is offered,
        # independently of its config fragment's fate.
        self.models: Callable[[Desired], None] | None = None

    @property
    def patch(self) -> dict[str, Any]:
        return self.applied.config if self.applied else {}

    def origin(self) -> dict[str, str]:
        return origins(self.patch, self.applied.version) if self.applied else {}

    def _set(self, version: int | None, outcome: str, **kw: Any) -> None:
        self.outcome = {
            "applied_version": self.applied.version if self.applied else None,
            "version": version,
            "outcome": outcome,
            "at": int(time.time()),
            **kw,
        }
        log.info("twin_desired_" + outcome, version=version, **kw)
        self._notify()

    def failed(self, message: str) -> None:
        """An unexpected error while handling a document (logged by the caller)."""
        self._set(None, "failed", reason="internal_error", message=message[:300])

    async def handle(self, data: bytes) -> None:
        async with self._lock:
            if data == self._last_raw:
                return  # the retained copy again (reconnect, broker restart): judged already
            self._last_raw = data
            await self._handle(data)

    async def _handle(self, data: bytes) -> None:
        kr = self._keyring()
        try:
            if kr is None:
                raise TrustError("no_operator_keys", "no verified keyring")
            doc = open_desired(
                data,
                gateway=self.cfg.gateway.id,
                operators=kr.operators,
                publishers=kr.keys,
                last_version=self.last_version,
                now_ms=int(time.time() * 1000),
            )
        except TrustError as exc:
            if exc.code == "replay" and self.applied is not None and data == self.applied.raw:
                # The retained copy of what we already run (reconnect, restart); its model
                # targets resume (a fetch cut short by the restart, say).
                if self.models is not None:
                    self.models(self.applied)
                return
            self.refused += 1
            self._set(None, "refused", reason=exc.code, message=str(exc).split(": ", 1)[-1])
            return
        self.last_version = doc.version
        if self.models is not None:
            self.models(doc)  # fetched and installed in the background, not on probation here
        try:  # its pins must outlive a restart, whatever becomes of its config fragment
            await asyncio.to_thread(_write_atomic, offered_path(self.cfg), doc.raw)
        except OSError as exc:
            log.error("twin_offered_state_write_failed", error=str(exc))
        try:
            check_allowed(doc.config, self.cfg.twin.allow)
            new = await asyncio.to_thread(
                config_with_patch, self.config_path, doc.config, doc.version
            )
        except TrustError as exc:
            self.refused += 1
            self._set(doc.version, "refused", reason=exc.code, message=str(exc))
            return
        except ConfigError as exc:
            self.refused += 1
            self._set(doc.version, "refused", reason="invalid", message=str(exc), path=exc.path)
            return
        old = self._current()
        before = self._health()
        self.pending = doc
        try:
            restart_needed = await self._apply(new)
            await asyncio.sleep(self.cfg.twin.probation_s)
            after = self._health()
        finally:
            self.pending = None
        problem = judge(before, after, self.cfg.twin.probation_missed_ticks_max)
        if problem is not None:
            await self._apply(old)
            self._set(doc.version, "reverted", reason=problem[0], message=problem[1])
            return
        await asyncio.to_thread(_write_atomic, applied_path(self.cfg), doc.raw)
        self.applied = doc
        self._set(doc.version, "applied", restart_needed=restart_needed)


def judge(before: Health, after: Health, missed_max: int) -> tuple[str, str] | None:
    """Why the probation failed, or None (pure)."""
    missed = after.missed_ticks - before.missed_ticks
    if missed > missed_max:
        return "missed_ticks", f"loops missed {missed} ticks during probation (max {missed_max})"
    lost = before.sensors_ok - after.sensors_ok
    if lost:
        return "sensors_failed", f"sensors ok before the change, not now: {', '.join(sorted(lost))}"
    if before.connected and not after.connected:
        return "uplink_lost", "the uplink was connected before the change and is not now"
    return None
