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

from edgerund.updates.component import build
from tests.updates.support import StandInLoop, StandInModels, make_config, make_ctx, wait_for


async def main(tmp: Path, bundle: Path | None) -> None:
    cfg = make_config(tmp, updates={"attempts": 2})
    ctx = make_ctx(cfg, tmp)
    upd = build(ctx)
    assert upd is not None
    models = StandInModels(ctx)
    loop = StandInLoop(ctx)
    ctx.components.update(updates=upd, models=models, loops=loop)
    async with upd, models, loop:
        if bundle is not None:
            job = await upd.submit(bundle, "test")
            await job.done.wait()
        await upd.wait_idle(120)
        t0 = loop.ticks
        await wait_for(lambda: loop.ticks > t0 + 3, 10)
        r = models.runner("m1")
        out = {
            "status": upd.status()["updates"],
            "runner_version": r.version if r else None,
            "runner_dir": str(r.dir) if r else None,
            "ticks": loop.ticks,
        }
        (tmp / "result.json").write_text(json.dumps(out))
        await ctx.supervisor.cancel_all()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
