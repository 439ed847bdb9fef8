"""The component without a broker: every task lives in its scope, events and the window
after an anomaly become evt batches, and a clean stop seals what is open."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from edgerund.remote import RemoteCommands
from edgerund.telemetry import codec
from edgerund.telemetry.codec import Cls, EventBlock, SeriesBlock
from edgerund.telemetry.commands import Dispatcher, json_obj
from edgerund.telemetry.spool import Row, Spool
from tests.telemetry.conftest import HubStandIn, make_config, make_ctx, telemetry_in, until


def _read_back(spool_dir: Path) -> dict[Cls, list[Row]]:
    sp = Spool(spool_dir, max_bytes=1 << 24, ttl_s={c: 1e9 for c in Cls})
    sp.open()
    try:
        return {c: sp.fetch(c, 0, 100).result() for c in Cls}
    finally:
        sp.close()


async def test_tasks_live_in_the_scope_and_a_clean_stop_loses_nothing(
    tmp_path: Path, loop_guard: Any
) -> None:
    loop_guard.threshold_s = 0.3
    cfg = make_config(
        tmp_path,
        None,
        telemetry={"batch_max_age_s": 3600.0, "agg_interval_s": 3600.0, "event_window_s": 0.5},
    )
    ctx = make_ctx(cfg, tmp_path)
    hub = HubStandIn([("env", "temp", "degC")])
    async with telemetry_in(ctx, hub) as tel:
        scope = tel._scope
        t0 = time.time() - 0.2
        for i in range(10):
            hub.emit("env", "temp", 20 + i * 0.01, t0 + i * 0.01)
        ctx.events.publish("anomaly.start", "loop1", score=1.0)
        ctx.events.publish("debug.noise", "x")  # not in telemetry.events: ignored
        # The anomaly batch, then the window after it (its own batch, 0.5 s + slack later).
        await until(lambda: tel.spool.stats.appended_batches >= 2, 10, "event batches")
        assert {t.get_name() for t in scope.tasks} == {"telemetry.sealer", "telemetry.events"}
        n_open = len(tel.batcher.series[("env", "temp")].raw_t)
        assert n_open == 10  # still in the open raw batch (batch_max_age_s is an hour)
        spool_dir = tel.spool.dir
    assert not scope.tasks  # nothing outlives the component
    rows = await asyncio.to_thread(_read_back, spool_dir)
    kinds = [
        b.kind
        for r in rows[Cls.EVT]
        for b in codec.decode(r.payload).batch.blocks
        if isinstance(b, EventBlock)
    ]
    assert kinds == ["anomaly.start", "anomaly.start.window"]
    raw = [
        b
        for r in rows[Cls.RAW]
        for b in codec.decode(r.payload).batch.blocks
        if isinstance(b, SeriesBlock)
    ]
    assert sum(b.n for b in raw) == 10  # sealed at the stop
    assert len(rows[Cls.AGG]) == 1  # the open aggregation window too


async def test_dispatcher_routes_through_the_router_and_answers_every_failure() -> None:
    router = RemoteCommands()

    async def ok(payload: bytes) -> bytes:
        return b"got:" + payload

    async def broken(payload: bytes) -> bytes:
        raise OSError("disk on fire")

    async def picky(payload: bytes) -> bytes:
        json_obj(payload)
        return b"{}"

    router.register("ok", ok)
    router.register("broken", broken)
    router.register("picky", picky)
    d = Dispatcher(router, max_bytes=16)
    assert await d("ok", b"x") == b"got:x"
    errors = {}
    for name, payload in [("broken", b""), ("picky", b"[1]"), ("ok", b"y" * 17), ("nope", b"")]:
        reply = json.loads(await d(name, payload) or b"")
        assert reply["ok"] is False
        errors[name] = reply["error"]
    assert errors["broken"] == {"code": "failed", "message": "OSError: disk on fire"}
    assert errors["picky"]["code"] == "bad_json"
    assert errors["ok"]["code"] == "too_large"
    assert errors["nope"]["code"] == "unknown_command"
    assert "['broken', 'ok', 'picky']" in errors["nope"]["message"]
    assert (d.handled, d.rejected) == (1, 4)
