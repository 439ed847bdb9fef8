"""TEMPORARY (issue #13): the pre-#13 updates and telemetry components behind the builders
of /work/coord/SIGNATURES.md, so that edgerund/daemon.py can already call exactly

    build_slots(cfg, *, events) -> SlotRepository | None
    counter_for(cfg, identity) -> ports.Counter
    updates_build(cfg, *, slots, scope, events, counter, models, loops, router)
    telemetry_build(cfg, *, scope, events, samples, signer, router)

while the helpers `updates` and `telemetry` rewrite those components on their branches.
At the merge the lead points daemon.py's imports at edgerund.updates.repository /
.counter / .component and edgerund.telemetry.component, and deletes this module together
with the TEMPORARY `Context` record in edgerund/context.py. Nothing else imports it.

How it bridges: the old components look peers up by name in a `Context` and poll for the
ones built after them; this module fills one such record as the root hands it the peers.
The old updates component starts its tasks during the slot repository's `__aenter__`,
before the root has given updates its scope, so those spawns are queued and started in
the updates scope when `updates_build` is called.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edgerund.component import Command
from edgerund.config.schema import Config
from edgerund.context import Context, EventBus, TaskScope
from edgerund.ports import (
    CommandRouter,
    Counter,
    EventSink,
    IdentityPort,
    LoopStats,
    ModelHost,
    SlotRecord,
)
from edgerund.updates import component as old_updates
from edgerund.updates.counter import FileCounter, IdentityCounter


class _DeferredSpawner:
    """Queues `spawn` calls until a TaskScope is known, then starts them there."""

    def __init__(self) -> None:
        self._scope: TaskScope | None = None
        self._queued: list[tuple[str, Callable[[], Awaitable[None]], dict[str, Any]]] = []

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], **kw: Any) -> None:
        short = name.split(".", 1)[-1]
        if self._scope is None:
            self._queued.append((short, factory, kw))
        else:
            self._scope.spawn(short, factory, **kw)

    def bind(self, scope: TaskScope) -> None:
        self._scope = scope
        queued, self._queued = self._queued, []
        for name, factory, kw in queued:
            scope.spawn(name, factory, **kw)


class _Host:
    """The name-keyed record the old components read, for one daemon run."""

    def __init__(self) -> None:
        self.identity: IdentityPort | None = None
        self.ctx: Context | None = None


_HOST = _Host()


def counter_for(cfg: Config, identity: IdentityPort | None) -> Counter:
    # The old updates component picks its counter itself (from the identity it looks up);
    # remember the identity for it and return the same kind of counter for the root.
    _HOST.identity = identity
    if identity is not None and identity.kind == "tpm":
        return IdentityCounter(identity, max_steps=max(1000, cfg.updates.max_counter_jump))
    return FileCounter(_abs(cfg, cfg.updates.counter_file))


def _abs(cfg: Config, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else Path(cfg.paths.state_dir) / path


def _ctx(cfg: Config, events: EventSink) -> Context:
    if _HOST.ctx is None:
        assert isinstance(events, EventBus)
        _HOST.ctx = Context(
            config=cfg,
            config_path=Path(cfg.paths.state_dir) / "edgerund.yaml",
            supervisor=None,
            events=events,
        )
        _HOST.ctx.components["identity"] = _HOST.identity
    return _HOST.ctx


class InterimSlots:
    """The old updates component as a `ports.SlotSource` and async context manager (its
    `__aenter__` runs the keyring load and start-up recovery, as SlotRepository's will)."""

    def __init__(self, comp: old_updates.UpdatesComponent, spawner: _DeferredSpawner) -> None:
        self.comp = comp
        self.spawner = spawner

    def active(self, name: str) -> SlotRecord | None:
        rec = self.comp.records.get(name)
        if rec is None:
            return None
        info = self.comp.slot_info(name)
        return SlotRecord(
            name=name,
            active_slot=info.get("active_slot"),
            version=info.get("version") or None,
            state=str(info.get("state")),
            model_dir=self.comp.model_dir(name),
        )

    async def __aenter__(self) -> Self:
        await self.comp.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.comp.__aexit__(exc_type, exc, tb)


def build_slots(cfg: Config, *, events: EventSink) -> InterimSlots | None:
    _HOST.ctx = None  # a new daemon run
    ctx = _ctx(cfg, events)
    spawner = _DeferredSpawner()
    ctx.supervisor = spawner
    comp = old_updates.build(ctx)
    return None if comp is None else InterimSlots(comp, spawner)


class InterimUpdates:
    name = "updates"

    def __init__(self, slots: InterimSlots, scope: TaskScope) -> None:
        self.slots = slots
        self.scope = scope

    async def __aenter__(self) -> Self:
        self.slots.spawner.bind(self.scope)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return self.slots.comp.status()

    def commands(self) -> Mapping[str, Command]:
        return self.slots.comp.commands()


def updates_build(
    cfg: Config,
    *,
    slots: InterimSlots,
    scope: TaskScope,
    events: EventSink,
    counter: Counter,
    models: ModelHost | None,
    loops: LoopStats | None,
    router: CommandRouter | None,
) -> InterimUpdates:
    ctx = _ctx(cfg, events)
    ctx.components["models"] = models
    ctx.components["loops"] = loops
    return InterimUpdates(slots, scope)


class _ScopeSpawner:
    def __init__(self, scope: TaskScope) -> None:
        self._scope = scope

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], **kw: Any) -> Any:
        return self._scope.spawn(name.split(".", 1)[-1], factory, **kw)
