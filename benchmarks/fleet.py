"""Fleet benchmark, backend part: how fast the reference consumer writes to PostgreSQL,
how it scales with members of one shared-subscription group, and that a kill -9 in the
middle loses and duplicates nothing.

Set-up (all real, all local): mosquitto and a PostgreSQL cluster with default durability
(fsync on, synchronous_commit on), both throw-away (edgerund.backend.devservers), and
`edgerund telemetry consume --postgres` processes. Each batch is a signed v1 batch of a
synthetic gateway (edgerund.backend.loadgen): two series of 20 one-second samples, an
event every tenth batch (41.1 rows per batch on average).

Throughput: the consumers are started and subscribed, then paused (SIGSTOP) while the
publishers put N batches on the broker, then resumed: the drain rate is N divided by the
span of the rows' commit times (`tlm_batches.committed`), so process start-up and
publishing speed are not measured. One consumer, then two in one group (separate
databases). `consumer_scaling` = two / one; it needs a free core per consumer, and the
database and broker share the same cores here.

Kill: two consumers drain a live stream; one is killed with SIGKILL half-way and
restarted with the same client id; `duplicates_in_db` counts rows stored twice and
`batches_lost` batches missing once everything is delivered.

Rollout: ten real simulated gateways (edgerund/toolkit/simfleet.py: the daemon, its twin
and update pipeline on a light simulated config) on the same broker; `edgerund fleet
rollout` as a process, waves `1,10%,50%,100%`, no soak, its state in PostgreSQL.
`rollout_s` is the wall time of the tool for a good bundle (selection, bundle published,
every gateway fetching, verifying, prechecking, trying and committing it, wave by wave);
then a bad bundle (golden vectors its model does not reproduce: the precheck on the
device refuses it) must halt: `halted_after_gateways` is how many gateways it reached.
`--only sink|rollout` runs one half (the other's figures are null).

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from edgerund.backend.devservers import MosquittoServer, PostgresServer, find_postgres_bin
from edgerund.backend.loadgen import SyntheticGateway, meta_bytes, new_key, public_pem, publish
from edgerund.backend.pgsink import PostgresSink
from edgerund.publisher import build as B

REPO = Path(__file__).resolve().parents[1]
N_GATEWAYS = 8
PER_GW = 300
ROLLOUT_GATEWAYS = 10
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"


def consumer(
    broker: MosquittoServer, dsn: str, cid: str, pem: Path, out: Path
) -> subprocess.Popen[bytes]:
    """A consumer process; the group is per phase (the client id's prefix): a stopped
    member's persistent session stays in its group and keeps receiving its share."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgerund.cli",
            "telemetry",
            "consume",
            "--port",
            str(broker.port),
            "--host",
            broker.host,
            "--client-id",
            cid,
            "--group",
            cid.split("-")[0],
            "--public-key",
            str(pem),
            "--postgres",
            dsn,
            "--gap-report-s",
            "3600",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(out: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out.exists() and '"ready"' in out.read_text()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumer {out.name} did not subscribe")
        time.sleep(0.05)


def count(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        return int(c.execute("SELECT count(*) FROM tlm_batches").fetchone()[0])  # type: ignore[index]


def wait_count(dsn: str, n: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while count(dsn) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count(dsn)} of {n} batches arrived")
        time.sleep(0.1)


def publish_all(
    broker: MosquittoServer, gws: list[SyntheticGateway], seqs: range, rate: float | None
) -> None:
    """Three publishers in parallel, each with its share of the gateways. The payloads
    are encoded here first: the codec's zstd context is not shared between threads."""
    errors: list[BaseException] = []
    shares = [
        ([(f"{g.topic}/raw", g.batch(s)) for s in seqs for g in gws[i::3]], gws[i::3])
        for i in range(3)
    ]

    def one(i: int) -> None:
        items, mine = shares[i]
        try:
            publish(
                broker.host,
                broker.port,
                items,
                retained=[(f"{g.topic}/meta", meta_bytes()) for g in mine],
                client_id=f"bench-pub-{i}",
                rate_per_s=rate / 3 if rate else None,
                timeout_s=600,
            )
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def drain_rate(
    broker: MosquittoServer,
    pg: PostgresServer,
    work: Path,
    pem: Path,
    key: Any,
    members: int,
    tag: str,
) -> tuple[float, float]:
    """(batches/s, rows/s) of `members` consumers draining a queued backlog."""
    dsn = pg.create_database(f"drain_{tag}")
    PostgresSink(dsn).close()  # schema and partitions before the clock starts
    gws = [SyntheticGateway(f"{tag}-gw-{i}", key) for i in range(N_GATEWAYS)]
    procs = []
    for m in range(members):
        out = work / f"{tag}-{m}.jsonl"
        procs.append(consumer(broker, dsn, f"{tag}-c{m}", pem, out))
        wait_ready(out)
    try:
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        publish_all(broker, gws, range(1, PER_GW + 1), None)
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)
        n = N_GATEWAYS * PER_GW
        wait_count(dsn, n)
    finally:
        stop(procs)
    with psycopg.connect(dsn) as c:
        span, rows = c.execute(
            "SELECT extract(epoch FROM max(committed) - min(committed)), sum(n_rows) FROM tlm_batches"
        ).fetchone()  # type: ignore[misc]
    span = max(float(span), 1e-3)
    return n / span, float(rows) / span


def kill_restart(
    broker: MosquittoServer, pg: PostgresServer, work: Path, pem: Path, key: Any
) -> tuple[int, int]:
    dsn = pg.create_database("kill")
    PostgresSink(dsn).close()
    gws = [SyntheticGateway(f"k-gw-{i}", key) for i in range(N_GATEWAYS)]
    outs = [work / "k-0.jsonl", work / "k-1.jsonl"]
    procs = [consumer(broker, dsn, f"k-c{m}", pem, outs[m]) for m in range(2)]
    for o in outs:
        wait_ready(o)
    n = N_GATEWAYS * 150
    pub = threading.Thread(target=publish_all, args=(broker, gws, range(1, 151), 400.0))
    pub.start()
    try:
        while count(dsn) < n // 2:
            time.sleep(0.05)
        procs[0].kill()
        procs[0].wait(10)
        out = work / "k-0b.jsonl"
        procs.append(consumer(broker, dsn, "k-c0", pem, out))
        wait_ready(out)
        pub.join()
        deadline = time.monotonic() + 120
        while count(dsn) < n and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(procs)
    sink = PostgresSink(dsn)
    dup = sink.duplicates_in_db()
    sink.close()
    return dup, n - count(dsn)


def _bundle(out: Path, version: str, counter: int, bad: bool) -> Path:
    golden = None
    if bad:  # expected outputs the model does not reproduce: the precheck refuses it
        import numpy as np

        ref = B.make_golden((REF / "model.onnx").read_bytes(), n=4)
        with np.load(io.BytesIO(ref)) as z:
            arrays = {k: z[k] + (1000.0 if k.startswith("out.") else 0.0) for k in z.files}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        golden = out.with_suffix(".npz")
        golden.write_bytes(buf.getvalue())
    B.build_from_dir(
        REF, out, [B.load_private(DEV / "DEVELOPMENT-ONLY.key")], version=version,
        security_counter=counter, exclude=("model_fp32.onnx",), health={"probation_s": 0.5},
        golden=golden,
    )  # fmt: skip
    return out


def _fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "fleet", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _wait_reported(broker: MosquittoServer, gateways: set[str], timeout_s: float = 180.0) -> None:
    import paho.mqtt.client as mqtt

    seen: set[str] = set()
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: seen.add(m.topic.split("/")[-2])
    c.connect(broker.host, broker.port)
    c.subscribe("twin/v1/+/+/reported", qos=1)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        while not gateways <= seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no reported state from {sorted(gateways - seen)}")
            time.sleep(0.2)
    finally:
        c.loop_stop()
        c.disconnect()


def rollout(broker: MosquittoServer, pg: PostgresServer, work: Path) -> dict[str, Any]:
    """(gateways, rollout_s of a good bundle, gateways a bad one reached before halting)."""
    from edgerund.toolkit.simfleet import SimFleet

    dsn = pg.create_database("rollout")
    good = _bundle(work / "good.bundle", "2.1.0", 2, bad=False)
    bad = _bundle(work / "bad.bundle", "2.2.0", 3, bad=True)
    common = ["--key", str(DEV / "OPERATOR-DEVELOPMENT-ONLY.key"), "--postgres", dsn, "--json",
              "--host", broker.host, "--port", str(broker.port), "--select", "site=plant-*",
              "--waves", "1,10%,50%,100%", "--halt-if", "rolled_back>0 or failed_rate>2%",
              "--soak", "0s", "--gateway-timeout", "300s"]  # fmt: skip
    fleet = SimFleet(work / "fleet", broker.host, broker.port, n=ROLLOUT_GATEWAYS)
    try:
        fleet.start()
        _wait_reported(broker, set(fleet.procs))
        t0 = time.monotonic()
        res = _fleet_cli("rollout", str(good), "--id", "bench-good", *common)
        rollout_s = time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"good rollout failed: {res.stdout}{res.stderr[-2000:]}")
        res = _fleet_cli("rollout", str(bad), "--id", "bench-bad", *common)
        st = json.loads(_fleet_cli("status", "bench-bad", "--postgres", dsn, "--json").stdout)
    finally:
        fleet.stop()
    reached = sum(t["status"] != "pending" for t in st["targets"])
    print(f"rollout of a good bundle to {ROLLOUT_GATEWAYS} gateways: {rollout_s:.1f} s")
    print(f"bad bundle: {st['state']} after {reached} gateway(s): {st['reason']}")
    return {
        "gateways": ROLLOUT_GATEWAYS,
        "rollout_s": round(rollout_s, 1),
        "rollout_waves": "1,10%,50%,100%",
        "halted_after_gateways": reached if st["state"] == "halted" else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("sink", "rollout"))
    only = ap.parse_args().only
    bindir = find_postgres_bin()
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if bindir is None or not os.access(mosq, os.X_OK):
        print(
            "fleet benchmark needs postgresql and mosquitto (scripts/setup.sh test)",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgerund-fleet-bench-"))
    pg = PostgresServer(bindir, durable=True)
    broker = MosquittoServer(mosq, work / "mqtt")
    (work / "mqtt").mkdir()
    figures: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        pg.start()
        broker.start()
        if only != "rollout":
            figures.update(sink(broker, pg, work))
        if only != "sink":
            figures.update(rollout(broker, pg, work))
        figures["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the same cores
    finally:
        broker.cleanup()
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    for k in ("gateways", "rollout_s", "halted_after_gateways", "consumer_scaling"):
        figures.setdefault(k, None)
    print(json.dumps(figures))
    return 0


def sink(broker: MosquittoServer, pg: PostgresServer, work: Path) -> dict[str, Any]:
    key = new_key()
    pem = work / "gw.pem"
    pem.write_bytes(public_pem(key))
    one, rows_one = drain_rate(broker, pg, work, pem, key, 1, "one")
    print(f"one consumer:  {one:8.0f} batches/s  {rows_one:9.0f} rows/s")
    two, rows_two = drain_rate(broker, pg, work, pem, key, 2, "two")
    print(f"two consumers: {two:8.0f} batches/s  {rows_two:9.0f} rows/s  scaling {two / one:.2f}")
    dup, lost = kill_restart(broker, pg, work, pem, key)
    print(f"kill -9 and restart of one of two consumers: {dup} duplicate rows, {lost} batches lost")
    return {
        "batches_per_drain": N_GATEWAYS * PER_GW,
        "rows_per_batch": 41.1,
        "consumer_batches_per_s_1": round(one, 1),
        "consumer_batches_per_s_2": round(two, 1),
        "consumer_scaling": round(two / one, 3),
        "db_rows_per_s": round(max(rows_one, rows_two), 1),
        "duplicates_in_db": dup,
        "batches_lost_after_kill": lost,
    }


if __name__ == "__main__":
    raise SystemExit(main())
