"""An emulated actuator for tests and simulated mode: records every command it is given.

Theory of operation
-------------------
It stands where a relay, a VFD register or a GPIO line would be and keeps the facts a test
or a technician wants about the commands a loop sent: every write as
`(t_mono, t_wall, value)` in a bounded in-memory list (`commands`, newest last; at most
`keep` entries, so a long simulation cannot grow memory without bound), the current value,
and a write count. With `record_path` set it also appends each command as one JSON line
(`{"t_mono":..., "t_wall":..., "value":..., "name":...}`) so a test that runs the daemon
as a subprocess can read what the actuator received. The file write is a few microseconds
of buffered I/O flushed per line (a test artefact, not a production path).

`write_latency_ms` emulates a slow output (e.g. a Modbus round trip) with an
`asyncio.sleep`; `fail_after_writes` makes every write after the n-th raise DeviceError,
to test the fault path.

Its config struct lives in drivers/simulation.py (so any config parses without loading
this package); `ACTUATOR` enters the driver registry only through
`drivers.emulated.register_drivers()`, which the composition root calls in simulated mode.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import IO, Any

from drivers.base import DeviceError, Resources
from drivers.registry import ActuatorSpec
from drivers.simulation import EmulatedActuatorConfig

__all__ = ["ACTUATOR", "EmulatedActuator", "EmulatedActuatorConfig"]


class EmulatedActuator:
    def __init__(self, cfg: EmulatedActuatorConfig) -> None:
        self.cfg = cfg
        self.commands: deque[tuple[float, float, float]] = deque(maxlen=max(1, cfg.keep))
        self.value: float | None = None
        self.writes = 0
        self.is_open = False
        self._file: IO[str] | None = None

    async def open(self) -> None:
        if self.cfg.record_path is not None:
            # line-buffered append: each command is on disk when write() returns
            self._file = open(self.cfg.record_path, "a", buffering=1, encoding="utf-8")  # noqa: ASYNC230
        self.is_open = True

    async def write(self, value: float) -> None:
        if not self.is_open:
            raise DeviceError(f"emulated actuator {self.cfg.name!r} is not open")
        if self.cfg.fail_after_writes is not None and self.writes >= self.cfg.fail_after_writes:
            self.writes += 1
            raise DeviceError(
                f"emulated actuator {self.cfg.name!r}: injected fault after "
                f"{self.cfg.fail_after_writes} writes"
            )
        if self.cfg.write_latency_ms > 0:
            await asyncio.sleep(self.cfg.write_latency_ms / 1000.0)
        t_mono, t_wall = time.monotonic(), time.time()
        self.commands.append((t_mono, t_wall, float(value)))
        self.value = float(value)
        self.writes += 1
        if self._file is not None:
            rec: dict[str, Any] = {
                "t_mono": t_mono,
                "t_wall": t_wall,
                "value": float(value),
                "name": self.cfg.name,
            }
            self._file.write(json.dumps(rec) + "\n")

    async def close(self) -> None:
        self.is_open = False
        if self._file is not None:
            self._file.close()
            self._file = None


def _factory(cfg: Any, resources: Resources) -> EmulatedActuator:
    return EmulatedActuator(cfg)


ACTUATOR = ActuatorSpec(
    name="emulated",
    config_type=EmulatedActuatorConfig,
    factory=_factory,
    summary="records every command with timestamps (tests, simulated mode)",
)
