"""Model targets through the REAL update pipeline (tests/updates' stack: slot repository,
updates component, stand-in models host and loop on onnxruntime) and a real mosquitto:
a bundle that passes its golden vectors but fails the probation ends `rolled_back` and is
never fetched again; a bundle for another model is `wrong_model`; a newer desired version
abandons a stalled fetch and installs its own target, while an unknown model in the same
document is refused on its own; a refusal of the moment (`counter_unavailable`) is retried by
a newer desired version. The documents are handed in already authenticated (the
applier's part is tested in test_desired/test_model_targets)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from edgerund.backend.bundlestore import publish_bundle, unpublish_bundle
from edgerund.twin.bundlewire import BundleMeta
from edgerund.twin.desired import Desired
from edgerund.twin.fetch import connect_properties
from edgerund.twin.modeltargets import ModelTargets
from edgerund.updates.counter import RefusedCounter
from tests.updates import models as M
from tests.updates.support import Publisher, make_config, running, seed_dir, wait_for


def _doc(version: int, models: dict[str, Any]) -> Desired:
    return Desired(version, {}, models, 2**62, "test", b"")


def _target(meta: BundleMeta, version: str) -> dict[str, Any]:
    return {"version": version, "sha256": meta.sha256, "size": meta.size}


async def _publish(broker: Any, path: Path) -> BundleMeta:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        return await publish_bundle(c, path, chunk_bytes=16 * 1024)


class Rig:
    def __init__(self, tmp: Path, broker: Any) -> None:
        self.tmp = tmp
        self.broker = broker
        self.pub = Publisher()
        seed_dir(tmp / "shipped", M.affine())
        self.pub.write_keyring(tmp / "keyring.json")
        self.cfg = make_config(tmp)
        self.notified = 0

    async def client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            properties=connect_properties(self.cfg.updates.mqtt_chunk_max_kb * 1024),
        )

    def notify(self) -> None:
        self.notified += 1


def _state(t: ModelTargets, name: str = "m1") -> tuple[Any, Any, Any]:
    e = t.report().get(name) or {}
    return e.get("desired_version"), e.get("state"), e.get("reason")


async def test_probation_rollback_remembered_and_wrong_model(
    tmp_path: Path, mosquitto: Any
) -> None:
    rig = Rig(tmp_path, mosquitto)
    pos = {"x": np.abs(np.random.default_rng(0).standard_normal((3, 1, 4))).astype(np.float32)}
    files = rig.pub.files(M.nan_on_negative(), golden_inputs=pos)
    bad = rig.pub.bundle(
        tmp_path / "bad.bundle", version="2.0.0", counter=1, files=files,
        health={"probation_s": 1.0},
    )  # fmt: skip
    other = rig.pub.bundle(tmp_path / "other.bundle", version="2.1.0", counter=1, name="m2")
    bad_meta = await _publish(mosquitto, bad)
    other_meta = await _publish(mosquitto, other)
    async with running(rig.cfg) as r:
        scope = r.supervisor.scope("twin")
        async with scope:
            t = ModelTargets(
                rig.cfg, installer=r.updates, managed=lambda: r.updates.records,
                scope=scope, notify=rig.notify, client=rig.client,
            )  # fmt: skip
            await t.load()
            r.loop.feed = np.full((1, 4), -1.0, np.float32)  # NaN on live inputs only
            t.offer(_doc(1, {"m1": _target(bad_meta, "2.0.0")}))
            seen: set[str] = set()

            def ended() -> bool:
                seen.add(str(_state(t)[1]))
                return _state(t)[1] in ("rolled_back", "refused", "committed", "failed")

            await wait_for(ended, 60)
            assert _state(t) == (1, "rolled_back", "probation_nan")
            assert "fetching" in seen
            assert r.updates.slot_info("m1")["state"] == "ROLLED_BACK"
            saved = json.loads((tmp_path / "state" / "twin" / "model-targets.json").read_text())
            assert saved["outcomes"][0]["state"] == "rolled_back"

            # gone from the broker: a fetch would stall; the judgement is remembered instead
            async with aiomqtt.Client(
                mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
            ) as c:
                await unpublish_bundle(c, bad_meta)
            t.offer(_doc(2, {"m1": _target(bad_meta, "2.0.0")}))
            await wait_for(lambda: _state(t) == (2, "rolled_back", "probation_nan"), 10)

            # a bundle for another model, named as m1's target
            t.offer(_doc(3, {"m1": _target(other_meta, "2.1.0")}))
            await wait_for(lambda: _state(t)[:2] == (3, "refused"), 30)
            assert _state(t)[2] == "wrong_model"
            assert r.updates.slot_info("m1")["version"] == "1.0.0"  # the shipped model runs
            assert rig.notified > 0

        # a new ModelTargets (a restart) remembers the rollback from the file
        scope2 = r.supervisor.scope("twin2")
        async with scope2:
            t2 = ModelTargets(
                rig.cfg, installer=r.updates, managed=lambda: r.updates.records,
                scope=scope2, notify=rig.notify, client=rig.client,
            )  # fmt: skip
            await t2.load()
            t2.offer(_doc(3, {"m1": _target(bad_meta, "2.0.0")}))
            await wait_for(lambda: _state(t2) == (3, "rolled_back", "probation_nan"), 10)


async def test_newer_version_abandons_stalled_fetch(tmp_path: Path, mosquitto: Any) -> None:
    rig = Rig(tmp_path, mosquitto)
    good = rig.pub.bundle(
        tmp_path / "good.bundle", version="2.0.0", counter=1, health={"probation_s": 2.0}
    )
    meta = await _publish(mosquitto, good)
    never = BundleMeta.plan(5000, hashlib.sha256(b"never published").hexdigest(), 1024)
    async with running(rig.cfg) as r:
        scope = r.supervisor.scope("twin")
        async with scope:
            t = ModelTargets(
                rig.cfg, installer=r.updates, managed=lambda: r.updates.records,
                scope=scope, notify=rig.notify, client=rig.client,
            )  # fmt: skip
            await t.load()
            t.offer(_doc(1, {"m1": _target(never, "1.5.0")}))
            await asyncio.sleep(1.0)
            assert _state(t) == (1, "fetching", None)  # waiting for a bundle nobody published
            t.offer(_doc(2, {"m1": _target(meta, "2.0.0"), "zz": _target(meta, "2.0.0")}))
            assert t.report()["zz"]["state"] == "refused"
            assert t.report()["zz"]["reason"] == "unknown_model"
            seen: set[str] = set()

            def committed() -> bool:
                seen.add(str(_state(t)[1]))
                return _state(t)[:2] == (2, "committed")

            await wait_for(committed, 60)
            assert {"fetching", "verifying", "probation"} <= seen  # reported on the way
            assert r.updates.slot_info("m1")["version"] == "2.0.0"
            assert t.report()["m1"]["bytes"] == meta.size
            # the same document again (the retained copy): nothing happens
            t.offer(_doc(2, {"m1": _target(never, "1.5.0")}))
            assert _state(t)[:2] == (2, "committed")

            # a newer version naming the SAME target while it is in probation: it waits
            # for the job (whose end is still recorded) and finds it active: no second
            # fetch or install
            nxt = rig.pub.bundle(
                tmp_path / "next.bundle", version="2.1.0", counter=2, health={"probation_s": 3.0}
            )
            meta2 = await _publish(mosquitto, nxt)
            t.offer(_doc(3, {"m1": _target(meta2, "2.1.0")}))
            await wait_for(lambda: _state(t)[:2] == (3, "probation"), 60)
            t.offer(_doc(4, {"m1": _target(meta2, "2.1.0")}))
            await wait_for(lambda: _state(t)[:2] == (4, "committed"), 60)
            assert t.report()["m1"]["message"] == "already active"
            await wait_for(lambda: t.memory.get(meta2.sha256) is not None, 10)
            outcome = t.memory.get(meta2.sha256)
            assert outcome is not None and outcome.state == "committed"
            assert outcome.desired_version == 3


async def test_a_target_refused_while_the_counter_was_untrusted_is_retried(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A gateway booted without a trustworthy anti-rollback counter refuses every bundle
    (`counter_unavailable`): a refusal of that boot, not of the bundle. After a restart
    with the counter back, the backend's next desired version naming the same bundle
    installs it (the target memory used to keep the refusal as final)."""
    rig = Rig(tmp_path, mosquitto)
    good = rig.pub.bundle(tmp_path / "good.bundle", version="2.0.0", counter=1)
    meta = await _publish(mosquitto, good)

    def targets(r: Any, scope: Any) -> ModelTargets:
        return ModelTargets(
            rig.cfg, installer=r.updates, managed=lambda: r.updates.records,
            scope=scope, notify=rig.notify, client=rig.client,
        )  # fmt: skip

    async with running(rig.cfg, counter=RefusedCounter("the TPM was missing at boot")) as r:
        async with r.supervisor.scope("twin") as scope:
            t = targets(r, scope)
            await t.load()
            t.offer(_doc(1, {"m1": _target(meta, "2.0.0")}))
            await wait_for(lambda: _state(t)[:2] == (1, "refused"), 60)
            assert _state(t)[2] == "counter_unavailable"
    async with running(rig.cfg) as r:  # the restart, the counter trusted again
        async with r.supervisor.scope("twin") as scope:
            t = targets(r, scope)
            await t.load()
            t.offer(_doc(2, {"m1": _target(meta, "2.0.0")}))
            await wait_for(lambda: _state(t)[:2] == (2, "committed"), 60)
            assert r.updates.slot_info("m1")["version"] == "2.0.0"
