"""End-to-end through a real mosquitto: component -> spool -> uplink -> broker -> consumer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from edgerund.telemetry.component import TelemetryComponent
from edgerund.telemetry.consumer import Consumer
from tests.telemetry.conftest import HubStandIn, identity_in, make_config, make_ctx


async def test_normal_flow_decoded_and_verified(
    tmp_path: Path, mosquitto: Any, collector_factory: Any, loop_guard: Any
) -> None:
    cfg = make_config(tmp_path, mosquitto)
    ctx = make_ctx(cfg, tmp_path)
    hub = HubStandIn([("env", "temp", "degC"), ("vib", "x", "g")])
    ctx.components["hub"] = hub
    async with identity_in(ctx) as ident:
        key = Consumer.load_public_key(ident.public_key_pem().encode())
        col = await collector_factory(mosquitto, public_keys=[key], require_signature=True)
        async with TelemetryComponent(ctx) as tel:
            t0 = time.time() - 5
            sent = []
            for i in range(50):
                v = round(20 + 0.01 * (i % 7), 2)
                hub.emit("env", "temp", v, t0 + i * 0.1)
                hub.emit("vib", "x", 0.001 * i, t0 + i * 0.1)
                sent.append(v)
            ctx.events.publish("anomaly.start", "loop1", score=0.93, threshold=0.8)
            await col.wait_for(
                lambda: any(
                    r.get("name") == "env.temp" and r["cls"] == "raw" for r in col.of("series")
                )
            )
            await col.wait_for(
                lambda: any(r.get("kind") == "anomaly.start" for r in col.of("event"))
            )
            await col.wait_for(lambda: any(r["cls"] == "agg" for r in col.of("series")))
            st = tel.status()["telemetry"]
            assert st["connected"] is True
    raw = [r for r in col.of("series") if r.get("name") == "env.temp" and r["cls"] == "raw"]
    got = [v for r in raw for v in r["values"]["value"]]
    assert got == sent  # 0.01 steps survive the scaled-integer round trip exactly
    assert all(r["verified"] is True for r in col.records if r.get("type") in ("series", "event"))
    assert col.consumer.counts["invalid"] == 0
    agg = [r for r in col.of("series") if r.get("name") == "env.temp:agg"]
    assert agg and set(agg[0]["values"]) == {"min", "max", "mean", "last", "count"}
    ev = next(r for r in col.of("event") if r["kind"] == "anomaly.start")
    assert ev["fields"]["score"] == 0.93 and ev["source"] == "loop1"
    states = col.of("state")
    assert states and states[-1]["value"]["online"] in (True, False)
    assert col.consumer.gaps() == []
    await asyncio.sleep(0)
