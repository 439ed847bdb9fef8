"""Benchmark: applying signed model bundles while a 100 Hz control loop runs.

Measures, in one run:
  - the loop's idle figures (tick lateness p50/p99/max, missed ticks) with no update;
  - time from "bundle received" to COMMITTED for a 1 MB and a 20 MB bundle (probation set
    to 0 s: the probation wait is policy, not cost), each the median of a few installs;
  - time to roll back by hand (flip `current` + swap the runner);
  - the loop's missed ticks and lateness during all of the above (target: zero missed).
Everything heavy (tar reading, hashing, fsync, the precheck subprocess) must stay off the
event loop; the lateness ratio updating/idle shows whether it does.

    python benchmarks/update.py [--quick]

Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgerund.component import Peer  # noqa: E402
from tests.updates import models as M  # noqa: E402
from tests.updates.support import (  # noqa: E402
    Publisher,
    StandInModels,
    make_config,
    running,
    seed_dir,
)

ROOT = Peer(pid=0, uid=0, gid=0, privileged=True)
PERIOD_S = 0.01


class TickLoop:
    """100 Hz on absolute deadlines; every tick runs the active model (as loops do)."""

    def __init__(self, models: StandInModels) -> None:
        self.models = models
        self.lateness: list[float] = []
        self.missed = 0
        self.ticks = 0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time() + PERIOD_S
        while not stop.is_set():
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            now = loop.time()
            late = now - nxt
            if late > PERIOD_S:
                skipped = int(late // PERIOD_S)
                self.missed += skipped
                nxt += skipped * PERIOD_S
            self.lateness.append(late * 1e3)
            self.models.infer("m1", _FEED)
            self.ticks += 1
            nxt += PERIOD_S

    def window(self, since: int) -> dict[str, float]:
        xs = sorted(self.lateness[since:])
        if not xs:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        return {
            "p50": xs[len(xs) // 2],
            "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "max": xs[-1],
        }


import numpy as np  # noqa: E402

_FEED = np.full((1, 4), 0.5, np.float32)


async def bench(quick: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="edgerund-bench-update-"))
    pub = Publisher(n_keys=2, threshold=2)
    pub.write_keyring(tmp / "keyring.json")
    seed_dir(tmp / "shipped", M.affine())
    cfg = make_config(tmp, updates={"probation_s": 0.0, "bundle_max_mb": 64.0, "file_max_mb": 64.0})
    reps = 1 if quick else 3
    sizes = {"1mb": 1 << 20, "20mb": 20 << 20}
    bundles: dict[str, list[Path]] = {k: [] for k in sizes}
    version = 1
    for key, size in sizes.items():
        for _ in range(reps):
            version += 1
            files = pub.files(
                M.affine(1.0 + version / 10),
                extra={"pad.bin": np.random.default_rng(version).bytes(size)},
            )
            bundles[key].append(
                pub.bundle(
                    tmp / f"{key}-{version}.bundle",
                    version=f"{version}.0.0",
                    counter=version,
                    files=files,
                    health={"probation_s": 0.0},
                )
            )
    async with running(cfg, with_loop=False) as r:
        upd, models = r.updates, r.models
        tl = TickLoop(models)
        stop = asyncio.Event()
        task = asyncio.create_task(tl.run(stop))
        await asyncio.sleep(3.0 if not quick else 1.5)
        idle = tl.window(0)
        idle_missed = tl.missed
        idle_ticks = tl.ticks
        mark = len(tl.lateness)
        missed0 = tl.missed
        apply_s: dict[str, list[float]] = {k: [] for k in sizes}
        for key in sizes:
            for b in bundles[key]:
                t0 = time.perf_counter()
                res = await upd.commands()["update"].handler(
                    {"path": str(b), "wait": "commit"}, ROOT
                )
                apply_s[key].append(time.perf_counter() - t0)
                assert res["state"] == "COMMITTED", res
        rb_ms = []
        for _ in range(reps):
            t0 = time.perf_counter()
            await upd.commands()["rollback"].handler({"model": "m1"}, ROOT)
            rb_ms.append((time.perf_counter() - t0) * 1e3)
        busy = tl.window(mark)
        missed = tl.missed - missed0
        busy_ticks = tl.ticks - idle_ticks
        stop.set()
        await task
    return {
        "apply_1mb_s": round(statistics.median(apply_s["1mb"]), 3),
        "apply_20mb_s": round(statistics.median(apply_s["20mb"]), 3),
        "rollback_ms": round(statistics.median(rb_ms), 2),
        "missed_ticks": missed,
        "idle_missed_ticks": idle_missed,
        "idle_ticks": idle_ticks,
        "update_ticks": busy_ticks,
        "missed_per_1k_ticks_idle": round(1000 * idle_missed / max(idle_ticks, 1), 2),
        "missed_per_1k_ticks_update": round(1000 * missed / max(busy_ticks, 1), 2),
        "idle_lateness_p50_ms": round(idle["p50"], 3),
        "idle_lateness_p99_ms": round(idle["p99"], 3),
        "idle_lateness_max_ms": round(idle["max"], 3),
        "update_lateness_p50_ms": round(busy["p50"], 3),
        "update_lateness_p99_ms": round(busy["p99"], 3),
        "update_lateness_max_ms": round(busy["max"], 3),
        "lateness_p99_ratio_update_vs_idle": round(busy["p99"] / max(idle["p99"], 1e-3), 2),
        "apply_20mb_vs_1mb_ratio": round(
            statistics.median(apply_s["20mb"]) / statistics.median(apply_s["1mb"]), 2
        ),
        "loop_period_ms": PERIOD_S * 1e3,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one install per size (CI smoke)")
    args = ap.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    r = asyncio.run(bench(args.quick))
    print(f"apply 1 MB bundle  : {r['apply_1mb_s']:.3f} s (received -> COMMITTED, probation 0)")
    print(
        f"apply 20 MB bundle : {r['apply_20mb_s']:.3f} s ({r['apply_20mb_vs_1mb_ratio']}x the 1 MB one)"
    )
    print(f"rollback by hand   : {r['rollback_ms']:.2f} ms")
    print(
        f"loop @100 Hz idle  : lateness p50 {r['idle_lateness_p50_ms']} / p99 {r['idle_lateness_p99_ms']} / "
        f"max {r['idle_lateness_max_ms']} ms, missed {r['idle_missed_ticks']}"
    )
    print(
        f"loop during updates: lateness p50 {r['update_lateness_p50_ms']} / p99 {r['update_lateness_p99_ms']} / "
        f"max {r['update_lateness_max_ms']} ms, missed {r['missed_ticks']} "
        f"(p99 {r['lateness_p99_ratio_update_vs_idle']}x idle; missed per 1k ticks "
        f"{r['missed_per_1k_ticks_update']} vs idle {r['missed_per_1k_ticks_idle']})"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
