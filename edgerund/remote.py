"""Remote (MQTT `cmd/{name}`) command routing between the components that serve commands
and the telemetry uplink that receives them.

The composition root makes one `RemoteCommands` and hands it to every component that serves
a remote command (as the `ports.CommandRouter` it registers with) and to telemetry (which
dispatches incoming requests through `handler()`). Neither side needs the other to exist
first, so there is no start-up ordering between them and no polling.
"""

from __future__ import annotations

from edgerund.ports import RemoteHandler


class RemoteCommands:
    def __init__(self) -> None:
        self._handlers: dict[str, RemoteHandler] = {}

    def register(self, name: str, handler: RemoteHandler) -> None:
        if name in self._handlers:
            raise RuntimeError(f"remote command {name!r} registered twice")
        self._handlers[name] = handler

    def handler(self, name: str) -> RemoteHandler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)
