"""Shared plumbing the composition root hands to components: events and task scopes.

- `EventBus`: synchronous fan-out of `Event`s (anomaly, sensor-state, update events) to
  telemetry and the log. Components publish through the `ports.EventSink` view of it.
- `Supervisor`: owns every background task of the daemon, inside one asyncio TaskGroup
  (attached by the root, or entered as an async context manager by a test). A crashed
  task is restarted with capped, jittered backoff, or, when declared fatal, stops the
  daemon.
- `TaskScope`: one per component (`supervisor.scope(name)`), the only way a component
  starts a task. The root enters a component's scope before the component and leaves it
  after the component's `__aexit__`, which cancels what is left, so no task outlives its
  component. There is no other way to start a task: `spawn` without a TaskGroup is a
  programming error, not a fallback to a bare `create_task`.

Components do not find each other here: the root (edgerund/daemon.py) passes each one the
typed ports (edgerund/ports.py) of the peers it needs, as constructor arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from edgerund.errors import EdgerundError

if TYPE_CHECKING:
    pass

log = structlog.get_logger("edgerund")


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened, for telemetry `evt` and the log ring.

    kind: dotted name, e.g. "anomaly.start", "anomaly.end", "sensor.state", "update.result".
    source: the component or object id it concerns (loop id, sensor id, model name).
    """

    kind: str
    source: str
    t_wall: float
    t_mono: float
    fields: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out. Subscribers must be cheap (append to a queue) and not raise."""

    def __init__(self) -> None:
        self._subs: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subs.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subs.remove(fn)

        return unsubscribe

    def publish(self, kind: str, source: str, **fields: Any) -> Event:
        ev = Event(kind, source, time.time(), time.monotonic(), fields)
        for fn in list(self._subs):
            try:
                fn(ev)
            except Exception:  # one bad subscriber must not starve the others
                log.exception("event_subscriber_failed", kind=kind)
        return ev


class FatalComponentError(EdgerundError):
    """A non-restartable task of a component failed: the daemon exits non-zero."""

    def __init__(self, task_name: str, exc: BaseException) -> None:
        self.task_name = task_name
        self.exc = exc
        super().__init__(f"{task_name} failed: {exc!r}")


class Supervisor:
    """Owns every background task of the daemon.

    `spawn(name, factory, restart=True)`: a crash is logged once with the task's name and
    the task restarts after a capped, jittered exponential backoff (reset after a minute of
    healthy running). With `restart=False` a crash stops the daemon with a non-zero exit
    so systemd restarts the whole service (used where in-process recovery is unsafe).
    """

    def __init__(self, on_fatal: Callable[[FatalComponentError], None]) -> None:
        self._on_fatal = on_fatal
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.restarts: dict[str, int] = {}

    def attach(self, tg: asyncio.TaskGroup) -> None:
        """Own every later task through the daemon's TaskGroup."""
        self._tg = tg

    async def __aenter__(self) -> Supervisor:
        """Run with a TaskGroup of its own (tests, tools); the daemon uses `attach`."""
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cancel_all()
        tg, self._tg = self._tg, None
        if tg is not None:
            # Every task has ended; an exception of the body propagates as it is (the
            # TaskGroup would wrap it in an ExceptionGroup).
            await tg.__aexit__(None, None, None)

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        restart: bool = True,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> asyncio.Task[None]:
        if self._tg is None:
            raise RuntimeError(f"task {name!r}: the supervisor runs no TaskGroup (attach one)")
        task = self._tg.create_task(
            self._run(name, factory, restart, backoff_initial_s, backoff_max_s), name=name
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        restart: bool,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        backoff = backoff_initial_s
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not restart:
                    log.error("task_failed_fatal", task=name, error=repr(exc), exc_info=True)
                    self._on_fatal(FatalComponentError(name, exc))
                    return
                if time.monotonic() - started > 60.0:
                    backoff = backoff_initial_s
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.error(
                    "task_failed_restarting",
                    task=name,
                    error=repr(exc),
                    restart_in_s=round(backoff, 2),
                    exc_info=True,
                )
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, backoff_max_s)

    def scope(self, component: str) -> TaskScope:
        """A task scope for one component: the only way a component starts a task."""
        return TaskScope(self, component)

    async def cancel_all(self, timeout_s: float = 5.0) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


class TaskScope:
    """The background tasks of one component, owned by the daemon's Supervisor.

    The composition root enters a component's scope before the component and leaves it
    after the component's own `__aexit__`: leaving cancels every task the component still
    has and waits for them, so no task outlives its component and none is started any
    other way. Task names are prefixed with the component's name.
    """

    def __init__(self, supervisor: Supervisor, component: str) -> None:
        self._supervisor = supervisor
        self.component = component
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        restart: bool = True,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> asyncio.Task[None]:
        task = self._supervisor.spawn(
            f"{self.component}.{name}",
            factory,
            restart=restart,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def tasks(self) -> frozenset[asyncio.Task[None]]:
        return frozenset(self._tasks)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Cancel this component's tasks and wait up to `timeout_s` for them to end."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def __aenter__(self) -> TaskScope:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
