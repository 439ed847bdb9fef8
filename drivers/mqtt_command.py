"""The `mqtt` actuator: a loop's command sent upstream as an event instead of to a device.

Theory of operation
-------------------
Some outputs are not wired to the gateway: a PLC or a SCADA system elsewhere acts on the
gateway's decision. This actuator turns each write into a call of a *sink*
`(command, value) -> None` that the control component binds to the daemon's event bus
(`ctx.events.publish("actuator.command", loop_id, command=..., value=...)`); the
telemetry uplink forwards those events over MQTT. Drivers never import the daemon, so the
sink is bound after construction (`bind()`), and a write before binding is a DeviceError
rather than a silently dropped command.

The safe state is published like any other value (on start, shutdown and fault), so the
receiving side sees the gateway going safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drivers.base import ActuatorConfig, DeviceError, Resources
from drivers.registry import ActuatorSpec

Sink = Callable[[str, float], None]


class MqttCommandConfig(ActuatorConfig, tag="mqtt", kw_only=True):
    command: str  # the command name the uplink publishes under, e.g. "conveyor_stop"

    def target(self) -> str:
        return self.command


class MqttCommandActuator:
    def __init__(self, cfg: MqttCommandConfig) -> None:
        self.cfg = cfg
        self.sink: Sink | None = None
        self.value: float | None = None
        self.writes = 0

    def bind(self, sink: Sink) -> None:
        self.sink = sink

    async def open(self) -> None:
        if self.sink is None:
            raise DeviceError(f"mqtt actuator {self.cfg.command!r}: no uplink sink bound")

    async def write(self, value: float) -> None:
        if self.sink is None:
            raise DeviceError(f"mqtt actuator {self.cfg.command!r}: no uplink sink bound")
        self.sink(self.cfg.command, float(value))
        self.value = float(value)
        self.writes += 1

    async def close(self) -> None:
        pass


def _factory(cfg: Any, resources: Resources) -> MqttCommandActuator:
    return MqttCommandActuator(cfg)


ACTUATOR = ActuatorSpec(
    name="mqtt",
    config_type=MqttCommandConfig,
    factory=_factory,
    summary="publishes the command as an `actuator.command` event for the MQTT uplink",
)
