"""The root config: the one table of sections, and the one table of their cross-checks.

`Config` has one field per top-level YAML section; each section's struct is owned by the
component that reads it (edgerund/<capability>/config.py, the foundation's in
edgerund/config/foundation.py). `sensors[]` and `loops[].actuator` are msgspec tagged
unions on `driver:` built from drivers.registry, so every driver validates its own keys.

`CROSS_CHECKS` lists, in the order their problems are reported, the checks that need more
than one section (a loop naming an unknown sensor). Each section module's `cross_check`
states what it reads as a small Protocol, which `Config` satisfies structurally, so the
section modules never import this one: dependencies run one way, from here to them, and
mypy checks every row of the table against `Config`.

Adding a section: its struct in the owning component's config.py (importing only
edgerund.config.base and drivers), a field on `Config`, and, if it has checks that span
keys or sections, a row in `CROSS_CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from drivers.base import SensorConfig
from drivers.registry import sensor_config_union
from edgerund.config import foundation
from edgerund.config.base import Section
from edgerund.config.foundation import (
    DaemonConfig,
    DiagConfig,
    GatewayConfig,
    LoggingConfig,
    MetricsConfig,
    PathsConfig,
)
from edgerund.control import config as control
from edgerund.control.config import LoopConfig
from edgerund.hub import config as hub
from edgerund.hub.config import SimulationConfig
from edgerund.identity import config as identity
from edgerund.identity.config import IdentityConfig
from edgerund.inference import config as inference
from edgerund.inference.config import ModelConfig
from edgerund.telemetry import config as telemetry
from edgerund.telemetry.config import TelemetryConfig, UplinkConfig
from edgerund.twin import config as twin
from edgerund.twin.config import TwinConfig
from edgerund.updates import config as updates
from edgerund.updates.config import UpdatesConfig

__all__ = [
    "CROSS_CHECKS",
    "DEFAULT_CONFIG_PATH",
    "Config",
    "CrossCheck",
    "DaemonConfig",
    "DiagConfig",
    "GatewayConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PathsConfig",
    "Problem",
    "SensorEntry",
]

DEFAULT_CONFIG_PATH = "/etc/edgerund/edgerund.yaml"

if TYPE_CHECKING:
    SensorEntry = SensorConfig
else:
    SensorEntry = sensor_config_union()


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
    twin: TwinConfig = msgspec.field(default_factory=TwinConfig)


Problem = tuple[str, str]  # (key.path, message): the loader adds FILE:LINE
CrossCheck = Callable[[Config], list[Problem]]

CROSS_CHECKS: tuple[CrossCheck, ...] = (
    foundation.cross_check,  # gateway, paths, diag, daemon
    hub.cross_check,  # sensors, simulation
    inference.cross_check,  # models
    control.cross_check,  # loops against sensors and models
    identity.cross_check,  # identity
    updates.cross_check,  # updates against models
    telemetry.cross_check,  # telemetry, uplink against sensors and gateway
    twin.cross_check,  # twin.fetch's TLS files
)
