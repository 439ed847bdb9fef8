"""End to end in-process: updates + a models registry + a control loop."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund import __version__
from edgerund.component import CommandError, Peer
from edgerund.publisher import build as B
from edgerund.updates.abi import runtime_max_opset
from edgerund.updates.bundle import read_bundle
from edgerund.updates.keyring import parse_keyring
from edgerund.updates.trust import Device, Installed, Limits
from tests.updates import models as M
from tests.updates.support import Publisher, seed_dir, wait_for

ROOT = Peer(pid=1, uid=0, gid=0, privileged=True)


async def test_install_commit_and_manual_rollback(harness: Any, tmp_path: Path) -> None:
    async with harness() as h:
        assert h.current() == "a"
        assert h.models.runner("m1").version == "1.0.0"
        b = h.pub.bundle(tmp_path / "v2.bundle", version="2.0.0", counter=1, model=M.affine(2.0))
        res = await h.updates.commands()["update"].handler({"path": str(b), "wait": "commit"}, ROOT)
        assert res["state"] == "COMMITTED", res
        assert h.current() == "b"
        assert h.models.runner("m1").version == "2.0.0"
        assert h.models.runner("m1").dir == h.store.dir("b")
        assert (await h.updates.counter.read()) == 1
        st = h.updates.status()["updates"]
        assert st["models"][0]["active_slot"] == "b"
        # by hand back to the previous slot
        res = await h.updates.commands()["rollback"].handler({"model": "m1"}, ROOT)
        assert res["active_slot"] == "a" and res["last_failure"]["reason"] == "manual"
        assert h.current() == "a"
        assert h.models.runner("m1").version == "1.0.0"


def test_bundle_build_version_is_the_model_manifests(tmp_path: Path, publisher: Publisher) -> None:
    # Issue #12 item 17: `bundle build --version` set the bundle's version only, so
    # `models` said 2.0.1 while the loops (the model manifest) said 1.0.0. (The device
    # refuses such a bundle: test_attacks `version_mismatch`.)
    src = seed_dir(tmp_path / "src", M.affine(2.0), version="1.0.0")
    out = tmp_path / "v201.bundle"
    man = B.build_from_dir(src, out, publisher.keys[:2], version="2.0.1")
    assert man["version"] == man["model_manifest"]["version"] == "2.0.1"
    assert json.loads((src / "manifest.json").read_text())["version"] == "1.0.0"  # untouched
    staging = tmp_path / "staging"
    staging.mkdir()
    verdict, _, _ = read_bundle(
        out,
        staging,
        parse_keyring(B.keyring_bytes(publisher.keyring_doc)),
        now=time.time(),
        device=Device("gw-test", __version__, runtime_max_opset(), ("m1",)),
        installed=Installed(counter=0, version="1.0.0"),
        limits=Limits(
            bundle_max_bytes=1 << 26,
            file_max_bytes=1 << 26,
            max_counter_jump=16,
            max_version_jump=0,
        ),
        manifest_max=256 * 1024,
    )
    assert verdict.manifest.version == "2.0.1"
    assert verdict.manifest.model_manifest == {"name": "m1", "version": "2.0.1"}


async def test_wait_trial_returns_when_probation_starts(harness: Any, tmp_path: Path) -> None:
    # Issue #12 item 16: the default `wait: "trial"` returned only after the probation had
    # ended, and a rollback during it was then printed as a result (exit 0).
    quick = {"max_missed_ticks": 1_000_000, "poll_interval_ms": 50, "baseline_max_s": 0.2}
    async with harness(updates={"probation": quick}) as h:
        b = h.pub.bundle(
            tmp_path / "v2.bundle",
            version="2.0.0",
            counter=1,
            model=M.affine(2.0),
            health={"probation_s": 30.0},
        )
        update = h.updates.commands()["update"].handler
        res = await update({"path": str(b)}, ROOT)
        assert res["state"] == "PROBATION" and res["candidate"]["version"] == "2.0.0"
        rolled = await h.updates.commands()["rollback"].handler({"model": "m1"}, ROOT)
        assert rolled["state"] == "ROLLED_BACK" and rolled["active_slot"] == "a"
        # The same rollback seen by a client waiting for the outcome: an error, not a result.
        b3 = h.pub.bundle(
            tmp_path / "v3.bundle",
            version="3.0.0",
            counter=1,
            model=M.affine(3.0),
            health={"probation_s": 30.0},
        )
        waiting = asyncio.ensure_future(update({"path": str(b3), "wait": "commit"}, ROOT))
        await wait_for(lambda: h.record().state == "PROBATION")
        await h.updates.commands()["rollback"].handler({"model": "m1"}, ROOT)
        with pytest.raises(CommandError) as ei:
            await waiting
        assert ei.value.code == "manual"
