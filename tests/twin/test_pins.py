"""Model targets pin their models against local updates (twin/pins.py), through the REAL
update pipeline (tests/updates' stack) and a real mosquitto: a technician's socket update
and an inbox bundle of another version are refused with `pinned_by_twin` naming the
target, nothing is staged; `override_twin` installs it and the twin reports it (target
`overridden`, `models[].twin_override`), across a restart too; a newer desired version
naming the older target again is refused by the pipeline (`version_rollback`) and the
override stays reported until the backend targets what runs; a version that no longer
names the model lifts the pin."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgerund.backend.bundlestore import publish_bundle
from edgerund.component import Peer
from edgerund.errors import CommandError, TrustError
from edgerund.twin import reported
from edgerund.twin import targets as T
from edgerund.twin.bundlewire import BundleMeta
from edgerund.twin.desired import Desired
from edgerund.twin.fetch import connect_properties
from edgerund.twin.modeltargets import ModelTargets
from edgerund.twin.pins import PINNED_BY_TWIN, Pins
from edgerund.updates.jobs import Job
from tests.updates import models as M
from tests.updates.support import Publisher, make_config, running, seed_dir, wait_for

TECH = Peer(pid=1, uid=1000, gid=1000, privileged=True)


def _doc(version: int, models: dict[str, Any]) -> Desired:
    return Desired(version, {}, models, 2**62, "test", b"")


def _pipeline(tmp_path: Path, **updates: Any) -> tuple[Publisher, Any]:
    """A publisher, the shipped model m1 (1.0.0) and a config for `running`."""
    pub = Publisher()
    seed_dir(tmp_path / "shipped", M.affine())
    pub.write_keyring(tmp_path / "keyring.json")
    return pub, make_config(tmp_path, updates=updates or None)


def _target(meta: BundleMeta, version: str) -> dict[str, Any]:
    return {"version": version, "sha256": meta.sha256, "size": meta.size}


def test_pins_pure() -> None:
    p = Pins()
    p.set(3, {"m1": "2.0.0"})
    p.check_local_update("m2", "9.9.9", source="socket:0", override=False)  # not pinned
    p.check_local_update("m1", "2.0.0", source="socket:0", override=False)  # the target
    with pytest.raises(TrustError) as ei:
        p.check_local_update("m1", "2.1.0", source="socket:0", override=False)
    assert ei.value.code == PINNED_BY_TWIN
    assert "model m1 is pinned to 2.0.0 by desired version 3 of the twin" in str(ei.value)
    assert "--override-twin" in str(ei.value)
    assert p.overrides == {}
    p.check_local_update("m1", "2.1.0", source="socket:1000", override=True)
    assert p.overrides["m1"].version == "2.1.0" and p.overrides["m1"].pinned == "2.0.0"
    assert p.active_override("m1", "2.1.0") is not None
    assert p.active_override("m1", "2.0.0") is None  # back at the target
    p.set(2, {})  # a late, older version: ignored
    assert "m1" in p.pins
    p.set(4, {})  # a newer version without m1: the pin is lifted
    p.check_local_update("m1", "3.0.0", source="socket:0", override=False)
    assert p.active_override("m1", "2.1.0") is None  # no pin: nothing to override


def test_a_target_refused_for_an_override_is_retried_by_a_newer_version() -> None:
    """`overridden_locally` is a refusal of the moment (the backend has not decided): a
    newer desired version naming the same bundle fetches it again, unlike a bundle the
    pipeline judged (`version_rollback`), which is remembered as final. A target refused
    while the counter could not be trusted used to be final too."""
    t = T.Target("m1", "2.1.0", "ab" * 32, 1024)

    def refused(reason: str) -> T.Outcome:
        return T.Outcome("m1", "2.1.0", t.sha256, T.REFUSED, reason, None, 1, 0.0)

    kw = {"active_version": "2.0.5", "desired_version": 2}
    assert T.decide(t, remembered=refused(T.OVERRIDDEN_LOCALLY), **kw) == "fetch"
    assert T.decide(t, remembered=refused("version_rollback"), **kw) == "remembered"
    # so are the other refusals of the moment: a TPM counter not trusted at boot, another
    # update in flight; a bundle whose signature failed is judged for good
    for moment in ("counter_unavailable", "keyring_unusable", "busy"):
        assert T.decide(t, remembered=refused(moment), **kw) == "fetch", moment
    assert T.decide(t, remembered=refused("bad_signature"), **kw) == "remembered"
    p = Pins()
    p.set(1, {"m1": "2.1.0"})
    p.check_local_update("m1", "2.0.5", source="socket:1000", override=True)
    with pytest.raises(TrustError) as ei:
        p.check_target_job("m1", "2.0.5")
    assert ei.value.code == T.OVERRIDDEN_LOCALLY
    p.check_target_job("m1", "2.0.0")  # the override no longer runs
    p.set(2, {"m1": "2.1.0"})
    p.check_target_job("m1", "2.0.5")  # the backend's newer version decides


async def test_local_update_refused_overridden_and_reported(tmp_path: Path, mosquitto: Any) -> None:
    pub, cfg = _pipeline(tmp_path)
    target = pub.bundle(tmp_path / "target.bundle", version="2.0.0", counter=1)
    local = pub.bundle(tmp_path / "local.bundle", version="2.1.0", counter=1)
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as c:
        meta = await publish_bundle(c, target, chunk_bytes=16 * 1024)

    async def client() -> aiomqtt.Client:
        return aiomqtt.Client(
            mosquitto.host,
            mosquitto.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            properties=connect_properties(cfg.updates.mqtt_chunk_max_kb * 1024),
        )

    pins = Pins()
    async with running(cfg, pins=pins) as r:
        update = r.updates.commands()["update"].handler
        scope = r.supervisor.scope("twin")
        async with scope:
            t = ModelTargets(
                cfg, installer=r.updates, managed=lambda: r.updates.records, scope=scope,
                notify=lambda: None, client=client, pins=pins,
            )  # fmt: skip
            await t.load()
            t.offer(_doc(1, {"m1": _target(meta, "2.0.0")}))
            await wait_for(lambda: t.report()["m1"]["state"] == "committed", 60)
            assert t.report()["m1"]["active_version"] == "2.0.0"

            # the technician's update of another version: refused, naming the target
            with pytest.raises(CommandError) as ei:
                await update({"path": str(local), "wait": "commit"}, TECH)
            assert ei.value.code == PINNED_BY_TWIN
            assert "model m1 is pinned to 2.0.0 by desired version 1 of the twin" in str(ei.value)
            # a bundle dropped in the inbox likewise
            ticket = await r.updates.submit(Job(local, "inbox:local.bundle", admitted=True))
            await ticket.done.wait()
            assert ticket.error is not None and ticket.error.code == PINNED_BY_TWIN
            assert r.updates.slot_info("m1")["version"] == "2.0.0"
            assert t.report()["m1"]["state"] == "committed"
            with pytest.raises(CommandError) as ei:
                await update({"path": str(local), "override_twin": "yes"}, TECH)
            assert ei.value.code == "bad_args"

            # with the explicit override: installed, and reported as such
            await update({"path": str(local), "wait": "commit", "override_twin": True}, TECH)
            assert r.updates.slot_info("m1")["version"] == "2.1.0"
            e = t.report()["m1"]
            assert (e["state"], e["reason"], e["active_version"]) == (
                "overridden", "twin_override", "2.1.0",
            )  # fmt: skip
            assert e["version"] == "2.0.0" and e["override"]["source"] == "socket:1000"
            doc = reported.build(
                {"models": [r.updates.slot_info("m1")]},
                seq=1, ts_ms=0, config_digest="x", origin={}, desired={"models": t.report()},
                restart_needed=[], commands={}, overrides=t.active_overrides(),
            )  # fmt: skip
            assert doc["models"][0]["twin_override"] is True
            assert doc["models"][0]["version"] == "2.1.0"
            path = tmp_path / "state" / "twin" / "model-targets.json"
            await wait_for(lambda: '"overrides":[{' in path.read_text(), 10)

        # a restart: the pins come from the applied document, the override from the file
        pins2 = Pins()
        pins2.seed(1, {"m1": _target(meta, "2.0.0")}, managed=["m1"], max_bytes=1 << 30)
        scope2 = r.supervisor.scope("twin2")
        async with scope2:
            t2 = ModelTargets(
                cfg, installer=r.updates, managed=lambda: r.updates.records, scope=scope2,
                notify=lambda: None, client=client, pins=pins2,
            )  # fmt: skip
            await t2.load()
            assert set(t2.active_overrides()) == {"m1"}
            r.updates.runner.pins = pins2
            with pytest.raises(CommandError) as ei:  # still pinned after the restart
                await update({"path": str(local)}, TECH)
            assert ei.value.code == PINNED_BY_TWIN

            # a newer version that still names the target: the pipeline refuses to go back
            # to an older version, and the override stays visible
            t2.offer(_doc(2, {"m1": _target(meta, "2.0.0")}))
            await wait_for(lambda: t2.report()["m1"]["state"] == "refused", 60)
            assert t2.report()["m1"]["reason"] == "version_rollback"
            assert r.updates.slot_info("m1")["version"] == "2.1.0"
            assert set(t2.active_overrides()) == {"m1"}

            # the backend accepts what runs (a target naming 2.1.0): at the target again
            async with aiomqtt.Client(
                mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
            ) as c:
                meta_local = await publish_bundle(c, local, chunk_bytes=16 * 1024)
            t2.offer(_doc(3, {"m1": _target(meta_local, "2.1.0")}))
            await wait_for(lambda: t2.report()["m1"]["state"] == "committed", 60)
            assert t2.report()["m1"]["message"] == "already active"
            assert t2.active_overrides() == {}

            # a version that no longer names m1: the pin is lifted, local updates pass
            newer = pub.bundle(tmp_path / "newer.bundle", version="2.2.0", counter=1)
            t2.offer(_doc(4, {}))
            await update({"path": str(newer), "wait": "commit"}, TECH)
            assert r.updates.slot_info("m1")["version"] == "2.2.0"
            assert t2.active_overrides() == {}


async def test_inbox_file_refused_by_a_pin_is_offered_again_when_the_targets_change(
    tmp_path: Path,
) -> None:
    """A technician's stick holds a newer version while a target pins the running one: the
    refusal is of the moment, so the file is not remembered as refused (as a poisoned one
    is); once the backend's next desired version no longer names the model it installs,
    without renaming the file or restarting the daemon."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pub, cfg = _pipeline(tmp_path, inbox_dir=str(inbox), inbox_poll_ms=50)
    pins = Pins()
    pins.set(1, {"m1": "1.0.0"})  # the shipped version
    async with running(cfg, pins=pins) as r:

        def refusals() -> list[str]:
            return [e["reason"] for e in r.updates.status()["updates"]["recent_rejections"]]

        pub.bundle(inbox / "stick.bundle", version="2.1.0", counter=1)
        await wait_for(lambda: refusals() == [PINNED_BY_TWIN], 20)
        assert r.updates.slot_info("m1")["version"] == "1.0.0"
        # not remembered as refused: the in-flight mark (written before the job) is
        # dropped once its outcome is recorded, just after the ticket ends
        record = tmp_path / "state" / "updates" / "inbox-refused.json"
        await wait_for(lambda: "stick.bundle" not in record.read_text(), 10)
        await asyncio.sleep(0.5)  # ten polls: not offered again while the pins hold
        assert refusals() == [PINNED_BY_TWIN]

        pins.set(2, {})  # the backend no longer targets m1
        await wait_for(lambda: r.updates.slot_info("m1")["version"] == "2.1.0", 60)
        assert refusals() == [PINNED_BY_TWIN]


