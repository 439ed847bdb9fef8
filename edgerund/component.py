"""The component contract the composition root (edgerund/daemon.py) runs.

A component is an async context manager that owns its resources: `__aenter__` opens
everything (and raises ConfigError/DeviceError to refuse start-up), `__aexit__` drives
outputs to their safe state and closes. Between the two the root asks it for its
`status()` section(s), routes the diagnostics commands from `commands()` to it, and hands
it a new validated config on SIGHUP through `reload()` when it has one.

Wiring: a component receives everything it needs as constructor arguments from the root:
the config, the typed ports of its peers (edgerund/ports.py), the event sink, and its own
`TaskScope` (edgerund/context.py) when it runs background tasks. It never looks a peer up
by name, polls for one or tests one with `hasattr`; a peer that is not configured is
passed as None and the component's type says so.

Status: each component module exposes `EMPTY_STATUS`, the section(s) it reports when it is
not configured, so that `status` always carries the keys DESIGN.md promises without the
root knowing any component's fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from edgerund.errors import CommandError

if TYPE_CHECKING:
    from edgerund.config.schema import Config

__all__ = ["Command", "CommandError", "Component", "Handler", "Peer", "Reloadable"]


@dataclass(frozen=True, slots=True)
class Peer:
    """Credentials of a diagnostics-socket client, from SO_PEERCRED."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    privileged: bool = False  # root, or member of the daemon's admin group


# Socket commands take the request's JSON `args` and return a JSON-able result; they raise
# CommandError (edgerund.errors) to answer `{"ok": false, "error": {code, message}}`.
Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Command:
    """A diagnostics-socket command. Mutating commands need a privileged peer."""

    handler: Handler
    mutating: bool = False
    help: str = ""


class Component(Protocol):
    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def status(self) -> Mapping[str, object]:
        """This component's section(s) of the `status` response, by top-level key."""
        ...

    def commands(self) -> Mapping[str, Command]:
        """Diagnostics commands served by this component, by name."""
        ...


class Reloadable(Protocol):
    def reload(self, config: Config) -> None:
        """Apply what may change live from a new, already validated config."""
        ...
