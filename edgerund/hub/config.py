"""Schema of the `simulation` section, and the cross-field checks of `sensors`.

The `sensors` list itself is a tagged union built from drivers.registry (each driver
validates its own keys, e.g. a legal I2C address for its part). What no single entry can
check is done here, in `cross_check(cfg)`, which the config loader calls and decorates
with FILE:LINE:

- sensor ids are unique (loops and telemetry name sensors by id);
- the common acquisition keys are in range (rate, timeout, retries, fail_after, ...);
- no two sensors claim one I2C address on one bus;
- a serial port is shared only by Modbus units (one RS-485 line, one master);
- `sim://` ports appear only when simulation is enabled, and name a known emulator;
  in simulated mode I2C sensors sit on `simulation.i2c_bus`.

`driver_names()` lists the registered `driver:` names, for the loader's "did you mean".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

from drivers.base import SensorConfig
from drivers.registry import sensor_drivers
from edgerund.config.base import Section

# The serial URLs the simulated resources (drivers/emulated/simulated.py) understand.
SIM_PORTS: tuple[str, ...] = ("sim://gps", "sim://modbus", "sim://line", "sim://cobs")
MAX_RATE_HZ = 1000.0


class AnomalyConfig(Section):
    """An anomaly scheduled in the simulated plant (see drivers/emulated/scenario.py)."""

    kind: Literal["bearing_wear", "overheat", "voltage_sag", "dropout", "nack_storm"]
    start_s: float  # seconds after the daemon started
    duration_s: float
    severity: float = 1.0
    sensor: str | None = None  # dropout only: emulated device that goes silent (None: all)


class SimulationConfig(Section):
    """Emulated devices fed by one seeded scenario instead of real wiring (--simulate)."""

    enabled: bool = False
    seed: int = 42
    anomalies: list[AnomalyConfig] = msgspec.field(default_factory=list)
    i2c_bus: int = 1  # the bus number the emulated I2C parts are attached to


def driver_names() -> list[str]:
    """Every `driver:` name a sensor entry may use (for "did you mean")."""
    return sorted(sensor_drivers())


class _Sensors(Protocol):
    """What `cross_check` reads of the root config (edgerund/config/schema.py)."""

    @property
    def sensors(self) -> Sequence[SensorConfig]: ...
    @property
    def simulation(self) -> SimulationConfig: ...


def cross_check(cfg: _Sensors) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    ids: dict[str, int] = {}
    i2c: dict[tuple[int, int], tuple[int, str]] = {}
    ports: dict[str, list[tuple[int, str, str]]] = {}
    sim = cfg.simulation.enabled

    for i, s in enumerate(cfg.sensors):
        where = f"sensors[{i}]"
        driver = str(getattr(s.__struct_config__, "tag", "") or "")
        if s.id in ids:
            errors.append(
                (
                    f"{where}.id",
                    f"duplicate sensor id {s.id!r} (first used by "
                    f"sensors[{ids[s.id]}]); ids must be unique",
                )
            )
        else:
            ids[s.id] = i
        if not s.id or not s.id.replace("_", "").replace("-", "").replace(".", "").isalnum():
            errors.append(
                (f"{where}.id", f"expected letters, digits, '_', '-' or '.', got {s.id!r}")
            )
        if not 0 < s.rate_hz <= MAX_RATE_HZ:
            errors.append(
                (f"{where}.rate_hz", f"expected 0 < rate_hz <= {MAX_RATE_HZ:g}, got {s.rate_hz}")
            )
        if s.read_timeout_ms <= 0:
            errors.append((f"{where}.read_timeout_ms", f"expected > 0, got {s.read_timeout_ms}"))
        if s.retries < 0:
            errors.append((f"{where}.retries", f"expected >= 0, got {s.retries}"))
        if s.fail_after < 1:
            errors.append((f"{where}.fail_after", f"expected >= 1, got {s.fail_after}"))
        if s.reprobe_s <= 0:
            errors.append((f"{where}.reprobe_s", f"expected > 0, got {s.reprobe_s}"))
        if s.window < 1:
            errors.append((f"{where}.window", f"expected >= 1 sample, got {s.window}"))

        bus = getattr(s, "bus", None)
        addr = getattr(s, "address", None)
        if isinstance(bus, int) and isinstance(addr, int) and s.enabled:
            if sim and bus != cfg.simulation.i2c_bus:
                errors.append(
                    (
                        f"{where}.bus",
                        f"in simulated mode the emulated I2C parts are on bus "
                        f"{cfg.simulation.i2c_bus} (simulation.i2c_bus), got bus {bus}",
                    )
                )
            other = i2c.get((bus, addr))
            if other is not None:
                errors.append(
                    (
                        f"{where}.address",
                        f"I2C bus {bus} address 0x{addr:02x} is "
                        f"already used by sensor {other[1]!r} (sensors[{other[0]}]); "
                        "two devices cannot share an address on one bus",
                    )
                )
            else:
                i2c[(bus, addr)] = (i, s.id)

        port = getattr(s, "port", None)
        if isinstance(port, str) and s.enabled:
            ports.setdefault(port, []).append((i, s.id, driver))
            if port.startswith("sim://"):
                if not sim:
                    errors.append(
                        (
                            f"{where}.port",
                            f"{port!r} is an emulated port: enable "
                            "`simulation.enabled` (or run with --simulate), or name a "
                            "real device such as /dev/ttyUSB0",
                        )
                    )
                elif port not in SIM_PORTS:
                    errors.append(
                        (f"{where}.port", f"expected one of {', '.join(SIM_PORTS)}, got {port!r}")
                    )

    for port, users in ports.items():
        if len(users) > 1 and any(d != "modbus" for _, _, d in users):
            first = users[0]
            for i, sid, _ in users[1:]:
                errors.append(
                    (
                        f"sensors[{i}].port",
                        f"port {port!r} is already used by "
                        f"sensor {first[1]!r} (sensors[{first[0]}]); only modbus units "
                        f"may share a port, {sid!r} needs its own",
                    )
                )

    for k, a in enumerate(cfg.simulation.anomalies):
        where = f"simulation.anomalies[{k}]"
        if a.duration_s <= 0:
            errors.append((f"{where}.duration_s", f"expected > 0, got {a.duration_s}"))
        if a.start_s < 0:
            errors.append((f"{where}.start_s", f"expected >= 0, got {a.start_s}"))
        if a.severity < 0:
            errors.append((f"{where}.severity", f"expected >= 0, got {a.severity}"))
        if a.sensor is not None and a.kind != "dropout":
            errors.append(
                (
                    f"{where}.sensor",
                    f"only a dropout names a sensor, got sensor for kind {a.kind!r}",
                )
            )
    return errors
