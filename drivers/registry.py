"""Driver registry: the config's `driver:` name -> config struct and factory.

The list of driver modules is explicit (no entry-point magic on a gateway): each module
named in SENSOR_MODULES defines `SENSOR = SensorSpec(...)` and may define
`ACTUATOR = ActuatorSpec(...)`; each module in ACTUATOR_MODULES defines `ACTUATOR`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from drivers.base import ActuatorConfig, ActuatorDriver, Resources, SensorConfig

SENSOR_MODULES: tuple[str, ...] = (
    "drivers.i2c.bme280",
    "drivers.i2c.sht",
    "drivers.i2c.ads1115",
    "drivers.i2c.mpu6050",
    "drivers.i2c.ina219",
    "drivers.serial.line",
    "drivers.serial.nmea",
    "drivers.serial.modbus",
    "drivers.serial.cobs",
)
ACTUATOR_MODULES: tuple[str, ...] = (
    "drivers.i2c.actuator",
    "drivers.serial.actuator",
    "drivers.serial.modbus_actuator",
    "drivers.gpio",
    "drivers.mqtt_command",
    "drivers.emulated.actuator",
)


@dataclass(frozen=True)
class SensorSpec:
    name: str
    config_type: type[SensorConfig]
    factory: Callable[[Any, Resources], Any]  # (config, resources) -> PolledSensor | StreamSensor
    transport: Literal["i2c", "serial", "other"]
    summary: str


@dataclass(frozen=True)
class ActuatorSpec:
    name: str
    config_type: type[ActuatorConfig]
    factory: Callable[[Any, Resources], ActuatorDriver]
    summary: str


def _load(modules: tuple[str, ...], attr: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mod_name in modules:
        # The module lists above are the one place that names every driver.
        mod = importlib.import_module(mod_name)
        spec = getattr(mod, attr, None)
        if spec is not None:
            out[spec.name] = spec
    return out


@cache
def sensor_drivers() -> Mapping[str, SensorSpec]:
    return _load(SENSOR_MODULES, "SENSOR")


@cache
def actuator_drivers() -> Mapping[str, ActuatorSpec]:
    out = _load(SENSOR_MODULES, "ACTUATOR")
    out.update(_load(ACTUATOR_MODULES, "ACTUATOR"))
    return out
