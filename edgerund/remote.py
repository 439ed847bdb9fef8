"""Remote (MQTT `cmd/{name}`) command routing between the components that serve commands
and the telemetry uplink that receives them.

The composition root makes one `RemoteCommands` and hands it to every component that serves
a remote command (as the `ports.CommandRouter` it registers with) and to telemetry (which
dispatches incoming requests through `handler()`). Neither side needs the other to exist
first, so there is no start-up ordering between them and no polling.

The router also holds the `CommandGate` (edgerund/twin/gate.py) that authenticates every
request before its handler runs: the root installs it (`guard`) before telemetry starts,
so no request is ever dispatched without it. Without a gate (unit tests of a handler)
requests pass as they are.
"""

from __future__ import annotations

from edgerund.ports import Admitted, CommandGate, RemoteHandler


class _Open:
    """No gate: every request passes unchanged, replies go out unsigned."""

    def admit(self, name: str, payload: bytes) -> Admitted:
        return Admitted(payload)

    async def seal(self, name: str, admitted: Admitted, reply: bytes) -> bytes:
        return reply


class RemoteCommands:
    def __init__(self) -> None:
        self._handlers: dict[str, RemoteHandler] = {}
        self.gate: CommandGate = _Open()

    def guard(self, gate: CommandGate) -> None:
        """Authenticate every request through `gate` from now on."""
        self.gate = gate

    def register(self, name: str, handler: RemoteHandler) -> None:
        if name in self._handlers:
            raise RuntimeError(f"remote command {name!r} registered twice")
        self._handlers[name] = handler

    def handler(self, name: str) -> RemoteHandler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)
