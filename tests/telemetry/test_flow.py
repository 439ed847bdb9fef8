"""End-to-end through a real mosquitto: component -> spool -> uplink -> broker -> consumer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives import serialization

from edgerund.backend.consumer import Consumer
from edgerund.telemetry import codec
from tests.telemetry.conftest import HubStandIn, identity_in, make_config, make_ctx, telemetry_in


async def test_normal_flow_decoded_and_verified(
    tmp_path: Path, mosquitto: Any, collector_factory: Any, loop_guard: Any
) -> None:
    # blockbuster (in loop_guard) fails any blocking call on the loop deterministically;
    # the lag threshold only catches gross stalls (the CI machine has 2 shared cores).
    loop_guard.threshold_s = 0.3
    cfg = make_config(tmp_path, mosquitto)
    ctx = make_ctx(cfg, tmp_path)
    hub = HubStandIn([("env", "temp", "degC"), ("vib", "x", "g")])
    async with identity_in(ctx) as ident:
        key = Consumer.load_public_key(ident.public_key_pem().encode())
        spki = serialization.load_pem_public_key(ident.public_key_pem().encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        col = await collector_factory(mosquitto, public_keys=[key], require_signature=True)
        async with telemetry_in(ctx, hub, signer=ident) as tel:
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
            await col.wait_for(
                lambda: any(r.get("kind") == "anomaly.start.window" for r in col.of("event"))
            )
            st = tel.status()["telemetry"]
            assert st["connected"] is True
            n_before = len(col.records)
            # Upload the local ring on command: the same 50 samples come back as raw.
            async with aiomqtt.Client(
                mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
            ) as c:
                await c.subscribe("tlm/v1/lab/gw1/cmd/upload_raw/reply", qos=1)
                req = {"series": "env.*", "from_ms": int(t0 * 1000), "to_ms": int(t0 * 1000) + 4950}
                await c.publish("tlm/v1/lab/gw1/cmd/upload_raw", json.dumps(req).encode(), qos=1)
                async with asyncio.timeout(10):
                    async for m in c.messages:
                        reply = json.loads(m.payload if isinstance(m.payload, bytes) else b"")
                        break
            assert reply["ok"] is True and reply["samples"] == 50
            await col.wait_for(
                lambda: any(
                    r["cls"] == "raw" for r in col.records[n_before:] if r.get("type") == "series"
                )
            )
    uploaded = [r for r in col.records[n_before:] if r.get("type") == "series"]
    assert [v for r in uploaded for v in r["values"]["value"]] == sent
    del col.records[n_before:]
    raw = [r for r in col.of("series") if r.get("name") == "env.temp" and r["cls"] == "raw"]
    got = [v for r in raw for v in r["values"]["value"]]
    assert got == sent  # 0.01 steps survive the scaled-integer round trip exactly
    assert all(r["verified"] is True for r in col.records if r.get("type") in ("series", "event"))
    assert col.consumer.counts["invalid"] == 0
    agg = [r for r in col.of("series") if r.get("name") == "env.temp:agg"]
    assert agg and set(agg[0]["values"]) == {"min", "max", "mean", "last", "count"}
    ev = next(r for r in col.of("event") if r["kind"] == "anomaly.start")
    assert ev["fields"]["score"] == 0.93 and ev["source"] == "loop1"
    # The anomaly batch carries the raw window before the event from the local rings.
    pre = [r for r in col.of("series") if r["seq"] == ev["seq"] and r.get("name") == "env.temp"]
    assert pre and all(ev["t_ms"] - 2000 <= t <= ev["t_ms"] for t in pre[0]["t_ms"])
    assert pre[0]["values"]["value"] == sent[-len(pre[0]["t_ms"]) :] and len(pre[0]["t_ms"]) >= 15
    states = col.of("state")
    assert states and states[-1]["value"]["online"] in (True, False)
    assert col.consumer.gaps() == []
    # meta names the key that signs the batches (docs/telemetry.md section 4).
    metas = [r["value"] for r in col.of("meta")]
    assert metas and metas[-1]["key_id"] == codec.key_id_for(spki).hex()
    await asyncio.sleep(0)
