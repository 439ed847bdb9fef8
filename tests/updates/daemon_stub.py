"""A small daemon for the power-cut tests: the updates component, a models registry and a
control loop in one process (entered in the daemon's order), run as a subprocess so that
EDGERUND_TEST_ABORT_AT can SIGKILL it at a state boundary.

    python -m tests.updates.daemon_stub TMP [BUNDLE]

With BUNDLE: install it (waiting for the result). Without: start, let recovery and any
resumed work finish. Either way, write TMP/result.json (the updates status, the running
model's version and directory, loop ticks) and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from edgerund.updates.jobs import Job
from tests.updates.support import make_config, running, wait_for


async def main(tmp: Path, bundle: Path | None) -> None:
    cfg = make_config(tmp, updates={"attempts": 2})
    async with running(cfg) as r:
        upd, models, loop = r.updates, r.models, r.loop
        if bundle is not None:
            ticket = await upd.submit(Job(bundle, "test"))
            await ticket.done.wait()
        await upd.wait_idle(120)
        t0 = loop.ticks
        await wait_for(lambda: loop.ticks > t0 + 3, 10)
        runner = models.runner("m1")
        out = {
            "status": upd.status()["updates"],
            "runner_version": runner.version if runner else None,
            "runner_dir": str(runner.dir) if runner else None,
            "ticks": loop.ticks,
        }
        (tmp / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
