"""The PostgreSQL sink against a real PostgreSQL: schema, partitions, exactly-once."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgerund.backend.consumer import Consumer
from edgerund.backend.loadgen import SyntheticGateway, new_key
from edgerund.backend.pgsink import PostgresSink
from edgerund.telemetry import codec
from tests.fixtures.postgres import import_psycopg

psycopg = import_psycopg()

REPO = Path(__file__).resolve().parents[2]
DAY = 86_400_000


def _records(consumer: Consumer, gw: SyntheticGateway, payload: bytes) -> list[dict[str, Any]]:
    return consumer.handle(f"{gw.topic}/raw", payload)


def _batch(epoch: int, seq: int, t_ms: list[int], blocks: tuple[codec.Block, ...] = ()) -> bytes:
    t = np.array(t_ms, dtype=np.int64)
    v, _ = codec.quantize(np.arange(len(t_ms)) * 0.5, -1)
    return codec.encode(
        codec.Batch(codec.Cls.RAW, epoch, seq, 1, (codec.SeriesBlock(1, t, (v,), (-1,)), *blocks))
    )


def _count(dsn: str, q: str) -> Any:
    with psycopg.connect(dsn) as c:
        return c.execute(q).fetchone()[0]  # type: ignore[index]


def test_schema_and_partitions_ahead_on_demand_and_bounded(pg_dsn: str) -> None:
    sink = PostgresSink(pg_dsn, max_age_days=10)
    try:
        today = dt.datetime.now(dt.UTC).date()
        parts = set(sink.partitions())
        for d in (-1, 0, 1):
            day = today + dt.timedelta(days=d)
            for table in ("tlm_samples", "tlm_aggregates", "tlm_events"):
                assert f"{table}_{day:%Y%m%d}" in parts
        with psycopg.connect(pg_dsn) as c:
            kinds = dict(
                c.execute(
                    "SELECT relname, relkind FROM pg_class WHERE relname IN "
                    "('tlm_samples', 'tlm_batches', 'twins', 'tlm_gaps', 'tlm_losses')"
                ).fetchall()
            )
            assert kinds == {
                "tlm_samples": "p",  # declaratively partitioned
                "tlm_batches": "r",
                "twins": "r",
                "tlm_gaps": "r",
                "tlm_losses": "r",
            }
            (cons,) = c.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'tlm_batches_key'"
            ).fetchone()  # type: ignore[misc]
            assert cons == "PRIMARY KEY (gateway, epoch, seq)"
        consumer = Consumer(dedup=False)
        now_ms = int(time.time() * 1000)
        five_days_ago = now_ms - 5 * DAY
        topic = "tlm/v1/s/gw/raw"
        sink.write(consumer.handle(topic, _batch(1, 1, [five_days_ago, five_days_ago + 1000])))
        day5 = dt.datetime.fromtimestamp(five_days_ago / 1000, dt.UTC).date()
        assert f"tlm_samples_{day5:%Y%m%d}" in sink.partitions()
        # Outside the window (a wrong clock, or hostile timestamps): DEFAULT, no new tables.
        before = len(sink.partitions())
        spread = [now_ms - 400 * DAY, now_ms + 50 * DAY, now_ms + 100_000 * DAY]
        sink.write(consumer.handle(topic, _batch(1, 2, spread)))
        assert len(sink.partitions()) == before
        assert _count(pg_dsn, "SELECT count(*) FROM tlm_samples_default") == 3
        # Beyond what timestamptz should hold: not stored, counted on the batch row.
        sink.write(consumer.handle(topic, _batch(1, 3, [now_ms, codec.MAX_ABS - 1])))
        with psycopg.connect(pg_dsn) as c:
            row = c.execute("SELECT n_rows, dropped_rows FROM tlm_batches WHERE seq = 3").fetchone()
        assert row == (1, 1)
        # A second sink (another consumer process) on the same database reuses it all.
        PostgresSink(pg_dsn).close()
    finally:
        sink.close()


def test_redelivery_is_deduplicated_in_the_database(pg_dsn: str) -> None:
    key = new_key()
    gw = SyntheticGateway("gw-a", key)
    consumer = Consumer(public_keys=[key.public_key()], dedup=False)
    sink = PostgresSink(pg_dsn)
    try:
        p1, p2 = gw.batch(1), gw.batch(10)  # batch 10 carries an event as well
        s = sink.write_many([_records(consumer, gw, p1), _records(consumer, gw, p2)])
        assert (s.new_batches, s.duplicates, s.rows) == (2, 0, 2 * 40 + 1)
        # The same two again (a lost PUBACK), and one twice within a group.
        s = sink.write_many(
            [_records(consumer, gw, p2), _records(consumer, gw, p1), _records(consumer, gw, p1)]
        )
        assert (s.new_batches, s.duplicates, s.rows) == (0, 3, 0)
        assert _count(pg_dsn, "SELECT count(*) FROM tlm_samples") == 80
        assert _count(pg_dsn, "SELECT count(*) FROM tlm_events") == 1
        assert _count(pg_dsn, "SELECT count(*) FROM tlm_batches") == 2
        assert _count(pg_dsn, "SELECT bool_and(verified) FROM tlm_batches")
        assert sink.duplicates_in_db() == 0
    finally:
        sink.close()


def test_two_sinks_racing_on_the_same_batches_write_each_once(pg_dsn: str) -> None:
    key = new_key()
    gws = [SyntheticGateway(f"gw-{i}", key, samples=5) for i in range(3)]
    payloads = [(g, g.batch(s)) for g in gws for s in range(1, 41)]
    results: list[tuple[int, int]] = []

    def worker(order: int) -> None:
        consumer = Consumer(dedup=False)
        sink = PostgresSink(pg_dsn)
        items = payloads if order == 0 else list(reversed(payloads))
        new = dup = 0
        for i in range(0, len(items), 7):
            s = sink.write_many([_records(consumer, g, p) for g, p in items[i : i + 7]])
            new, dup = new + s.new_batches, dup + s.duplicates
        sink.close()
        results.append((new, dup))

    ts = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert len(results) == 2
    assert sum(n for n, _ in results) == 120 and sum(d for _, d in results) == 120
    assert _count(pg_dsn, "SELECT count(*) FROM tlm_samples") == 120 * 10
    sink = PostgresSink(pg_dsn)
    assert sink.duplicates_in_db() == 0
    sink.close()


def test_a_consumer_killed_inside_the_transaction_leaves_no_partial_batch(
    pg_dsn: str, tmp_path: Path
) -> None:
    """kill -9 between the COPY of the samples and the commit: nothing of the batch stays,
    and its redelivery is then written in full."""
    script = tmp_path / "die.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            from edgerund.backend.consumer import Consumer
            from edgerund.backend.loadgen import SyntheticGateway, new_key
            from edgerund.backend.pgsink import PostgresSink

            sink = PostgresSink({pg_dsn!r})
            real = sink._copy_rows
            def copy_then_die(cur, fresh):
                n = real(cur, fresh)
                assert n > 0
                os.kill(os.getpid(), signal.SIGKILL)
            sink._copy_rows = copy_then_die
            gw = SyntheticGateway("gw-k", new_key())
            sink.write(Consumer(dedup=False).handle(gw.topic + "/raw", gw.batch(1)))
            """
        )
    )
    r = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env={"PYTHONPATH": str(REPO)}, timeout=60
    )
    assert r.returncode == -9
    time.sleep(0.3)  # the server notices the dead backend and rolls back
    assert _count(pg_dsn, "SELECT count(*) FROM tlm_batches") == 0
    assert _count(pg_dsn, "SELECT count(*) FROM tlm_samples") == 0
    gw = SyntheticGateway("gw-k", new_key())
    sink = PostgresSink(pg_dsn)
    s = sink.write(Consumer(dedup=False).handle(gw.topic + "/raw", gw.batch(1)))
    assert s is None
    assert _count(pg_dsn, "SELECT count(*) FROM tlm_samples") == 40
    sink.close()


