"""The simulator's `nack_storm` fault (added for the soak harness): seeded, partial, and
seen by the I2C bus as NACKs of the named device only."""

from __future__ import annotations

import errno

import pytest

from drivers.emulated.scenario import Anomaly, Scenario
from drivers.emulated.simulated import SimResources


def _pattern(seed: int, severity: float) -> list[bool]:
    sc = Scenario(seed=seed, anomalies=[Anomaly("nack_storm", 10.0, 5.0, severity, "bme280")])
    return [sc.is_nacked("bme280", 10.0 + i / 1000) for i in range(4000)]


def test_nack_storm_is_seeded_partial_and_scoped() -> None:
    a, b, c = _pattern(1, 0.5), _pattern(1, 0.5), _pattern(2, 0.5)
    assert a == b and a != c
    assert 0.4 < sum(a) / len(a) < 0.6
    assert all(_pattern(1, 1.0)) and not any(_pattern(1, 0.0))
    sc = Scenario(seed=1, anomalies=[Anomaly("nack_storm", 10.0, 5.0, 1.0, "bme280")])
    assert not sc.is_nacked("sht", 12.0)  # other devices answer
    assert not sc.is_nacked("bme280", 9.99) and not sc.is_nacked("bme280", 15.01)


def test_nack_storm_reaches_the_bus_as_address_nacks() -> None:
    t = [0.0]
    res = SimResources(Scenario(seed=3), i2c_bus=1, clock=lambda: t[0])
    res.scenario.add_anomaly(Anomaly("nack_storm", 0.0, 100.0, 1.0, "bme280"))
    bus = res._build_i2c()
    with pytest.raises(OSError) as ei:
        bus.read_byte_data(0x76, 0xD0)
    assert ei.value.errno == errno.ENXIO
    assert isinstance(bus.read_byte_data(0x40, 0x00), int)  # the ina219 still answers