async def test_a_target_fetched_while_it_was_overridden_does_not_undo_the_override(
    tmp_path: Path,
) -> None:
    """The technician overrides desired version 1's target (2.1.0) with 2.0.5 while that
    target's bundle is still being fetched; the target's job then reaches the pipeline.
    It must not install over the override (the override stands until the backend
    decides); the next desired version's target does."""
    pub, cfg = _pipeline(tmp_path)
    target = pub.bundle(tmp_path / "target.bundle", version="2.1.0", counter=1)
    local = pub.bundle(tmp_path / "local.bundle", version="2.0.5", counter=1)
    pins = Pins()
    pins.set(1, {"m1": "2.1.0"})
    async with running(cfg, pins=pins) as r:
        update = r.updates.commands()["update"].handler
        await update({"path": str(local), "wait": "commit", "override_twin": True}, TECH)
        assert r.updates.slot_info("m1")["version"] == "2.0.5"

        # the target job of the same desired version, arriving after the override
        ticket = await r.updates.submit(Job(target, "twin:m1", admitted=True))
        await ticket.done.wait()
        assert ticket.error is not None and ticket.error.code == T.OVERRIDDEN_LOCALLY
        assert "installed over target 2.1.0 of desired version 1" in str(ticket.error)
        assert r.updates.slot_info("m1")["version"] == "2.0.5"

        # a newer desired version naming the target again: the backend decided
        pins.set(2, {"m1": "2.1.0"})
        ticket = await r.updates.submit(Job(target, "twin:m1", admitted=True))
        await ticket.done.wait()
        assert ticket.error is None, ticket.error
        await wait_for(lambda: r.updates.slot_info("m1")["state"] == "COMMITTED", 60)
        assert r.updates.slot_info("m1")["version"] == "2.1.0"
