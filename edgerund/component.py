"""The component contract used by the composition root (edgerund/daemon.py).

A component is an async context manager that owns its resources and tasks:
`__aenter__` opens everything (and raises ConfigError/DeviceError to refuse start-up),
`__aexit__` stops tasks, drives outputs to their safe state and closes. Between the two,
the daemon asks it for its `status()` section, routes diagnostics commands from
`commands()` to it and hands it a new validated config on SIGHUP through `reload()`.

Components find each other only through the `Context` (edgerund/context.py) and public
methods; none reaches into another's internals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable


@dataclass(frozen=True, slots=True)
class Peer:
    """Credentials of a diagnostics-socket client, from SO_PEERCRED."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    privileged: bool = False  # root, or member of the daemon's admin group


class CommandError(Exception):
    """Raised by a command handler: becomes `{"ok": false, "error": {code, message}}`."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Command:
    """A diagnostics-socket command. Mutating commands need a privileged peer."""

    handler: Handler
    mutating: bool = False
    help: str = ""
    # Extra keys are read from the request line and passed in args; `stream` lets a
    # handler read more bytes from the connection (bundle upload).
    meta: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Component(Protocol):
    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def status(self) -> Any:
        """The JSON-able value of this component's section in `status`."""
        ...

    def commands(self) -> Mapping[str, Command]:
        """Diagnostics commands served by this component, by name."""
        ...


class Reloadable(Protocol):
    def reload(self, config: Any) -> None:
        """Apply what may change live from a new, already validated config."""
        ...
