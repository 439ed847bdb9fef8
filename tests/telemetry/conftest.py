"""Helpers for telemetry tests: a hub stand-in that speaks the part of the SampleSource
port telemetry uses (`channels`, `subscribe`), a Context builder, the component built as
the composition root builds it (in its own task scope), and a consumer running against
the broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest_asyncio

from drivers.base import Sample
from edgerund.backend.consumer import Consumer, run
from edgerund.config.schema import Config
from edgerund.context import Context, FatalComponentError, Supervisor
from edgerund.identity.component import build as build_identity
from edgerund.remote import RemoteCommands
from edgerund.telemetry.component import TelemetryComponent
from tests.helpers.daemon import deep_merge


class HubStandIn:
    """Speaks the hub's public interface: channels() and subscribe(fn)."""

    def __init__(self, channels: list[tuple[str, str, str]]) -> None:
        self._channels = channels
        self._subs: list[Callable[[Sample], None]] = []

    def channels(self) -> list[tuple[str, str, str]]:
        return list(self._channels)

    def subscribe(self, fn: Callable[[Sample], None]) -> Callable[[], None]:
        self._subs.append(fn)
        return lambda: self._subs.remove(fn)

    def emit(
        self, sensor: str, channel: str, value: float, t_wall: float | None = None, unit: str = ""
    ) -> None:
        t_wall = time.time() if t_wall is None else t_wall
        s = Sample(sensor, channel, time.monotonic(), t_wall, value, unit)
        for fn in list(self._subs):
            fn(s)


def make_config(tmp_path: Path, broker: Any | None, **over: Any) -> Config:
    base: dict[str, Any] = {
        "gateway": {"id": "gw1", "site": "lab"},
        "paths": {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
        "identity": {"kind": "software"},
        "telemetry": {
            "batch_max_age_s": 1.0,
            "agg_interval_s": 2.0,
            "commit_interval_ms": 100,
            "series": [{"match": "env.*", "scale_exp": -2, "raw": True}],
        },
        "uplink": {
            "enabled": broker is not None,
            "host": "127.0.0.1",
            "port": broker.port if broker is not None else 1883,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            "ack_timeout_s": 10.0,
            "replay_bytes_per_s": 10_000_000,
            "replay_burst_bytes": 10_000_000,
        },
    }
    return msgspec.convert(deep_merge(base, over), Config)


def make_ctx(cfg: Config, tmp_path: Path) -> Context:
    fatal: list[FatalComponentError] = []
    return Context(
        config=cfg, config_path=tmp_path / "edgerund.yaml", supervisor=Supervisor(fatal.append)
    )


@contextlib.asynccontextmanager
async def identity_in(ctx: Context) -> AsyncIterator[Any]:
    comp = build_identity(ctx)
    async with comp:
        ctx.components["identity"] = comp
        yield comp


@contextlib.asynccontextmanager
async def telemetry_in(
    ctx: Context,
    samples: HubStandIn | None = None,
    *,
    signer: Any | None = None,
    router: RemoteCommands | None = None,
) -> AsyncIterator[TelemetryComponent]:
    """The component with its ports, inside its task scope (as the daemon's root does)."""
    async with ctx.supervisor.scope("telemetry") as scope:
        comp = TelemetryComponent(
            ctx.config,
            scope=scope,
            events=ctx.events,
            samples=samples,  # type: ignore[arg-type]
            signer=signer,
            router=router if router is not None else RemoteCommands(),
        )
        async with comp:
            yield comp


async def until(pred: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `pred` until true; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(0.02)


class Collector:
    """Runs the reference consumer against the broker and keeps every record."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.records: list[dict[str, Any]] = []

    def write(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        pass

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    def seqs(self) -> set[tuple[int, int]]:
        return {
            (r["epoch"], r["seq"])
            for r in self.records
            if r.get("type") in ("series", "event", "loss", "empty")
        }

    async def wait_for(self, pred: Callable[[], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met within {timeout_s} s; counts={self.consumer.counts}"
                )
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def collector_factory() -> AsyncIterator[Callable[..., Any]]:
    tasks: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def start(
        broker: Any,
        *,
        public_keys: list[Any] = (),
        client_id: str = "test-consumer",  # type: ignore[assignment]
        require_signature: bool = False,
        group: str | None = "edgerund",
        resend_after_s: float | None = None,
    ) -> Collector:
        c = Collector(Consumer(public_keys=public_keys, require_signature=require_signature))
        stop = asyncio.Event()
        ready = asyncio.Event()
        t = asyncio.create_task(
            run(
                c.consumer,
                c,
                host=broker.host,
                port=broker.port,  # type: ignore[arg-type]
                client_id=client_id,
                stop=stop,
                ready=ready,
                group=group,
                resend_after_s=resend_after_s,
            )
        )
        tasks.append((t, stop))
        # The subscription must exist before the gateway publishes.
        await asyncio.wait_for(ready.wait(), 15)
        return c

    yield start
    for _, stop in tasks:
        stop.set()
    for t, _ in tasks:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(t, 5)
