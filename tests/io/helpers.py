"""Helpers for tests against sysfs-shaped directory trees and the hub's acquisition task."""

from __future__ import annotations

from typing import Any

from edgerund.hub.acquire import Acquirer, SensorRuntime, make_slots


def runtime(cfg: Any, sensor: Any) -> tuple[SensorRuntime, Acquirer, list[Any]]:
    """A hub acquisition task for one driver (the real Acquirer, samples into a list)."""
    rt = SensorRuntime(
        config=cfg,
        driver_name=cfg.__struct_config__.tag,
        transport="other",
        where="test",
        sensor=sensor,
        slots=make_slots(sensor.channels, 16),
    )
    got: list[Any] = []
    acq = Acquirer(rt, lambda samples, t: got.extend(samples), lambda *a, **k: None)
    return rt, acq, got