def test_gaps_come_from_the_database_and_losses_close_them(pg_dsn: str) -> None:
    consumer = Consumer(dedup=False)
    sink = PostgresSink(pg_dsn)
    now = int(time.time() * 1000)
    loss = codec.LossBlock(codec.LossReason(1), codec.Cls.RAW, now, now, 5, seqs=(4,))
    try:
        for seq, blocks in ((1, ()), (2, ()), (5, (loss,)), (9, ())):
            sink.write(consumer.handle("tlm/v1/s/gw/raw", _batch(7, seq, [now + seq], blocks)))
        gaps = sink.refresh_gaps()
        assert [(g["from_seq"], g["to_seq"]) for g in gaps] == [(3, 3), (6, 8)]
        with psycopg.connect(pg_dsn) as c:
            assert c.execute("SELECT count(*) FROM tlm_gaps").fetchone() == (2,)
        sink.write(consumer.handle("tlm/v1/s/gw/raw", _batch(7, 3, [now + 3])))
        assert [(g["from_seq"], g["to_seq"]) for g in sink.refresh_gaps()] == [(6, 8)]
        assert _count(pg_dsn, "SELECT count(*) FROM tlm_gaps") == 1
        assert _count(pg_dsn, "SELECT count(*) FROM tlm_losses") == 1
    finally:
        sink.close()


