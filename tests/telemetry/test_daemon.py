"""The whole daemon (edgerund run --simulate, real bme280 driver on its emulator) killed
with SIGKILL during a broker outage: after a restart the spooled backlog is delivered."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiomqtt

from edgerund.backend.consumer import Consumer
from tests.helpers.daemon import DaemonProcess

BATCH_AGE_S = 1.0
COMMIT_MS = 200


def _overrides(port: int) -> dict[str, Any]:
    return {
        "sensors": [
            {
                "id": "cabinet",
                "driver": "bme280",
                "bus": 1,
                "address": 0x76,
                "rate_hz": 10,
                "mode": "normal",
                "standby_ms": 62.5,
            }
        ],
        "telemetry": {
            "batch_max_age_s": BATCH_AGE_S,
            "commit_interval_ms": COMMIT_MS,
            "series": [{"match": "cabinet.*", "raw": True, "resolution": 0.01}],
        },
        "uplink": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": port,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
        },
    }


def _committed(db: Path) -> tuple[set[int], int]:
    if not db.exists():
        return set(), 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT seq, t_last_ms, cls FROM batches WHERE acked=0").fetchall()
    return {r[0] for r in rows}, max((r[1] for r in rows if r[2] == 2), default=0)


def test_sigkill_during_outage_then_backlog_delivered(tmp_path: Path, mosquitto: Any) -> None:
    mosquitto.stop()
    d = DaemonProcess(tmp_path, _overrides(mosquitto.port), simulate=True)
    db = tmp_path / "state" / "telemetry" / "spool.db"
    with d:
        d.wait_ready()
        t0 = time.monotonic()
        while True:
            st = d.call("telemetry")
            if st["backlog_batches"] >= 5:
                break
            assert time.monotonic() - t0 < 30, st
            time.sleep(0.2)
        assert st["connected"] is False and "refused" in (st["last_error"] or "")
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGKILL)
        killed_ms = time.time() * 1000
        d.proc.wait(10)
    seqs, last_t = _committed(db)
    assert len(seqs) >= 3 and last_t > 0
    # A kill -9 loses at most the open batch: committed data reaches to within
    # batch_max_age_s (+ commit interval, the sealer's tick and scheduling slack) of it.
    assert killed_ms - last_t <= (BATCH_AGE_S + COMMIT_MS / 1000 + 0.5 + 1.5) * 1000, (
        killed_ms - last_t
    )

    mosquitto.start()
    consumer = Consumer()
    got: dict[int, int] = {}

    async def consume() -> None:
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            await c.subscribe("tlm/v1/lab/test-gw/#", qos=1)
            d2 = DaemonProcess(tmp_path, _overrides(mosquitto.port), simulate=True)
            await asyncio.to_thread(d2.start)
            try:
                async with asyncio.timeout(40):
                    async for m in c.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        for r in consumer.handle(str(m.topic), payload):
                            if r.get("type") == "series" and r["cls"] == "raw":
                                got[r["seq"]] = got.get(r["seq"], 0) + len(r["t_ms"])
                            elif r.get("type") in ("event", "loss", "series"):
                                got.setdefault(r["seq"], 1)
                        if seqs <= set(got):
                            break
            finally:
                await asyncio.to_thread(d2.stop)

    asyncio.run(consume())
    assert seqs <= set(got), sorted(seqs - set(got))
    assert all(got[s] > 0 for s in seqs)
