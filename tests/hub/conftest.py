"""Fixtures for hub tests: a real Context (event bus, supervisor) around a SensorHub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from drivers.base import SensorConfig
from edgerund.config.schema import Config
from edgerund.context import Context, Event, Supervisor
from edgerund.hub.component import SensorHub
from tests.hub.fakes import FAKE_DRIVERS, FakeConfig, FakeStreamConfig


def make_ctx(extra: dict[str, Any] | None = None) -> Context:
    cfg = msgspec.convert({"gateway": {"id": "test-gw"}, **(extra or {})}, Config)
    fatal: list[Any] = []
    return Context(
        config=cfg,
        config_path=Path("/nonexistent.yaml"),
        supervisor=Supervisor(on_fatal=fatal.append),
    )


def fake(id: str, **kw: Any) -> FakeConfig:
    return FakeConfig(id=id, **kw)


def fake_stream(id: str, **kw: Any) -> FakeStreamConfig:
    return FakeStreamConfig(id=id, **kw)


class HubHarness:
    def __init__(self, hub: SensorHub, ctx: Context, events: list[Event]) -> None:
        self.hub = hub
        self.ctx = ctx
        self.events = events

    def driver(self, sid: str) -> Any:
        return self.hub._rts[sid].sensor

    def states(self, sid: str) -> list[str]:
        return [
            e.fields["state"] for e in self.events if e.kind == "sensor.state" and e.source == sid
        ]


@pytest.fixture
async def fake_hub() -> AsyncIterator[Callable[[Sequence[SensorConfig]], Any]]:
    """Factory: `async with (await fake_hub([...])) as h:` is awkward, so the factory
    enters the hub itself and the fixture exits it."""
    hubs: list[SensorHub] = []

    async def start(sensors: Sequence[SensorConfig]) -> HubHarness:
        ctx = make_ctx()
        events: list[Event] = []
        ctx.events.subscribe(events.append)
        hub = SensorHub(sensors, _NoResources(), ctx=ctx, drivers=FAKE_DRIVERS)
        await hub.__aenter__()
        hubs.append(hub)
        return HubHarness(hub, ctx, events)

    yield start  # type: ignore[misc]
    for h in hubs:
        await h.__aexit__(None, None, None)


async def wait_for(pred: Any, within_s: float = 5.0, step: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


class _NoResources:
    def i2c_bus(self, bus: int) -> Any:
        raise AssertionError("fake drivers use no bus")

    def serial_port(self, url: str, **settings: Any) -> Any:
        raise AssertionError("fake drivers use no port")
