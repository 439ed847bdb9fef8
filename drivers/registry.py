"""Driver registry: the config's `driver:` name -> config struct and factory.

The list of driver modules is explicit (no entry-point magic on a gateway): each module
named in SENSOR_MODULES defines `SENSOR = SensorSpec(...)` and may define
`ACTUATOR = ActuatorSpec(...)`; each module in ACTUATOR_MODULES defines `ACTUATOR`.
These are the production drivers only: nothing here loads `drivers.emulated`.

Simulation-only drivers (the emulated actuator that records what a loop commanded) are
split in two. Their config structs live in drivers/simulation.py, beside the production
ones, so every config parses the same whether or not it will run simulated (`edgerund
check-config` validates the shipped simulated config like any other). Their factories live
in drivers/emulated/ and enter the registry only when the composition root, having chosen
simulated resources, calls `drivers.emulated.register_drivers()` (which calls
`register_actuator` here). A production run that names one fails at build time with the
list of the drivers it does have.

`sensor_config_union()` and `actuator_config_union()` are the msgspec tagged unions on
`driver:` that the config schema uses for `sensors[]` and `loops[].actuator`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union

from drivers.base import ActuatorConfig, ActuatorDriver, Resources, SensorConfig
from drivers.simulation import SIMULATION_ACTUATOR_CONFIGS

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
    "drivers.w1",
    "drivers.gpio_input",
)
ACTUATOR_MODULES: tuple[str, ...] = (
    "drivers.i2c.actuator",
    "drivers.serial.actuator",
    "drivers.serial.modbus_actuator",
    "drivers.i2c.pca9685",
    "drivers.gpio",
    "drivers.pwm_sysfs",
    "drivers.mqtt_command",
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
def _actuators() -> dict[str, ActuatorSpec]:
    out = _load(SENSOR_MODULES, "ACTUATOR")
    out.update(_load(ACTUATOR_MODULES, "ACTUATOR"))
    return out


def actuator_drivers() -> Mapping[str, ActuatorSpec]:
    """The production actuators, plus any simulation-only one the root registered."""
    return _actuators()


def register_actuator(spec: ActuatorSpec) -> None:
    """Add a simulation-only actuator's factory (drivers.emulated.register_drivers).

    Only a driver whose config struct the schema already knows (drivers/simulation.py)
    may be added: the config was parsed before anything was registered. Registering the
    same spec again is a no-op, so a root built twice in one process (tests) is fine.
    """
    if spec.config_type not in SIMULATION_ACTUATOR_CONFIGS:
        raise ValueError(
            f"actuator driver {spec.name!r}: expected a config struct listed in "
            f"drivers/simulation.py, got {spec.config_type.__name__}"
        )
    table = _actuators()
    have = table.get(spec.name)
    if have is not None and have != spec:
        raise ValueError(f"actuator driver {spec.name!r} is already registered")
    table[spec.name] = spec


def _tagged_union(types: list[type[Any]], fallback: type[Any]) -> Any:
    if not types:
        return fallback
    if len(types) == 1:
        return types[0]
    return Union[tuple(types)]  # noqa: UP007 - built at run time from the registry


def sensor_config_union() -> Any:
    """The `sensors[]` entry type: one struct per sensor driver, tagged on `driver:`."""
    return _tagged_union([s.config_type for s in sensor_drivers().values()], SensorConfig)


def actuator_config_union() -> Any:
    """The `loops[].actuator` type: every actuator's struct, simulation-only ones included."""
    production = [s.config_type for s in _actuators().values()]
    extra = [t for t in SIMULATION_ACTUATOR_CONFIGS if t not in production]
    return _tagged_union([*production, *extra], ActuatorConfig)
