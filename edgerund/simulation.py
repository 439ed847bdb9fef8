"""The simulated plant behind `edgerund run --simulate` (or `simulation.enabled`).

Only the composition root (edgerund/daemon.py) imports this module, and only in
simulated mode, so neither the hub nor a production driver ever loads `drivers.emulated`.
`Simulation` builds the shared `Scenario` from `cfg.simulation`, the `SimResources` the
REAL drivers talk to (emulated devices behind real protocol code), and names the extra
actuator driver that exists only there (`emulated`, recording every command). It is the
`SimControl` the hub's `sim-inject` command drives.
"""

from __future__ import annotations

from collections.abc import Mapping

from drivers.base import Resources, SensorConfig
from drivers.emulated import actuator as emulated_actuator
from drivers.emulated.scenario import ANOMALY_KINDS, Anomaly, Scenario
from drivers.emulated.simulated import SimResources
from drivers.registry import ActuatorSpec
from edgerund.config.schema import Config


class Simulation:
    def __init__(self, cfg: Config) -> None:
        sim = cfg.simulation
        self.scenario = Scenario(
            seed=sim.seed,
            anomalies=[
                Anomaly(
                    kind=a.kind,
                    start_s=a.start_s,
                    duration_s=a.duration_s,
                    severity=a.severity,
                    sensor=a.sensor,
                )
                for a in sim.anomalies
            ],
        )
        # The emulated devices behind the transports (tests and tools reach them here).
        self.plant = SimResources(self.scenario, i2c_bus=sim.i2c_bus)

    @property
    def resources(self) -> Resources:
        return self.plant

    @property
    def actuators(self) -> Mapping[str, ActuatorSpec]:
        """Actuator drivers that exist only in simulation, by config name."""
        spec = emulated_actuator.ACTUATOR
        return {spec.name: spec}

    # -- SimControl (edgerund/hub/component.py) ------------------------------------------
    @property
    def anomaly_kinds(self) -> tuple[str, ...]:
        return ANOMALY_KINDS

    def now_s(self) -> float:
        return self.plant.now_s()

    def device_for(self, cfg: SensorConfig) -> str | None:
        return self.plant.device_for(cfg) or None

    def inject(
        self,
        kind: str,
        *,
        start_s: float,
        duration_s: float,
        severity: float,
        sensor: str | None,
    ) -> None:
        """Schedule an anomaly; ValueError when it is not one the scenario can play."""
        if kind not in ANOMALY_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(ANOMALY_KINDS)}, got {kind!r}")
        self.scenario.add_anomaly(
            Anomaly(
                kind=kind,  # checked against ANOMALY_KINDS above
                start_s=start_s,
                duration_s=duration_s,
                severity=severity,
                sensor=sensor,
            )
        )
