"""Two `edgerund telemetry consume --postgres` processes in one shared-subscription group,
real mosquitto, real PostgreSQL, several publishers; one consumer is killed with SIGKILL
mid-run and restarted: every batch is in the database exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgerund.backend.loadgen import SyntheticGateway, meta_bytes, new_key, public_pem, publish
from tests.fixtures.postgres import import_psycopg

psycopg = import_psycopg()

REPO = Path(__file__).resolve().parents[2]


class ConsumerProc:
    def __init__(self, broker: Any, dsn: str, client_id: str, pem: Path, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgerund.cli",
                "telemetry",
                "consume",
                "--host",
                broker.host,
                "--port",
                str(broker.port),
                "--client-id",
                client_id,
                "--group",
                "sinks",
                "--public-key",
                str(pem),
                "--postgres",
                dsn,
                "--gap-report-s",
                "1",
                "--out",
                str(out),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.strip()]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(r.get("type") == "ready" for r in self.records()):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"consumer exited {self.proc.returncode}: {err}")
            assert time.monotonic() < deadline, "consumer did not subscribe"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        if self.proc.stderr:
            self.proc.stderr.close()
        return rc


def _q(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as c:
        return c.execute(sql).fetchall()


def test_two_consumers_share_the_load_and_stay_exactly_once_across_a_kill(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    key = new_key()
    pem = tmp_path / "gw.pem"
    pem.write_bytes(public_pem(key))
    n_gw, per_gw = 6, 60
    gws = [SyntheticGateway(f"gw-{i}", key, site=f"plant-{i % 2}") for i in range(n_gw)]
    c1 = ConsumerProc(mosquitto, pg_dsn, "sink-1", pem, tmp_path / "c1.jsonl")
    c2 = ConsumerProc(mosquitto, pg_dsn, "sink-2", pem, tmp_path / "c2.jsonl")
    procs = [c1, c2]
    try:
        c1.wait_ready()
        c2.wait_ready()
        # Three publishers, two gateways each, at a pace that spans the kill below.
        errors: list[BaseException] = []

        # Encoded up front: the codec's zstd context is not shared between threads.
        shares = [
            [(f"{g.topic}/raw", g.batch(s)) for s in range(1, per_gw + 1) for g in gws[i::3]]
            for i in range(3)
        ]

        def publisher(mine: list[SyntheticGateway], n: int) -> None:
            try:
                items = shares[n]
                retained = [(f"{g.topic}/meta", meta_bytes()) for g in mine]
                publish(
                    mosquitto.host,
                    mosquitto.port,
                    items,
                    retained=retained,
                    client_id=f"pub-{n}",
                    rate_per_s=40,
                )
            except BaseException as exc:
                errors.append(exc)

        pubs = [
            threading.Thread(target=publisher, args=(gws[i::3], i), daemon=True) for i in range(3)
        ]
        for t in pubs:
            t.start()
        deadline = time.monotonic() + 60
        while _q(pg_dsn, "SELECT count(*) FROM tlm_batches")[0][0] < 60:
            assert time.monotonic() < deadline, "consumers wrote nothing"
            time.sleep(0.05)
        c1.proc.kill()  # SIGKILL, mid-run: whatever it held unacknowledged stays with the broker
        assert c1.proc.wait(10) == -signal.SIGKILL
        time.sleep(0.5)
        c1 = ConsumerProc(mosquitto, pg_dsn, "sink-1", pem, tmp_path / "c1b.jsonl")
        procs.append(c1)
        c1.wait_ready()
        for t in pubs:
            t.join(120)
        assert not errors, errors
        total = n_gw * per_gw
        deadline = time.monotonic() + 60
        while _q(pg_dsn, "SELECT count(*) FROM tlm_batches")[0][0] < total:
            assert time.monotonic() < deadline, (
                f"batches lost: {_q(pg_dsn, 'SELECT count(*) FROM tlm_batches')[0][0]} of {total}"
            )
            time.sleep(0.1)
        keys = set(_q(pg_dsn, "SELECT gateway, epoch, seq FROM tlm_batches"))
        assert keys == {(g.gateway, g.epoch, s) for g in gws for s in range(1, per_gw + 1)}
        rows = sum(g.rows_per_batch(s) for g in gws for s in range(1, per_gw + 1))
        n_samples = _q(pg_dsn, "SELECT count(*) FROM tlm_samples")[0][0]
        n_events = _q(pg_dsn, "SELECT count(*) FROM tlm_events")[0][0]
        assert n_samples + n_events == rows
        dup = _q(
            pg_dsn,
            "SELECT count(*) FROM (SELECT 1 FROM tlm_samples GROUP BY gateway, series, channel, t "
            "HAVING count(*) > 1) x",
        )[0][0]
        assert dup == 0  # duplicates_in_db
        # Both members took a share.
        by = dict(_q(pg_dsn, "SELECT consumer, count(*) FROM tlm_batches GROUP BY consumer"))
        assert set(by) == {"sink-1", "sink-2"} and min(by.values()) > total // 10, by
        # (a restarted member may take its queued backlog before the retained meta comes
        # back: those rows carry `#id`, and tlm_meta names them)
        names = {r[0] for r in _q(pg_dsn, "SELECT DISTINCT series FROM tlm_samples")}
        assert "env.temp" in names and names <= {"env.temp", "power.v", "#1", "#2"}
        assert _q(pg_dsn, "SELECT count(*) FROM tlm_meta")[0][0] == n_gw
        assert _q(pg_dsn, "SELECT bool_and(verified) FROM tlm_batches")[0][0] is True
        # Gaps are refreshed from the database every second: none stays open.
        deadline = time.monotonic() + 10
        while _q(pg_dsn, "SELECT count(*) FROM tlm_gaps")[0][0] != 0:
            assert time.monotonic() < deadline, _q(pg_dsn, "SELECT * FROM tlm_gaps")
            time.sleep(0.2)
    finally:
        for p in procs:
            p.stop()
    for p in (procs[1], procs[2]):
        summary = [r for r in p.records() if r.get("type") == "summary"]
        assert summary and summary[-1]["invalid"] == 0


def test_a_database_outage_loses_nothing_and_duplicates_nothing(
    mosquitto: Any, postgres_server: Any, tmp_path: Path
) -> None:
    """PostgreSQL stops mid-stream and comes back: the consumer acknowledged only what was
    committed, so the broker redelivers the rest after the consumer reconnects."""
    from edgerund.backend.devservers import PostgresServer

    pg = PostgresServer(postgres_server.bindir)  # its own: this one is stopped mid-test
    pg.start()
    c1 = None
    try:
        dsn = pg.create_database("outage")
        key = new_key()
        pem = tmp_path / "gw.pem"
        pem.write_bytes(public_pem(key))
        gws = [SyntheticGateway(f"gw-{i}", key) for i in range(2)]
        c1 = ConsumerProc(mosquitto, dsn, "sink-o", pem, tmp_path / "o.jsonl")
        c1.wait_ready()
        items = [(f"{g.topic}/raw", g.batch(s)) for s in range(1, 61) for g in gws]
        pub = threading.Thread(
            target=publish, args=(mosquitto.host, mosquitto.port, items), kwargs={"rate_per_s": 30}
        )
        pub.start()
        deadline = time.monotonic() + 60
        while _q(dsn, "SELECT count(*) FROM tlm_batches")[0][0] < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pg.stop()
        time.sleep(2.0)  # batches keep arriving while the database is away
        pg.start()
        pub.join(60)
        deadline = time.monotonic() + 60
        while _q(dsn, "SELECT count(*) FROM tlm_batches")[0][0] < len(items):
            assert c1.proc.poll() is None, "the consumer gave up"
            assert time.monotonic() < deadline, _q(dsn, "SELECT count(*) FROM tlm_batches")
            time.sleep(0.1)
        assert _q(dsn, "SELECT count(*) FROM tlm_samples")[0][0] == len(items) * 40
        dup = _q(
            dsn,
            "SELECT count(*) FROM (SELECT 1 FROM tlm_samples GROUP BY gateway, series, channel, t "
            "HAVING count(*) > 1) x",
        )[0][0]
        assert dup == 0
    finally:
        if c1 is not None:
            c1.stop()
        pg.cleanup()


def test_postgres_mode_requires_a_stable_client_id(pg_dsn: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "telemetry", "consume", "--postgres", pg_dsn],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 2 and b"--client-id" in r.stderr
