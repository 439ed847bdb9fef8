"""A protocol-level stand-in for a gateway's twin (docs/twin.md §4, §5.1), for rollout tests
of the backend that need many gateways at no CPU cost.

It speaks the gateway's side of the contract on a real broker: publishes its retained
reported document, takes its retained desired document (byte-identical copies ignored, a
version not above the last one seen refused as `replay`, an expired one as `expired`, as
the daemon does), and
answers a model target with `fetching` then `committed`, or `rolled_back` when the
bundle's sha256 is one it was told is bad. It keeps every desired payload it received, so
tests can check who was targeted, when, and with what.

Model pins (docs/twin.md §5.2): with `override="V"` a technician installs V over the first
target it receives (`edgerunctl update --override-twin`): the target is reported
`overridden`/`twin_override`, `models[]` says `twin_override: true`. With
`override_before=True` it already runs that override when the rollout comes: a target of
an older version is refused with `version_rollback` (the pipeline's anti-rollback) and the
override stays reported. Every target entry carries `active_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiomqtt


class FakeGateway:
    def __init__(
        self,
        broker: Any,
        gateway: str,
        site: str,
        *,
        model: str = "motor-ae",
        version: str = "2.0.0",
        bad: frozenset[str] = frozenset(),
        delay_s: float = 0.3,
        override: str | None = None,
        override_before: bool = False,
    ) -> None:
        self.broker = broker
        self.gateway = gateway
        self.site = site
        self.model = model
        self.version = version
        self.bad = bad
        self.delay_s = delay_s
        self.override = override
        self.twin_override = False
        if override is not None and override_before:
            self.version, self.twin_override = override, True
        self.received: list[tuple[float, bytes]] = []  # every desired payload, with its time
        self.last_version: int | None = None
        self.outcome: dict[str, Any] = {}
        self.targets: dict[str, Any] = {}
        self.seq = 0
        self._client: aiomqtt.Client | None = None
        self._last_raw: bytes | None = None
        self._work: asyncio.Task[None] | None = None

    @property
    def base(self) -> str:
        return f"twin/v1/{self.site}/{self.gateway}"

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(raw)["signed"] for _, raw in self.received]

    def reported(self) -> dict[str, Any]:
        self.seq += 1
        return {
            "type": "edgerund-reported",
            "v": 1,
            "gateway": self.gateway,
            "site": self.site,
            "seq": self.seq,
            "ts": int(time.time() * 1000),
            "daemon_version": "0.1.0",
            "desired": {
                **self.outcome,
                "models": {
                    k: {**e, "active_version": self.version} for k, e in self.targets.items()
                },
            },
            "models": [
                {
                    "name": self.model,
                    "active_slot": "a",
                    "version": self.version,
                    "state": "COMMITTED",
                    **({"twin_override": True} if self.twin_override else {}),
                }
            ],
            "identity": {"kind": "software"},
            "sensors": {"total": 2, "ok": 2, "not_ok": {}},
            "spool": {"connected": True, "backlog_batches": 3},
            "errors": {},
        }

    async def report(self) -> None:
        if self._client is None:
            return  # offline: the next session reports the current state
        doc = {"signed": self.reported(), "key_id": "00", "sig": ""}
        await self._client.publish(
            f"{self.base}/reported", json.dumps(doc).encode(), qos=1, retain=True
        )

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Connected until cancelled; reconnects (every 0.3 s) when the broker goes away."""
        while True:
            try:
                await self._session(ready)
            except aiomqtt.MqttError:
                self._client = None
                await asyncio.sleep(0.3)

    async def _session(self, ready: asyncio.Event | None) -> None:
        async with aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=f"fake-{self.gateway}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as c:
            self._client = c
            await self.report()
            await c.subscribe(f"{self.base}/desired", qos=1)
            if ready is not None:
                ready.set()
            async for msg in c.messages:
                raw = msg.payload if isinstance(msg.payload, bytes) else b""
                if not raw or raw == self._last_raw:
                    continue  # a byte-identical copy: judged already
                self._last_raw = raw
                self.received.append((time.monotonic(), raw))
                await self._desired(json.loads(raw)["signed"])

    async def _desired(self, doc: dict[str, Any]) -> None:
        v = doc["version"]
        if doc["expires"] <= time.time() * 1000:
            self.outcome = {"version": None, "outcome": "refused", "reason": "expired"}
            await self.report()
            return
        if self.last_version is not None and v <= self.last_version:
            self.outcome = {"version": None, "outcome": "refused", "reason": "replay"}
            await self.report()
            return
        self.last_version = v
        self.outcome = {"applied_version": v, "version": v, "outcome": "applied"}
        target = doc.get("models", {}).get(self.model)
        if self._work is not None:
            self._work.cancel()
        if target is None:
            self.targets.pop(self.model, None)
            await self.report()
            return
        entry = {
            "version": target["version"],
            "sha256": target["sha256"],
            "desired_version": v,
            "state": "fetching",
            "reason": None,
        }
        self.targets[self.model] = entry
        if target["version"] == self.version:
            entry["state"] = "committed"
            await self.report()
            return
        if self.twin_override and _older(target["version"], self.version):
            entry["state"], entry["reason"] = "refused", "version_rollback"
            await self.report()
            return
        await self.report()
        self._work = asyncio.create_task(self._install(entry))

    async def _install(self, entry: dict[str, Any]) -> None:
        await asyncio.sleep(self.delay_s)
        if self.override is not None and not self.twin_override:
            # the technician's --override-twin lands first; the target's own job would
            # then be refused as a rollback and the gateway keeps reporting the override
            self.version, self.twin_override = self.override, True
            entry["state"], entry["reason"] = "overridden", "twin_override"
            await self.report()
            return
        entry["state"] = "probation"
        await self.report()
        await asyncio.sleep(self.delay_s)
        if entry["sha256"] in self.bad:
            entry["state"], entry["reason"] = "rolled_back", "probation_faults"
        else:
            entry["state"] = "committed"
            self.version = entry["version"]
        await self.report()


def _older(a: str, b: str) -> bool:
    return tuple(int(x) for x in a.split(".")) < tuple(int(x) for x in b.split("."))


class Fleet:
    """N fake gateways as tasks of the running loop."""

    def __init__(self, gateways: list[FakeGateway]) -> None:
        self.gateways = {g.gateway: g for g in gateways}
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Fleet:
        evs = []
        for g in self.gateways.values():
            ev = asyncio.Event()
            evs.append(ev)
            self.tasks.append(asyncio.create_task(g.run(ev)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in evs)), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await t