@pytest.mark.parametrize("kind", ["state", "meta"])
def test_state_and_meta_are_upserted(pg_dsn: str, kind: str) -> None:
    consumer = Consumer(dedup=False)
    sink = PostgresSink(pg_dsn)
    doc = {"online": True} if kind == "state" else {"schema_ver": 1, "series": [{"id": 1}]}
    try:
        for _ in range(2):
            sink.write(consumer.handle(f"tlm/v1/s/gw/{kind}", codec_json(doc)))
        table = "tlm_gateways" if kind == "state" else "tlm_meta"
        assert _count(pg_dsn, f"SELECT count(*) FROM {table}") == 1
    finally:
        sink.close()


def codec_json(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode()


def test_hostile_batches_are_set_aside_not_retried_forever(pg_dsn: str) -> None:
    """Content the codec accepts but PostgreSQL cannot hold: NUL in strings (text, jsonb),
    a sequence of 2**63, loss sequences summing past bigint. Without the defence each is a
    poison message: the transaction fails, the message is never acknowledged, comes back
    after the reconnect and fails again, and the good batches of its group never land."""
    consumer = Consumer(dedup=False)
    sink = PostgresSink(pg_dsn)
    now = int(time.time() * 1000)
    topic = "tlm/v1/s/gw/raw"
    nul_event = codec.EventBlock(now, "al\x00arm", "src\x00", {"k\x00": "v\x00", "n": [1, "\x00"]})
    huge_loss = codec.LossBlock(
        codec.LossReason(1),
        codec.Cls.RAW,
        now,
        now,
        1,
        seqs=(1 << 62, 1 << 63, (1 << 63) + (1 << 62)),
    )
    msgs = [
        consumer.handle(topic, _batch(1, 1, [now])),
        consumer.handle(topic, _batch(1, 2, [now], (nul_event,))),
        consumer.handle(topic, _batch(1, 1 << 63, [now])),
        consumer.handle(topic, _batch(1, 3, [now], (huge_loss,))),
        consumer.handle(topic, _batch(1, 4, [now])),
        consumer.handle("tlm/v1/s/g\x00w/raw", _batch(1, 5, [now])),  # past a lax broker
        consumer.handle("tlm/v1/s/gw/state", b'{"online": true, "why": "a\\u0000b"}'),
    ]
    assert all(r["type"] != "invalid" for m in msgs for r in m), msgs
    try:
        s = sink.write_many(msgs)
        assert (s.new_batches, s.rejected, s.duplicates) == (4, 2, 0)
        with psycopg.connect(pg_dsn) as c:
            assert c.execute("SELECT gateway, seq FROM tlm_batches ORDER BY seq").fetchall() == [
                ("gw", 1),
                ("gw", 2),
                ("gw", 4),
                ("g\ufffdw", 5),
            ]
            ev = c.execute("SELECT kind, source, fields FROM tlm_events").fetchone()
            assert ev == ("al\ufffdarm", "src\ufffd", {"k\ufffd": "v\ufffd", "n": [1, "\ufffd"]})
            rej = dict(c.execute("SELECT seq, error FROM tlm_rejected").fetchall())
            assert set(rej) == {1 << 63, 3} and "range" in rej[1 << 63] and "range" in rej[3]
            assert c.execute("SELECT state->>'why' FROM tlm_gateways").fetchone() == ("a\ufffdb",)
        # The redelivery of the whole group is now all duplicates or already set aside.
        s = sink.write_many(msgs)
        assert (s.new_batches, s.rejected + s.duplicates) == (0, 6)
    finally:
        sink.close()
