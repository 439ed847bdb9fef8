"""The root config: one struct per section, each section's schema owned by its component.

Sensor and actuator entries are msgspec tagged unions on `driver:` built from
drivers.registry, so every driver validates its own keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Union

import msgspec

from drivers.base import ActuatorConfig, SensorConfig
from drivers.registry import actuator_drivers, sensor_drivers
from edgerund.config.base import Section
from edgerund.control.config import LoopConfig
from edgerund.hub.config import SimulationConfig
from edgerund.identity.config import IdentityConfig
from edgerund.inference.config import ModelConfig
from edgerund.telemetry.config import TelemetryConfig, UplinkConfig
from edgerund.updates.config import UpdatesConfig

DEFAULT_CONFIG_PATH = "/etc/edgerund/edgerund.yaml"


def _union(types: list[type[Any]], fallback: type[Any]) -> Any:
    if not types:
        return fallback
    if len(types) == 1:
        return types[0]
    return Union[tuple(types)]  # noqa: UP007 - built at run time from the registry


if TYPE_CHECKING:
    SensorEntry = SensorConfig
    ActuatorEntry = ActuatorConfig
else:
    SensorEntry = _union([s.config_type for s in sensor_drivers().values()], SensorConfig)
    ActuatorEntry = _union([s.config_type for s in actuator_drivers().values()], ActuatorConfig)


class GatewayConfig(Section):
    id: str
    site: str = "default"
    hardware_id: str = "generic"  # matched against bundle compatibility


class PathsConfig(Section):
    state_dir: str = "/var/lib/edgerund"
    run_dir: str = "/run/edgerund"


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON
    ring_size: int = 2000  # recent events kept in memory for `edgerunctl log`


class DiagConfig(Section):
    enabled: bool = True
    socket: str = "/run/edgerund/diag.sock"
    mode: int = 0o660
    group: str = "edgerund"  # members (and root) may run mutating commands
    max_request_bytes: int = 65536
    idle_timeout_s: float = 300.0
    max_clients: int = 64


class DaemonConfig(Section):
    watchdog_lag_limit_ms: float = 500.0  # WATCHDOG=1 is withheld while loop lag exceeds this
    loop_lag_interval_ms: int = 100  # how often the loop-lag monitor samples
    shutdown_timeout_s: float = 10.0
    use_uvloop: bool = True


class MetricsConfig(Section):
    # Write Prometheus text to this file every interval_s for node_exporter's textfile
    # collector (e.g. /var/lib/prometheus/node-exporter/edgerund.prom); empty: off.
    textfile: str = ""
    interval_s: float = 15.0


class Config(Section):
    gateway: GatewayConfig
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    diag: DiagConfig = msgspec.field(default_factory=DiagConfig)
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    identity: IdentityConfig = msgspec.field(default_factory=IdentityConfig)
    sensors: list[SensorEntry] = msgspec.field(default_factory=list)
    loops: list[LoopConfig] = msgspec.field(default_factory=list)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    updates: UpdatesConfig = msgspec.field(default_factory=UpdatesConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    uplink: UplinkConfig = msgspec.field(default_factory=UplinkConfig)
    simulation: SimulationConfig = msgspec.field(default_factory=SimulationConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
