"""What the daemon's composition root gives a component, for in-process tests: a running
Supervisor (its own TaskGroup) and a component's TaskScope, so a test builds a component
through its real constructor with the ports it needs (fakes that implement them)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from edgerund.context import FatalComponentError, Supervisor, TaskScope


@contextlib.asynccontextmanager
async def supervised(
    fatal: list[FatalComponentError] | None = None,
) -> AsyncIterator[Supervisor]:
    """A Supervisor with a TaskGroup; fatal task failures are appended to `fatal`."""
    sink: list[FatalComponentError] = fatal if fatal is not None else []
    async with Supervisor(sink.append) as sup:
        yield sup


@contextlib.asynccontextmanager
async def task_scope(
    name: str, fatal: list[FatalComponentError] | None = None
) -> AsyncIterator[TaskScope]:
    """One component's scope, left (its tasks cancelled) after the component."""
    async with supervised(fatal) as sup, sup.scope(name) as scope:
        yield scope
