"""Fixtures for hub tests: a real event bus and task scope around a SensorHub."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
import pytest

from drivers.base import SensorConfig
from edgerund.config.schema import Config
from edgerund.context import Event, EventBus, TaskScope
from edgerund.hub.component import SensorHub
from tests.helpers.wiring import task_scope
from tests.hub.fakes import FAKE_DRIVERS, FakeConfig, FakeStreamConfig


def make_config(extra: dict[str, Any] | None = None) -> Config:
    return msgspec.convert({"gateway": {"id": "test-gw"}, **(extra or {})}, Config)


def fake(id: str, **kw: Any) -> FakeConfig:
    return FakeConfig(id=id, **kw)


def fake_stream(id: str, **kw: Any) -> FakeStreamConfig:
    return FakeStreamConfig(id=id, **kw)


class HubHarness:
    def __init__(self, hub: SensorHub, bus: EventBus, events: list[Event]) -> None:
        self.hub = hub
        self.bus = bus
        self.events = events

    def driver(self, sid: str) -> Any:
        return self.hub._rts[sid].sensor

    def states(self, sid: str) -> list[str]:
        return [
            e.fields["state"] for e in self.events if e.kind == "sensor.state" and e.source == sid
        ]


@pytest.fixture
async def hub_scope() -> AsyncIterator[TaskScope]:
    """The hub's task scope, on a running supervisor."""
    async with task_scope("hub") as scope:
        yield scope


@pytest.fixture
async def fake_hub() -> AsyncIterator[Callable[[Sequence[SensorConfig]], Any]]:
    """Factory: `async with (await fake_hub([...])) as h:` is awkward, so the factory
    enters the hub itself and the fixture exits it."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(sensors: Sequence[SensorConfig]) -> HubHarness:
            bus = EventBus()
            events: list[Event] = []
            bus.subscribe(events.append)
            scope = await stack.enter_async_context(task_scope("hub"))
            hub = SensorHub(sensors, _NoResources(), scope=scope, events=bus, drivers=FAKE_DRIVERS)
            await stack.enter_async_context(hub)
            return HubHarness(hub, bus, events)

        yield start  # type: ignore[misc]


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
