"""The rollout driver: MQTT and PostgreSQL around the pure decisions of rollout.py.

One loop, one rollout. Each turn it feeds the machine every targeted gateway's latest
reported document (`twin/v1/{site}/{gw}/reported`, retained, kept by `TwinCache`) and the
time, then, in this order:

1. builds the desired documents the machine asked for (`Send`): the gateway's current
   desired document (the retained one on the broker, else the last one in `twins`) with
   its config patch and other model targets kept, this rollout's target set, the version
   above every version the gateway or the database has seen, signed by the operator key;
2. writes the decisions and those documents to the database in one transaction
   (`RolloutStore.save`), which refuses if `fleet abort` got there first;
3. only then publishes the documents (retained, QoS 1) and reports progress.

So a tool killed anywhere resumes (`fleet rollout --resume ID`) from the database: targets
that are `committed`, `failed` or `overridden` are never sent again, and targets that are
`sent` get the SAME stored bytes again (a gateway ignores a byte-identical desired
document; a re-signed one with the same version would be refused as a replay) when the
broker does not hold them.
A stored document that has expired, or expires within RESIGN_MARGIN_S (the tool was
stopped for days; documents live 7 days), would be refused as `expired`: it is re-signed
with the same content under the next version, stored, then sent (event `resigned`). It waits for the next reported
change or one second, whichever comes first (timeouts and soaks are checked each turn).

`fleet abort --revert` (`revert`) publishes, to every gateway the rollout reached, a
desired document whose target for the model is what it was before the rollout (its
previous desired document's, or the bundle an earlier rollout in the database used for
the version the gateway ran); where neither is known the target is removed, which
leaves the gateway on what it runs (docs/twin.md §5.1): the output says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiomqtt

from edgerund.backend import rollout as R
from edgerund.backend import rolloutspec as S
from edgerund.backend import twin as T
from edgerund.backend.rollout_store import Doc, Info, RolloutStore
from edgerund.backend.rollout_store import now as wall_now

REPORTED_MAX_BYTES = 256 * 1024
Emit = Callable[[dict[str, Any]], None]


# A stored document re-sent on resume is re-signed when it expires within this: the tool
# may have been stopped for days between the database write and the publish.
RESIGN_MARGIN_S = 3600.0


def _expires_within(raw: bytes, margin_s: float) -> bool:
    expires = json.loads(raw)["signed"].get("expires")
    return not isinstance(expires, int) or expires - wall_now() * 1000 < margin_s * 1000


class TwinCache:
    """The latest reported and desired document of every gateway under `prefix`, from
    the broker's retained messages and their updates. With `keys_dir` (`{gateway}.pem`,
    the gateways' telemetry public keys) a reported document counts only if its gateway
    signature verifies; those that do not are listed in `refused`."""

    def __init__(
        self, client: aiomqtt.Client, prefix: str = "twin/v1", keys_dir: Path | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.keys_dir = keys_dir
        self.reported: dict[str, dict[str, Any]] = {}
        self.desired: dict[str, dict[str, Any]] = {}
        self.sites: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.changed = asyncio.Event()
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TwinCache:
        await self.client.subscribe(f"{self.prefix}/+/+/reported", qos=1)
        await self.client.subscribe(f"{self.prefix}/+/+/desired", qos=1)
        self._task = asyncio.create_task(self._run(), name="twin-cache")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            self.take(str(msg.topic), payload)

    def take(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 3:
            return
        site, gw, kind = parts[-3], parts[-2], parts[-1]
        self._last = time.monotonic()
        if kind == "desired":
            if not payload:
                self.desired.pop(gw, None)
            else:
                with contextlib.suppress(ValueError, AttributeError):
                    signed = json.loads(payload).get("signed")
                    if isinstance(signed, dict) and signed.get("gateway") == gw:
                        self.desired[gw] = signed
            self.changed.set()
            return
        if kind != "reported" or not payload:
            return
        try:
            if len(payload) > REPORTED_MAX_BYTES:
                raise ValueError(f"{len(payload)} bytes")
            if self.keys_dir is not None:
                pem = self.keys_dir / f"{gw}.pem"
                if not pem.is_file():
                    raise ValueError(f"no public key {pem}")
                signed = T.verify_reported(payload, pem.read_bytes())
            else:
                doc = json.loads(payload)
                signed = doc.get("signed") if isinstance(doc, dict) else None
            if not isinstance(signed, dict) or signed.get("gateway") != gw:
                raise ValueError("not a reported document of this topic's gateway")
        except (ValueError, OSError) as exc:
            self.refused[gw] = str(exc)[:200]
            return
        self.refused.pop(gw, None)
        self.reported[gw] = signed
        self.sites[gw] = site
        self.changed.set()

    def check(self) -> None:
        """Raise what ended the subscription (a lost broker connection): a driver that went
        on without reports would time gateways out that are fine."""
        if self._task is not None and self._task.done():
            exc = None if self._task.cancelled() else self._task.exception()
            raise exc if exc is not None else aiomqtt.MqttError("twin subscription ended")

    async def settle(self, quiet_s: float = 1.0, max_s: float = 10.0) -> None:
        """Wait until the retained documents stopped arriving (or `max_s`)."""
        start = time.monotonic()
        while time.monotonic() - start < max_s:
            if time.monotonic() - self._last >= quiet_s and time.monotonic() - start >= quiet_s:
                return
            await asyncio.sleep(0.1)

    async def wait(self, timeout_s: float) -> None:
        """Until a document arrives after the last `changed.clear()`, or `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()


def bundle_head(path: Path) -> tuple[str, str]:
    """(model name, version) from the bundle's manifest (blocking; not authenticated:
    the gateways check the publisher signature, this only names the target)."""
    from edgerund.updates.bundle import BundleReader
    from edgerund.updates.manifest import parse_manifest_json

    with BundleReader(path) as reader:
        doc = parse_manifest_json(reader.head(256 * 1024).manifest_bytes)
    name, version = doc.get("model_name"), doc.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ValueError(f"{path}: the manifest names no model_name/version")
    return name, version


class Driver:
    def __init__(
        self,
        store: RolloutStore,
        client: aiomqtt.Client,
        cache: TwinCache,
        key: Any,
        *,
        emit: Emit,
        poll_s: float = 1.0,
        clock: Callable[[], float] = wall_now,
    ) -> None:
        self.store = store
        self.client = client
        self.cache = cache
        self.key = key
        self.emit = emit
        self.poll_s = poll_s
        self.clock = clock

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def plan(
        self,
        bundle: Path,
        *,
        selector: str,
        waves: str,
        halt_if: str,
        soak_s: float,
        timeout_s: float,
        rollout_id: str | None = None,
        discover_s: float = 10.0,
    ) -> tuple[R.Rollout, Info]:
        """Select the gateways, plan the waves, publish the bundle, record the rollout."""
        from edgerund.backend.bundlestore import publish_bundle

        sel = S.parse_selector(selector)
        sizes = S.parse_waves(waves)
        S.parse_rule(halt_if)
        model, version = await asyncio.to_thread(bundle_head, bundle)
        await self.cache.settle(quiet_s=1.0, max_s=discover_s)
        cands, without = [], []
        for gw, rep in sorted(self.cache.reported.items()):
            if not sel.matches(S.facts_of(rep)):
                continue
            if not any(
                isinstance(m, Mapping) and m.get("name") == model for m in rep.get("models") or []
            ):
                without.append(gw)  # it does not manage this model: a target is refused
                continue
            cands.append(R.Candidate(gw, self.cache.sites[gw], R.running_version(rep, model)))
        if without:
            self.emit({"event": "not_managing_model", "model": model, "gateways": without})
        busy = await self._db(self.store.in_flight, model, [c.gateway for c in cands])
        if busy:
            raise S.RolloutError(
                "another rollout of this model is in progress for: "
                + ", ".join(f"{gw} ({rid})" for gw, rid in sorted(busy.items()))
            )
        rid = rollout_id or f"{model}-{version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        r = R.plan(
            rid, model, version, cands, sizes, halt_if=halt_if, soak_s=soak_s, timeout_s=timeout_s
        )
        meta = await publish_bundle(self.client, bundle)
        info = Info(meta.sha256, meta.size, selector, waves)
        if not await self._db(self.store.try_lock, rid):
            raise RuntimeError(f"rollout {rid} is being driven by another process")
        await self._db(self.store.create, r, info)
        for c in cands:
            await self._db(
                self.store.upsert_twin,
                c.gateway,
                c.site,
                self.cache.reported.get(c.gateway),
                self.cache.desired.get(c.gateway),
            )
        self.emit(
            {
                "event": "planned",
                "rollout": rid,
                "model": model,
                "version": version,
                "sha256": meta.sha256,
                "gateways": len(r.order),
                "skipped": sorted(g for g, t in r.targets.items() if t.status == "skipped"),
                "waves": r.waves,
            }
        )
        return r, info

    async def resume(self, rollout_id: str) -> tuple[R.Rollout, Info, dict[str, Doc]]:
        if not await self._db(self.store.try_lock, rollout_id):
            raise RuntimeError(f"rollout {rollout_id} is being driven by another process")
        r, info, docs = await self._db(self.store.load, rollout_id)
        await self.cache.settle(quiet_s=1.0, max_s=10.0)
        resent = []
        for gw, t in r.targets.items():
            if t.status != "sent" or gw not in docs:
                continue
            # Only if the broker does not hold it (the tool died between the database
            # and the publish); never over a NEWER document someone published since.
            retained = self.cache.desired.get(gw, {}).get("version")
            if not isinstance(retained, int) or retained < docs[gw].version:
                if _expires_within(docs[gw].raw, RESIGN_MARGIN_S):
                    docs[gw] = await self._resigned(r, gw, docs[gw], retained)
                await self._publish(t.site, gw, docs[gw].raw)
                resent.append(gw)
        self.emit(
            {"event": "resumed", "rollout": rollout_id, "state": r.state, "wave": r.wave + 1,
             "republished": resent}
        )  # fmt: skip
        return r, info, docs

    async def _resigned(self, r: R.Rollout, gw: str, doc: Doc, retained: Any) -> Doc:
        """The same desired content under a new version and a fresh expiry, stored before
        it is sent (a gateway refuses an expired document; the same version re-signed
        would be a replay)."""
        signed = json.loads(doc.raw)["signed"]
        seen = S.as_map(self.cache.reported.get(gw, {}).get("desired")).get("version")
        version = R.next_desired_version(
            doc.version, retained if isinstance(retained, int) else None,
            seen if isinstance(seen, int) else None,
        )  # fmt: skip
        raw = T.desired(gw, version, signed["config"], self.key, models=signed["models"])
        new = Doc(version, raw, doc.previous)
        if not await self._db(self.store.save, r, {gw: new}):
            raise RuntimeError(f"rollout {r.id} was aborted while resuming")
        self.emit({"event": "resigned", "gateway": gw, "version": version, "was": doc.version})
        return new

    async def _publish(self, site: str, gw: str, raw: bytes) -> None:
        await self.client.publish(
            f"{self.cache.prefix}/{site}/{gw}/desired", raw, qos=1, retain=True
        )

    async def _doc_for(self, r: R.Rollout, info: Info, gw: str, target: Any) -> Doc:
        prev = self.cache.desired.get(gw)
        stored = await self._db(self.store.twin_desired, gw)
        if prev is None or (stored and stored.get("version", 0) > prev.get("version", 0)):
            prev = stored
        seen = S.as_map(self.cache.reported.get(gw, {}).get("desired")).get("version")
        version = R.next_desired_version(
            prev.get("version") if prev else None,
            stored.get("version") if stored else None,
            seen if isinstance(seen, int) else None,
        )
        config, models = R.desired_with_target(prev, r.model, target)
        raw = T.desired(gw, version, config, self.key, models=models)
        return Doc(version, raw, prev)

    async def run(self, r: R.Rollout, info: Info, docs: dict[str, Doc]) -> str:
        """Drive to a final state; returns it."""
        target = {"version": r.version, "sha256": info.sha256, "size": info.size}
        while True:
            self.cache.changed.clear()  # before reading: a report from now on wakes the wait
            now = self.clock()
            actions: list[R.Action] = []
            for gw, t in r.targets.items():
                rep = self.cache.reported.get(gw)
                if t.status in R.REACHED and rep is not None:
                    d = docs.get(gw)
                    out = R.model_outcome(
                        rep, r.model, r.version, d.version if d else None, info.sha256
                    )
                    R.record(r, gw, out, now)
            actions += R.tick(r, now)
            new: dict[str, Doc] = {}
            for a in actions:
                if isinstance(a, R.Send):
                    for gw in a.gateways:
                        new[gw] = await self._doc_for(r, info, gw, target)
            changed = sorted(r.dirty)
            if r.dirty or new or actions:
                if not await self._db(self.store.save, r, new):
                    return await self._aborted_elsewhere(r)
            docs.update(new)
            for gw in changed:
                t = r.targets[gw]
                if t.status in R.DONE and t.done_at == now:
                    self.emit(
                        {"event": "gateway", "gateway": gw, "status": t.status,
                         "outcome": t.outcome, "reason": t.reason}
                    )  # fmt: skip
                    await self._db(
                        self.store.upsert_twin, gw, t.site, self.cache.reported.get(gw), None
                    )
            for a in actions:
                await self._act(r, a, new)
            if r.final:
                return r.state
            self.cache.check()
            state = await self._db(self.store.state_of, r.id)
            if state == "aborted":
                return await self._aborted_elsewhere(r)
            await self.cache.wait(self.poll_s)

    async def _aborted_elsewhere(self, r: R.Rollout) -> str:
        self.emit({"event": "aborted", "rollout": r.id, "by": "fleet abort"})
        return "aborted"

    async def _act(self, r: R.Rollout, a: R.Action, docs: Mapping[str, Doc]) -> None:
        if isinstance(a, R.Send):
            for gw in a.gateways:
                await self._publish(r.targets[gw].site, gw, docs[gw].raw)
                signed = json.loads(docs[gw].raw)["signed"]
                self.cache.desired[gw] = signed
                await self._db(self.store.upsert_twin, gw, r.targets[gw].site, None, signed)
            self.emit(
                {"event": "wave_started", "wave": a.wave + 1, "of": len(r.waves),
                 "gateways": list(a.gateways)}
            )  # fmt: skip
        elif isinstance(a, R.WaveDone):
            self.emit({"event": "wave_done", "wave": a.wave + 1, "soak_s": r.soak_s})
        elif isinstance(a, R.Halted):
            self.emit({"event": "halted", "rollout": r.id, "reason": a.reason})
        elif isinstance(a, R.Finished):
            self.emit({"event": "succeeded", "rollout": r.id, "reason": r.reason})


async def revert(
    store: RolloutStore, client: aiomqtt.Client, cache: TwinCache, key: Any, rollout_id: str,
    emit: Emit,
) -> int:  # fmt: skip
    """Set every reached gateway's target back to what it was before the rollout."""
    r, _info, docs = await asyncio.to_thread(store.load, rollout_id)
    await cache.settle(quiet_s=1.0, max_s=10.0)
    n = 0
    for gw, t in r.targets.items():
        if t.status not in R.REACHED:
            continue
        d = docs.get(gw)
        previous = S.as_map(S.as_map(d.previous if d else None).get("models")).get(r.model)
        before: dict[str, Any] | None = dict(previous) if previous else None
        if before is None and t.prev_version:
            known = await asyncio.to_thread(store.bundle_for, r.model, t.prev_version)
            if known:
                before = {"version": t.prev_version, "sha256": known[0], "size": known[1]}
        current = cache.desired.get(gw) or await asyncio.to_thread(store.twin_desired, gw)
        seen = S.as_map(cache.reported.get(gw, {}).get("desired")).get("version")
        version = R.next_desired_version(
            current.get("version") if current else None,
            d.version if d else None,
            seen if isinstance(seen, int) else None,
        )
        config, models = R.desired_with_target(current, r.model, before)
        raw = T.desired(gw, version, config, key, models=models)
        await client.publish(f"{cache.prefix}/{t.site}/{gw}/desired", raw, qos=1, retain=True)
        await asyncio.to_thread(store.set_reverted, rollout_id, gw, version)
        await asyncio.to_thread(store.upsert_twin, gw, t.site, None, json.loads(raw)["signed"])
        n += 1
        emit(
            {
                "event": "reverted",
                "gateway": gw,
                "desired_version": version,
                "target": before,
                **(
                    {}
                    if before
                    else {
                        "note": f"no earlier bundle known for {r.model} "
                        f"{t.prev_version or '?'}: target removed, the gateway keeps what it "
                        f'runs (edgerund twin cmd {gw} rollback \'{{"model": "{r.model}"}}\')'
                    }
                ),
            }
        )
    return n
