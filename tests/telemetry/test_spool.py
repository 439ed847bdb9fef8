"""Spool: the cap holds with explicit loss records, corruption is quarantined, kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edgerund.telemetry import codec
from edgerund.telemetry.codec import Cls, LossBlock, LossReason, SeriesBlock
from edgerund.telemetry.component import TelemetryComponent
from edgerund.telemetry.spool import Spool
from tests.telemetry.conftest import HubStandIn, make_config, make_ctx

REPO = Path(__file__).resolve().parents[2]
TTL = {Cls.EVT: 1e6, Cls.AGG: 1e6, Cls.RAW: 1e6}


def _files(d: Path) -> int:
    return sum(os.path.getsize(d / f) for f in ("spool.db", "spool.db-wal") if (d / f).exists())


def _blocks(rng: np.random.Generator, i: int, n: int = 400) -> list[codec.Block]:
    t = 1_700_000_000_000 + i * 60_000 + np.arange(n, dtype=np.int64) * 100
    return [SeriesBlock(3, t, (rng.integers(-30000, 30000, n),), (-3,))]


def test_cap_holds_with_loss_records(tmp_path: Path) -> None:
    cap = 512 * 1024
    sp = Spool(tmp_path, max_bytes=cap, ttl_s=TTL, commit_interval_s=0.01)
    sp.open()
    rng = np.random.default_rng(7)
    agg_seq = sp.append(Cls.AGG, _blocks(rng, 0, 50), 1).result()
    seqs = [sp.append(Cls.RAW, _blocks(rng, i), 1).result() for i in range(1, 200)]
    peak = 0
    for i in range(200, 400):  # three times the cap in total
        seqs.append(sp.append(Cls.RAW, _blocks(rng, i), 1).result())
        peak = max(peak, _files(tmp_path))
    sp.flush().result()
    evt = sp.fetch(Cls.EVT, 0, 10_000).result()
    raw_left = {r.seq for r in sp.fetch(Cls.RAW, 0, 10_000).result()}
    agg_left = {r.seq for r in sp.fetch(Cls.AGG, 0, 10_000).result()}
    sp.close()
    assert peak <= cap, f"spool files reached {peak} bytes, cap {cap}"
    losses = [b for r in evt for b in codec.decode(r.payload).batch.blocks if isinstance(b, LossBlock)]
    assert losses and all(b.reason is LossReason.EVICTED_CAP and b.cls is Cls.RAW for b in losses)
    lost = {s for b in losses for s in b.seqs}
    # Every raw batch is either still spooled or named in a loss record: nothing vanished.
    assert lost | raw_left == set(seqs) and not (lost & raw_left)
    assert agg_left == {agg_seq}  # raw goes first: the agg row survived
    assert sum(b.n_samples for b in losses) == sp.stats.lost_samples == 400 * len(lost)
    assert all(b.series_ids == (3,) for b in losses)


def test_corrupt_spool_is_quarantined_not_deleted(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, ttl_s=TTL)
    sp.open()
    sp.append(Cls.RAW, _blocks(np.random.default_rng(1), 0, 10), 1).result()
    old_epoch = sp.epoch
    sp.close()
    db = tmp_path / "spool.db"
    data = bytearray(db.read_bytes())
    data[100:4096] = os.urandom(3996)  # smash the header page's schema
    db.write_bytes(bytes(data))
    quarantined: list[tuple[int, str]] = []
    sp2 = Spool(tmp_path, max_bytes=1 << 20, ttl_s=TTL, on_quarantine=lambda e, p: quarantined.append((e, p)))
    sp2.open()
    try:
        assert sp2.epoch > old_epoch
        assert len(quarantined) == 1 and quarantined[0][0] == sp2.epoch
        moved = Path(quarantined[0][1])
        assert moved.exists() and moved.read_bytes() == bytes(data)  # kept byte for byte
        assert sp2.stats.quarantined == [str(moved)]
        seq = sp2.append(Cls.RAW, _blocks(np.random.default_rng(2), 1, 10), 1).result()
        assert seq == 1  # a new dedup namespace: (new epoch, 1)
        d = codec.decode(sp2.fetch(Cls.RAW, 0, 10).result()[0].payload)
        assert d.batch.epoch == sp2.epoch
    finally:
        sp2.close()
    (tmp_path / "spool.db").unlink()
    (tmp_path / "spool.db").write_bytes(b"this is not a database at all" * 100)
    sp3 = Spool(tmp_path, max_bytes=1 << 20, ttl_s=TTL)
    sp3.open()
    sp3.close()
    assert len(list(tmp_path.glob("spool.db.corrupt-*"))) >= 2
    assert sp3.epoch > sp2.epoch


async def test_cap_loss_reaches_consumer_without_gaps(tmp_path: Path, mosquitto: Any, collector_factory: Any) -> None:
    await asyncio.to_thread(mosquitto.stop)
    cfg = make_config(tmp_path, mosquitto, telemetry={"spool_max_mb": 0.5, "batch_max_age_s": 0.2})
    ctx = make_ctx(cfg, tmp_path)
    hub = HubStandIn([("env", "temp", "degC")])
    ctx.components["hub"] = hub
    rng = np.random.default_rng(5)
    async with TelemetryComponent(ctx) as tel:
        t = time.time() - 3600
        while tel.spool.stats.lost_batches < 5:
            for v in rng.normal(20, 5, 400):  # noisy: compresses badly, fills the cap fast
                hub.emit("env", "temp", float(v), t)
                t += 0.01
            await asyncio.sleep(0.25)
            assert _files(tel.spool.dir) <= tel.spool.max_bytes
        st = tel.status()["telemetry"]
        assert st["lost_samples"] > 0 and st["spool_bytes"] <= st["spool_max_bytes"]
        await asyncio.to_thread(mosquitto.start)
        col = await collector_factory(mosquitto, client_id="cap-consumer", group=None)
        await tel.spool.aflush()
        last = tel.spool._next_seq - 1
        await col.wait_for(lambda: (tel.spool.epoch, last) in col.seqs() or tel.spool.stats.backlog_batches == 0, 60)
        await col.wait_for(lambda: tel.spool.stats.backlog_batches == 0, 60)
        await asyncio.sleep(0.5)
    losses = col.of("loss")
    assert losses and sum(r["n_samples"] for r in losses) >= 1
    assert losses[0]["series"] == ["env.temp"] and losses[0]["reason"] == "evicted_cap"
    # Evicted sequences are explained by loss records, so the consumer sees no gap.
    assert col.consumer.gaps() == []


def test_kill_9_loses_at_most_the_open_batch(tmp_path: Path, mosquitto: Any) -> None:
    mosquitto.stop()  # an outage from the start: everything stays in the spool
    cfg = make_config(tmp_path, mosquitto, telemetry={"batch_max_age_s": 1.0, "commit_interval_ms": 200})
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(msgspec.to_builtins(cfg)))
    db = Path(cfg.paths.state_dir) / "telemetry" / "spool.db"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tests.telemetry.component_proc", str(cfg_path)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def committed() -> tuple[set[int], int]:
        if not db.exists():
            return set(), 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            rows = c.execute("SELECT seq, t_last_ms FROM batches WHERE cls=2").fetchall()
        return {r[0] for r in rows}, max((r[1] for r in rows), default=0)

    p = start()
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        t0 = time.monotonic()
        while len(committed()[0]) < 4:
            assert time.monotonic() - t0 < 30 and p.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(p.pid, signal.SIGKILL)
        killed_at_ms = time.time() * 1000
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    seqs, last_t = committed()
    # What was committed reaches to within one open batch (+ commit interval, sealing
    # tick and scheduling slack) of the kill.
    assert killed_at_ms - last_t <= (1.0 + 0.2 + 0.5 + 1.5) * 1000, killed_at_ms - last_t
    mosquitto.start()
    from edgerund.telemetry.consumer import Consumer

    got: set[int] = set()
    c = Consumer()

    async def consume_while_restarted() -> None:
        import aiomqtt

        async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as cl:
            await cl.subscribe("tlm/v1/lab/gw1/raw", qos=1)
            p2 = start()
            try:
                async with asyncio.timeout(30):
                    async for m in cl.messages:
                        for r in c.handle(str(m.topic), m.payload if isinstance(m.payload, bytes) else b""):
                            got.add(r["seq"])
                        if seqs <= got:
                            break
            finally:
                p2.send_signal(signal.SIGTERM)
                await asyncio.to_thread(p2.wait, 15)

    asyncio.run(consume_while_restarted())
    assert seqs <= got  # every batch committed before the kill was delivered after restart
