"""Spool: the cap holds with explicit loss records, corruption is quarantined, kill -9."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgerund.telemetry import codec
from edgerund.telemetry.codec import Cls, LossBlock, LossReason, SeriesBlock
from edgerund.telemetry.spool import Spool
from tests.telemetry.conftest import HubStandIn, make_config, make_ctx, telemetry_in

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
    seqs: list[int] = []
    peak = 0
    for chunk in range(20):  # three times the cap in total, 20 grouped commits
        futs = [sp.append(Cls.RAW, _blocks(rng, 1 + chunk * 20 + i), 1) for i in range(20)]
        seqs += [f.result() for f in futs]
        peak = max(peak, _files(tmp_path))
    sp.flush().result()
    evt = sp.fetch(Cls.EVT, 0, 10_000).result()
    raw_left = {r.seq for r in sp.fetch(Cls.RAW, 0, 10_000).result()}
    agg_left = {r.seq for r in sp.fetch(Cls.AGG, 0, 10_000).result()}
    sp.close()
    assert peak <= cap, f"spool files reached {peak} bytes, cap {cap}"
    losses = [
        b for r in evt for b in codec.decode(r.payload).batch.blocks if isinstance(b, LossBlock)
    ]
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
    sp2 = Spool(
        tmp_path,
        max_bytes=1 << 20,
        ttl_s=TTL,
        on_quarantine=lambda e, p: quarantined.append((e, p)),
    )
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


async def test_cap_loss_reaches_consumer_without_gaps(
    tmp_path: Path, mosquitto: Any, collector_factory: Any
) -> None:
    await asyncio.to_thread(mosquitto.stop)
    cfg = make_config(tmp_path, mosquitto, telemetry={"spool_max_mb": 0.3, "batch_max_age_s": 0.2})
    ctx = make_ctx(cfg, tmp_path)
    hub = HubStandIn([("env", "temp", "degC")])
    rng = np.random.default_rng(5)
    async with telemetry_in(ctx, hub) as tel:
        t = time.time() - 3600
        while tel.spool.stats.lost_batches < 5:
            for v in rng.normal(20, 5, 15000):  # noisy: compresses badly, fills the cap fast
                hub.emit("env", "temp", float(v), t)
                t += 0.01
            await asyncio.sleep(0.6)
            assert _files(tel.spool.dir) <= tel.spool.max_bytes
        st = tel.status()["telemetry"]
        assert st["lost_samples"] > 0 and st["spool_bytes"] <= st["spool_max_bytes"]
        await asyncio.to_thread(mosquitto.start)
        col = await collector_factory(mosquitto, client_id="cap-consumer", group=None)
        await tel.spool.aflush()
        last = tel.spool.last_seq
        await col.wait_for(
            lambda: (tel.spool.epoch, last) in col.seqs() or tel.spool.stats.backlog_batches == 0,
            60,
        )
        await col.wait_for(lambda: tel.spool.stats.backlog_batches == 0, 60)
        await asyncio.sleep(0.5)
    losses = col.of("loss")
    assert losses and sum(r["n_samples"] for r in losses) >= 1
    assert losses[0]["series"] == ["env.temp"] and losses[0]["reason"] == "evicted_cap"
    # Evicted sequences are explained by loss records, so the consumer sees no gap.
    assert col.consumer.gaps() == []


def test_page_cap_makes_room_and_never_passes_the_cap(tmp_path: Path) -> None:
    """Behind the byte budget SQLite's own page cap holds the size; the spool evicts (with
    loss records) before reaching it, so appends never fail."""
    cap = 1 << 20
    sp = Spool(tmp_path, max_bytes=cap, ttl_s=TTL, commit_interval_s=0.01)
    sp.db.budget = 1 << 40  # fault injection: the soft byte budget never triggers
    sp.open()
    rng = np.random.default_rng(11)
    seqs: list[int] = []
    peak = 0
    for chunk in range(30):
        futs = [sp.append(Cls.RAW, _blocks(rng, chunk * 10 + i, 1200), 1) for i in range(10)]
        seqs += [f.result() for f in futs]  # every append succeeds
        peak = max(peak, _files(tmp_path))
    sp.flush().result()
    evt = sp.fetch(Cls.EVT, 0, 10_000).result()
    left = {r.seq for r in sp.fetch(Cls.RAW, 0, 10_000).result()}
    sp.close()
    assert peak <= cap, peak
    lost = {
        s
        for r in evt
        for b in codec.decode(r.payload).batch.blocks
        if isinstance(b, LossBlock)
        for s in b.seqs
    }
    assert lost and lost | left == set(seqs) and not lost & left


def test_disk_full_fails_the_group_loudly_and_recovers(tmp_path: Path) -> None:
    """SQLITE_FULL (what a full disk gives) rolls the open group back: those appends fail
    with SpoolError (the component turns them into write_failed loss records), the error
    is counted, room is made, and later appends succeed."""
    from edgerund.telemetry.spool import SpoolError

    cap = 1 << 20
    sp = Spool(tmp_path, max_bytes=cap, ttl_s=TTL, commit_interval_s=0.01)
    sp.db.budget = 1 << 40
    sp.open()
    sp.db.max_pages = 1 << 30  # fault injection: blind the pre-check, so SQLite says FULL
    rng = np.random.default_rng(12)
    ok, failed = 0, 0
    for chunk in range(30):
        futs = [sp.append(Cls.RAW, _blocks(rng, chunk * 10 + i, 1200), 1) for i in range(10)]
        for f in futs:
            try:
                f.result()
                ok += 1
            except SpoolError:
                failed += 1
    tail = sp.append(Cls.RAW, _blocks(rng, 999, 100), 1).result()
    sp.close()
    assert failed > 0 and ok > failed and tail > 0
    assert sp.stats.write_errors > 0 and "full" in (sp.stats.last_error or "")
    assert _files(tmp_path) <= cap


def test_a_caller_giving_up_on_a_running_op_does_not_stop_the_writer(tmp_path: Path) -> None:
    """A future cancelled while its op runs in the writer thread (an uplink session torn
    down mid-fetch) used to raise InvalidStateError in the thread at set_result: the
    thread ended and the spool took no more batches. A running op cannot be cancelled
    now, and the writer goes on."""
    import threading

    from edgerund.telemetry.spool import _Answer

    sp = Spool(tmp_path, max_bytes=1 << 22, ttl_s=TTL, commit_interval_s=0.01)
    sp.open()
    try:
        started, release = threading.Event(), threading.Event()

        def slow() -> _Answer[None]:
            started.set()
            release.wait(5.0)
            return _Answer(None)

        fut = sp._submit("slow", slow)
        assert started.wait(5.0)
        assert fut.cancel() is False  # running: the caller may stop waiting, not cancel
        release.set()
        assert fut.result(5.0) is None
        # an op cancelled before it runs is skipped, and the writer still serves the next
        release.clear()
        blocker = sp._submit("slow", slow)
        queued = sp.fetch(Cls.RAW, 0, 10)
        assert queued.cancel() is True
        release.set()
        blocker.result(5.0)
        seq = sp.append(Cls.RAW, _blocks(np.random.default_rng(1), 0), 1).result(5.0)
        assert [r.seq for r in sp.fetch(Cls.RAW, 0, 10).result(5.0)] == [seq]
    finally:
        release.set()
        sp.close()
