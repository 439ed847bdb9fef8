"""Config structs of the simulation-only drivers, parseable without loading them.

A config names its actuator by `driver:`, and the config schema is one msgspec tagged
union over every actuator's struct, fixed when the schema is built. The emulated actuator
(drivers/emulated/actuator.py) is used by the shipped simulated config and by tests, but
production code must never load `drivers.emulated`. So its *struct* lives here, plain data
with no behaviour, and the union includes it; its *factory* joins the registry only when
the composition root runs simulated (`drivers.emulated.register_drivers()`). A production
build that names it fails when the loop's actuator is opened, naming the drivers it has.
"""

from __future__ import annotations

from drivers.base import ActuatorConfig


class EmulatedActuatorConfig(ActuatorConfig, tag="emulated", kw_only=True):
    name: str = "emulated"  # identifies the output (two loops may not share one)
    record_path: str | None = None  # append every command as a JSON line
    keep: int = 10000  # commands kept in memory
    write_latency_ms: float = 0.0
    fail_after_writes: int | None = None

    def target(self) -> str:
        return self.name


# Every simulation-only actuator struct: the schema's union adds these to the registry's.
SIMULATION_ACTUATOR_CONFIGS: tuple[type[ActuatorConfig], ...] = (EmulatedActuatorConfig,)
