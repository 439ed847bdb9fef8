"""End to end in-process: updates + a models registry + a control loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgerund.component import Peer
from tests.updates import models as M

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
