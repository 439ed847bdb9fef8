"""PostgreSQL sink of the reference consumer: exactly-once rows from at-least-once MQTT.

Theory of operation. The broker delivers a batch at least once (a redelivery after a
consumer crash, a gateway resend, two consumers of one shared-subscription group racing
on a redelivered message). The database makes that exactly once: every batch first
inserts its key `(gateway, epoch, seq)` into `tlm_batches`, whose primary key is that
key, with `ON CONFLICT DO NOTHING RETURNING`; only the batches whose key row was really
inserted get their samples, aggregates, events and loss records written, in the SAME
transaction. A consumer killed mid-transaction therefore leaves nothing (the transaction
never committed, the message was never acknowledged, the broker redelivers it), and a
consumer killed after the commit but before its PUBACK gets the message again and finds
the key taken. Two consumers inserting the same key concurrently serialise on the unique
index: the second waits for the first to commit and then sees the conflict. Keys are
inserted in sorted order so that two transactions never wait on each other in a cycle;
a deadlock or serialisation failure is retried anyway.

Several messages are written per transaction (`write_many`), each batch still all or
nothing, because a commit (an fsync) per 200-byte batch is what limits a database, not
the rows.

Time partitioning. `tlm_samples`, `tlm_aggregates` and `tlm_events` are declaratively
partitioned by range on `t` (timestamptz), one partition per UTC day, named
`{table}_YYYYMMDD`, plus a DEFAULT partition. Partitions are created ahead (yesterday,
today, tomorrow) and on demand for the days a batch needs, in their own short
transaction under an advisory lock (so concurrent consumers do not race on the DDL),
but only for days within `[today - max_age_days, today + future_days]`: a gateway with
a wrong clock, or a hostile signed batch with timestamps spread over centuries, lands in
the DEFAULT partition instead of creating thousands of tables. Retention is `DROP TABLE`
of old partitions. Plain declarative partitioning is what TimescaleDB
(`create_hypertable(..., migrate_data => true)` on an unpartitioned copy) and Citus
(`create_distributed_table('tlm_samples', 'gateway')`, which keeps the partitions) build
on; see docs/fleet.md.

Timestamps that no timestamptz can hold sensibly (before 1970 or from year 10000 on;
the codec allows +-2**60 ms) are not stored; the batch row counts them in
`dropped_rows`.

Content the database cannot hold must not become a poison message (refused, never
acknowledged, redelivered after every reconnect, blocking the member): NUL characters are
replaced by U+FFFD in every string, bigint ranges are checked before writing, and when
the database still refuses a group for its content (a data exception, not an outage)
the messages are written one by one and the refused batch is recorded in `tlm_rejected`
and acknowledged.

Gaps are computed from the database, not from one consumer's memory: with a shared
subscription each consumer sees only its share of the sequences.

One cohesive thing (the PostgreSQL schema and the writer that must agree with it
statement by statement), hence one module of ~700 lines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
T_MIN_MS = 0
T_MAX_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z
SCHEMA_VERSION = 2  # 2: rollouts, rollout_targets (docs/fleet.md §8)
PARTITIONED = ("tlm_samples", "tlm_aggregates", "tlm_events")
_LOCK_DDL = 0x6564_6765_0001  # advisory lock ids: "edge" + purpose
_LOCK_GAPS = 0x6564_6765_0002

TELEMETRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS edgerund_schema (
    component text PRIMARY KEY,
    version integer NOT NULL
);
-- The dedup ledger: one row per accepted batch. Its primary key IS the exactly-once gate.
CREATE TABLE IF NOT EXISTS tlm_batches (
    gateway text NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    site text NOT NULL,
    cls text NOT NULL,
    schema_ver bigint NOT NULL,
    verified boolean,
    received timestamptz NOT NULL,
    committed timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the writing consumer (its connection's application_name): who took the batch
    consumer text NOT NULL DEFAULT current_setting('application_name'),
    n_rows integer NOT NULL,
    dropped_rows integer NOT NULL DEFAULT 0,
    CONSTRAINT tlm_batches_key PRIMARY KEY (gateway, epoch, seq)
);
CREATE INDEX IF NOT EXISTS tlm_batches_received ON tlm_batches (received);
-- Raw samples (class raw and evt series), one row per (sample, channel).
CREATE TABLE IF NOT EXISTS tlm_samples (
    t timestamptz NOT NULL,
    gateway text NOT NULL,
    series text NOT NULL,
    series_id bigint NOT NULL,
    channel text NOT NULL,
    value double precision NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL
) PARTITION BY RANGE (t);
CREATE TABLE IF NOT EXISTS tlm_samples_default PARTITION OF tlm_samples DEFAULT;
CREATE INDEX IF NOT EXISTS tlm_samples_series_t ON tlm_samples (gateway, series, t);
-- Aggregates (class agg series): channels are the statistics (min, max, mean, ...).
CREATE TABLE IF NOT EXISTS tlm_aggregates (LIKE tlm_samples) PARTITION BY RANGE (t);
CREATE TABLE IF NOT EXISTS tlm_aggregates_default PARTITION OF tlm_aggregates DEFAULT;
CREATE INDEX IF NOT EXISTS tlm_aggregates_series_t ON tlm_aggregates (gateway, series, t);
CREATE TABLE IF NOT EXISTS tlm_events (
    t timestamptz NOT NULL,
    gateway text NOT NULL,
    kind text NOT NULL,
    source text NOT NULL,
    fields jsonb NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL
) PARTITION BY RANGE (t);
CREATE TABLE IF NOT EXISTS tlm_events_default PARTITION OF tlm_events DEFAULT;
CREATE INDEX IF NOT EXISTS tlm_events_gateway_t ON tlm_events (gateway, t);
-- Loss records: what a gateway dropped on purpose (these sequences are not gaps).
CREATE TABLE IF NOT EXISTS tlm_losses (
    gateway text NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    reason text NOT NULL,
    loss_cls text NOT NULL,
    t_first_ms bigint NOT NULL,
    t_last_ms bigint NOT NULL,
    n_samples bigint NOT NULL,
    seqs bigint[] NOT NULL,
    series_ids bigint[] NOT NULL
);
CREATE INDEX IF NOT EXISTS tlm_losses_key ON tlm_losses (gateway, epoch);
-- Batches the database could not take (values out of range, ...): set aside, not retried.
CREATE TABLE IF NOT EXISTS tlm_rejected (
    gateway text NOT NULL,
    epoch numeric NOT NULL,
    seq numeric NOT NULL,
    site text NOT NULL,
    error text NOT NULL,
    received timestamptz NOT NULL,
    consumer text NOT NULL DEFAULT current_setting('application_name'),
    PRIMARY KEY (gateway, epoch, seq)
);
-- Open gaps, refreshed from tlm_batches and tlm_losses (a snapshot, not a log).
CREATE TABLE IF NOT EXISTS tlm_gaps (
    gateway text NOT NULL,
    epoch bigint NOT NULL,
    from_seq bigint NOT NULL,
    to_seq bigint NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, epoch, from_seq, to_seq)
);
-- Retained meta documents by schema version, and each gateway's last birth/will state.
CREATE TABLE IF NOT EXISTS tlm_meta (
    gateway text NOT NULL,
    schema_ver bigint NOT NULL,
    meta jsonb NOT NULL,
    verified boolean,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, schema_ver)
);
CREATE TABLE IF NOT EXISTS tlm_gateways (
    gateway text PRIMARY KEY,
    site text NOT NULL,
    state jsonb NOT NULL,
    updated timestamptz NOT NULL DEFAULT now()
);
-- The device twin as the fleet tools last saw it: the latest reported and desired documents.
CREATE TABLE IF NOT EXISTS twins (
    gateway text PRIMARY KEY,
    site text,
    reported jsonb,
    reported_version bigint,
    reported_at timestamptz,
    desired jsonb,
    desired_version bigint,
    desired_at timestamptz
);
"""

FLEET_SCHEMA = """
-- Staged model rollouts (edgerund/backend/rollout.py decides, rollout_run.py writes).
CREATE TABLE IF NOT EXISTS rollouts (
    id text PRIMARY KEY,
    model text NOT NULL,
    version text NOT NULL,
    sha256 text NOT NULL,
    size bigint NOT NULL,
    selector text NOT NULL,
    waves text NOT NULL,
    wave_ends integer[] NOT NULL,
    halt_if text NOT NULL,
    soak_s double precision NOT NULL,
    timeout_s double precision NOT NULL,
    state text NOT NULL,
    wave integer NOT NULL,
    soak_until double precision,
    reason text,
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS rollouts_model_version ON rollouts (model, version);
CREATE TABLE IF NOT EXISTS rollout_targets (
    rollout text NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    gateway text NOT NULL,
    site text NOT NULL,
    ord integer NOT NULL,
    wave integer NOT NULL,
    status text NOT NULL,
    outcome text,
    reason text,
    prev_version text,
    sent_at double precision,
    done_at double precision,
    desired_version bigint,
    desired_doc bytea,
    prev_desired jsonb,
    reverted_version bigint,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout, gateway)
);
"""
SCHEMA = TELEMETRY_SCHEMA + FLEET_SCHEMA

# What brings a database of version N-1 to N (each idempotent; SCHEMA itself only
# creates what is missing, so these hold the statements a fresh CREATE would not do).
MIGRATIONS: dict[int, str] = {2: FLEET_SCHEMA}

# Islands over the sequences received or declared lost, per (gateway, epoch): a gap is a
# hole between the highest sequence covered so far and the next one.
GAPS_SQL = """
WITH covered AS (
    SELECT gateway, epoch, seq FROM tlm_batches WHERE received >= %(since)s
    UNION
    SELECT l.gateway, l.epoch, s FROM tlm_losses l, unnest(l.seqs) AS s
    WHERE (l.gateway, l.epoch) IN (
        SELECT gateway, epoch FROM tlm_batches WHERE received >= %(since)s)
), ordered AS (
    SELECT gateway, epoch, seq,
           lag(seq) OVER (PARTITION BY gateway, epoch ORDER BY seq) AS prev
    FROM covered
)
SELECT gateway, epoch, prev + 1 AS from_seq, seq - 1 AS to_seq
FROM ordered WHERE prev IS NOT NULL AND seq > prev + 1
ORDER BY gateway, epoch, from_seq
"""

_BATCH_TYPES = ("series", "event", "loss", "empty")


@dataclass
class WriteStats:
    new_batches: int = 0
    duplicates: int = 0
    rows: int = 0
    rejected: int = 0


def _day(ms: int) -> dt.date:
    return dt.date(1970, 1, 1) + dt.timedelta(days=ms // DAY_MS)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def _ts(ms: int) -> dt.datetime:
    return _EPOCH + _MS * ms


def _ok_t(ms: Any) -> bool:
    return isinstance(ms, int) and T_MIN_MS <= ms < T_MAX_MS


def _all_ok(ts: list[int]) -> bool:
    """The common case, checked once per column instead of once per sample."""
    return bool(ts) and T_MIN_MS <= min(ts) and max(ts) < T_MAX_MS


I64_MAX = (1 << 63) - 1


def scrub(obj: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL: replace it (U+FFFD) in every string."""
    if isinstance(obj, str):
        return obj.replace("\x00", "\ufffd") if "\x00" in obj else obj
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v) for v in obj]
    return obj


def _out_of_range(b: _Batch) -> str | None:
    """Why a batch cannot be stored in bigint columns, or None. The codec allows up to
    2**63 for sequences and counts, and loss sequences are sums of deltas."""
    _, epoch, seq = b.key
    if not (0 <= epoch <= I64_MAX and 0 <= seq <= I64_MAX):
        return "batch key out of the bigint range"
    for r in b.records:
        if r["type"] == "loss" and (
            r["n_samples"] > I64_MAX or any(x > I64_MAX for x in r["seqs"])
        ):
            return "loss record out of the bigint range"
    return None


@dataclass
class _Batch:
    key: tuple[str, int, int]
    site: str
    cls: str
    schema_ver: int
    verified: bool | None
    received: float
    records: list[dict[str, Any]]
    n_rows: int = 0
    dropped: int = 0
    error: str | None = None


def group_batches(messages: Iterable[list[dict[str, Any]]]) -> dict[tuple[str, int, int], _Batch]:
    """Pure: the consumer's records of several messages, grouped by batch key (the first
    delivery of a key in this group wins; a second one in the same group is a duplicate)."""
    out: dict[tuple[str, int, int], _Batch] = {}
    for records in messages:
        mine: dict[tuple[str, int, int], _Batch] = {}
        for r in records:
            if r.get("type") not in _BATCH_TYPES:
                continue
            key = (scrub(str(r["gateway"])), int(r["epoch"]), int(r["seq"]))
            if key in out:
                continue
            b = mine.get(key)
            if b is None:
                b = mine[key] = _Batch(
                    key,
                    scrub(str(r["site"])),
                    str(r["cls"]),
                    int(r["schema_ver"]),
                    r.get("verified"),
                    float(r["received"]),
                    [],
                )
            if r["type"] in ("series", "event"):
                r = scrub(r)  # names, channels, kinds, sources, fields
            b.records.append(r)
        for k, b in mine.items():
            b.error = _out_of_range(b)
            for r in b.records:
                if r["type"] == "series":
                    n = len(r["t_ms"])
                    ok = n if _all_ok(r["t_ms"]) else sum(1 for t in r["t_ms"] if _ok_t(t))
                    b.n_rows += ok * len(r["values"])
                    b.dropped += (n - ok) * len(r["values"])
                elif r["type"] == "event":
                    if _ok_t(r["t_ms"]):
                        b.n_rows += 1
                    else:
                        b.dropped += 1
                elif r["type"] == "loss":
                    b.n_rows += 1
            out[k] = b
    return out


def _deliveries(messages: Iterable[list[dict[str, Any]]]) -> int:
    """How many batch deliveries these messages carry (a batch has one record per block)."""
    return sum(
        len({(r["gateway"], r["epoch"], r["seq"]) for r in m if r.get("type") in _BATCH_TYPES})
        for m in messages
    )


def days_needed(batches: Iterable[_Batch]) -> set[dt.date]:
    days: set[dt.date] = set()
    for b in batches:
        for r in b.records:
            if r["type"] == "series":
                ts = r["t_ms"] if _all_ok(r["t_ms"]) else [t for t in r["t_ms"] if _ok_t(t)]
                if ts:
                    lo, hi = min(ts) // DAY_MS, max(ts) // DAY_MS
                    if hi - lo <= 3:
                        days.update(_day(d * DAY_MS) for d in range(lo, hi + 1))
                    else:  # a sparse spread: only the days actually used
                        days.update(_day(t) for t in ts)
            elif r["type"] == "event" and _ok_t(r["t_ms"]):
                days.add(_day(r["t_ms"]))
    return days


def ensure_schema(c: Any) -> None:
    """Create the schema, or migrate an older version of it, under the DDL advisory lock
    (an autocommit psycopg connection). A database from a NEWER edgerund is refused."""
    with c.transaction():
        c.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_DDL,))
        (exists,) = c.execute("SELECT to_regclass('edgerund_schema') IS NOT NULL").fetchone()
        row = None
        if exists:
            row = c.execute(
                "SELECT version FROM edgerund_schema WHERE component = 'telemetry'"
            ).fetchone()
        ver = row[0] if row else None
        if ver is not None and ver > SCHEMA_VERSION:
            raise RuntimeError(
                f"database has telemetry schema version {ver}, this edgerund knows "
                f"up to {SCHEMA_VERSION}"
            )
        c.execute(SCHEMA)
        for v in range((ver or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
            c.execute(MIGRATIONS[v])
            log.info("telemetry schema migrated to version %d", v)
        c.execute(
            "INSERT INTO edgerund_schema VALUES ('telemetry', %s) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
            (SCHEMA_VERSION,),
        )


class PostgresSink:
    """Writes the consumer's records to PostgreSQL; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        max_age_days: int = 30,
        future_days: int = 1,
        gap_window_h: float = 24.0,
        application_name: str = "edgerund-consumer",
    ) -> None:
        import psycopg

        self.dsn = dsn
        self.application_name = application_name
        self.max_age_days = max_age_days
        self.future_days = future_days
        self.gap_window_h = gap_window_h
        self._partitions: set[dt.date] = set()
        self._psycopg = psycopg
        self.conn = self._connect()
        self.ensure_schema()
        today = dt.datetime.now(dt.UTC).date()
        self.ensure_partitions(today + dt.timedelta(days=d) for d in (-1, 0, 1))

    def _connect(self) -> Any:
        return self._psycopg.connect(
            self.dsn,
            autocommit=True,
            options="-c TimeZone=UTC",
            application_name=self.application_name,
        )

    def _c(self) -> Any:
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()
        return self.conn

    def ensure_schema(self) -> None:
        ensure_schema(self._c())

    def _in_window(self, day: dt.date) -> bool:
        today = dt.datetime.now(dt.UTC).date()
        return (
            today - dt.timedelta(days=self.max_age_days)
            <= day
            <= today + dt.timedelta(days=self.future_days)
        )

    def ensure_partitions(self, days: Iterable[dt.date]) -> None:
        """Create the daily partitions of `days` inside the window (others use DEFAULT)."""
        from psycopg import errors, sql

        todo = sorted(d for d in set(days) if d not in self._partitions and self._in_window(d))
        if not todo:
            return
        c = self._c()
        with c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_DDL,))
            for day in todo:
                lo = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
                hi = lo + dt.timedelta(days=1)
                for table in PARTITIONED:
                    name = f"{table}_{day:%Y%m%d}"
                    try:
                        with c.transaction():  # a savepoint: one refusal spoils nothing else
                            c.execute(
                                sql.SQL(
                                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} "
                                    "FOR VALUES FROM ({}) TO ({})"
                                ).format(
                                    sql.Identifier(name),
                                    sql.Identifier(table),
                                    sql.Literal(lo),
                                    sql.Literal(hi),
                                )
                            )
                    except errors.CheckViolation:
                        # DEFAULT already holds rows of that day (they arrived while the day
                        # was outside the window): keep using DEFAULT for it.
                        log.warning("%s: rows for %s stay in the DEFAULT partition", table, day)
                self._partitions.add(day)

    def partitions(self) -> list[str]:
        rows = self._c().execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY(%s) ORDER BY 1",
            (list(PARTITIONED),),
        )
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ writing

    def write(self, records: list[dict[str, Any]]) -> None:
        self.write_many([records])

    def write_many(self, messages: list[list[dict[str, Any]]]) -> WriteStats:
        """One transaction for these messages' batches, meta and state; retried on a
        deadlock or serialisation failure. Raises on anything else (the caller must then
        not acknowledge the messages)."""
        import psycopg
        from psycopg import errors

        batches = group_batches(messages)
        self.ensure_partitions(days_needed(b for b in batches.values() if b.error is None))
        for attempt in range(5):
            try:
                return self._write_tx(messages, batches)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1))
            except (psycopg.DataError, psycopg.ProgrammingError, ValueError, OverflowError) as exc:
                # Content the database refuses (not an outage): find the message and set
                # it aside, or it would come back after every reconnect (a poison message).
                if len(messages) > 1:
                    total = WriteStats()
                    for m in messages:
                        one = self.write_many([m])
                        total.new_batches += one.new_batches
                        total.duplicates += one.duplicates
                        total.rows += one.rows
                        total.rejected += one.rejected
                    return total
                return self._reject(batches, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")

    def _reject(self, batches: dict[tuple[str, int, int], _Batch], why: str) -> WriteStats:
        log.warning("batches %s refused by the database: %s", sorted(batches), why)
        if batches:
            with self._c().transaction(), self._c().cursor() as cur:
                self._insert_rejected(cur, list(batches.values()), why)
        return WriteStats(rejected=len(batches))

    @staticmethod
    def _insert_rejected(cur: Any, bs: list[_Batch], why: str | None = None) -> None:
        cur.executemany(
            "INSERT INTO tlm_rejected (gateway, epoch, seq, site, error, received) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (
                    b.key[0],
                    b.key[1],
                    b.key[2],
                    b.site,
                    scrub(why or b.error or "")[:1000],
                    dt.datetime.fromtimestamp(b.received, dt.UTC),
                )
                for b in bs
            ],
        )

    def _write_tx(
        self, messages: list[list[dict[str, Any]]], batches: dict[tuple[str, int, int], _Batch]
    ) -> WriteStats:
        c = self._c()
        stats = WriteStats()
        with c.transaction():
            with c.cursor() as cur:
                for records in messages:
                    for r in records:
                        self._write_side_record(cur, r)
                bad = [b for b in batches.values() if b.error is not None]
                if bad:
                    self._insert_rejected(cur, bad)
                    stats.rejected = len(bad)
                batches = {k: b for k, b in batches.items() if b.error is None}
                if not batches:
                    stats.duplicates = _deliveries(messages) - stats.rejected
                    return stats
                keys = sorted(batches)
                bs = [batches[k] for k in keys]
                cur.execute(
                    "INSERT INTO tlm_batches (gateway, epoch, seq, site, cls, schema_ver, "
                    "verified, received, n_rows, dropped_rows) "
                    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], "
                    "%s::text[], %s::bigint[], %s::boolean[], %s::timestamptz[], %s::int[], "
                    "%s::int[]) ORDER BY 1, 2, 3 "
                    "ON CONFLICT ON CONSTRAINT tlm_batches_key DO NOTHING "
                    "RETURNING gateway, epoch, seq",
                    (
                        [k[0] for k in keys],
                        [k[1] for k in keys],
                        [k[2] for k in keys],
                        [b.site for b in bs],
                        [b.cls for b in bs],
                        [b.schema_ver for b in bs],
                        [b.verified for b in bs],
                        [dt.datetime.fromtimestamp(b.received, dt.UTC) for b in bs],
                        [b.n_rows for b in bs],
                        [b.dropped for b in bs],
                    ),
                )
                new = {(g, e, s) for g, e, s in cur.fetchall()}
                stats.new_batches = len(new)
                stats.duplicates = _deliveries(messages) - len(new) - stats.rejected
                fresh = [batches[k] for k in keys if k in new]
                stats.rows = self._copy_rows(cur, fresh)
        return stats

    def _write_side_record(self, cur: Any, r: dict[str, Any]) -> None:
        t = r.get("type")
        if t == "meta" and isinstance(r.get("value"), dict) and r["value"]:
            ver = r["value"].get("schema_ver")
            if isinstance(ver, int):
                cur.execute(
                    "INSERT INTO tlm_meta (gateway, schema_ver, meta, verified) "
                    "VALUES (%s, %s, %s::jsonb, %s) ON CONFLICT (gateway, schema_ver) DO UPDATE "
                    "SET meta = EXCLUDED.meta, verified = EXCLUDED.verified, updated = now()",
                    (scrub(r["gateway"]), ver, json.dumps(scrub(r["value"])), r.get("verified")),
                )
        elif t == "state" and isinstance(r.get("value"), dict):
            cur.execute(
                "INSERT INTO tlm_gateways (gateway, site, state) VALUES (%s, %s, %s::jsonb) "
                "ON CONFLICT (gateway) DO UPDATE SET site = EXCLUDED.site, "
                "state = EXCLUDED.state, updated = now()",
                (scrub(r["gateway"]), scrub(r["site"]), json.dumps(scrub(r["value"]))),
            )

    def _copy_rows(self, cur: Any, fresh: list[_Batch]) -> int:
        samples: list[tuple[Any, ...]] = []
        aggs: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        losses: list[tuple[Any, ...]] = []
        for b in fresh:
            gw, epoch, seq = b.key
            for r in b.records:
                if r["type"] == "series":
                    dest = aggs if b.cls == "agg" else samples
                    name = r.get("name") or f"#{r['series_id']}"
                    if _all_ok(r["t_ms"]):
                        ts: list[dt.datetime | None] = [_EPOCH + _MS * t for t in r["t_ms"]]
                    else:
                        ts = [(_ts(t) if _ok_t(t) else None) for t in r["t_ms"]]
                    for ch, vals in r["values"].items():
                        dest.extend(
                            (t, gw, name, r["series_id"], ch, float(v), epoch, seq)
                            for t, v in zip(ts, vals, strict=True)
                            if t is not None
                        )
                elif r["type"] == "event" and _ok_t(r["t_ms"]):
                    events.append(
                        (
                            _ts(r["t_ms"]),
                            gw,
                            r["kind"],
                            r["source"],
                            r["fields"],  # the jsonb dumper serialises it
                            epoch,
                            seq,
                        )
                    )
                elif r["type"] == "loss":
                    losses.append(
                        (
                            gw,
                            epoch,
                            seq,
                            r["reason"],
                            r["loss_cls"],
                            r["t_first_ms"],
                            r["t_last_ms"],
                            r["n_samples"],
                            r["seqs"],
                            r["series_ids"],
                        )
                    )
        sample_types = ["timestamptz", "text", "text", "int8", "text", "float8", "int8", "int8"]
        for table, rows in (("tlm_samples", samples), ("tlm_aggregates", aggs)):
            if rows:
                with cur.copy(
                    f"COPY {table} (t, gateway, series, series_id, channel, value, epoch, seq) "
                    "FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(sample_types)
                    for row in rows:
                        cp.write_row(row)
        if events:
            with cur.copy(
                "COPY tlm_events (t, gateway, kind, source, fields, epoch, seq) "
                "FROM STDIN (FORMAT BINARY)"
            ) as cp:
                cp.set_types(["timestamptz", "text", "text", "text", "jsonb", "int8", "int8"])
                for row in events:
                    cp.write_row(row)
        if losses:
            cur.executemany(
                "INSERT INTO tlm_losses VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", losses
            )
        return len(samples) + len(aggs) + len(events) + len(losses)

    # ------------------------------------------------------------------ gaps

    def gaps(self) -> list[dict[str, Any]]:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=self.gap_window_h)
        rows = self._c().execute(GAPS_SQL, {"since": since}).fetchall()
        return [
            {"type": "gap", "gateway": g, "epoch": e, "from_seq": lo, "to_seq": hi}
            for g, e, lo, hi in rows
        ]

    def refresh_gaps(self) -> list[dict[str, Any]]:
        """Recompute the open gaps and store them in `tlm_gaps` (keeping `first_seen` of
        the gaps that are still open); returns them."""
        c = self._c()
        with c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_GAPS,))
            gaps = self.gaps()
            c.execute(
                "CREATE TEMP TABLE IF NOT EXISTS cur_gaps "
                "(gateway text, epoch bigint, from_seq bigint, to_seq bigint) ON COMMIT DELETE ROWS"
            )
            with c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO cur_gaps VALUES (%s, %s, %s, %s)",
                    [(g["gateway"], g["epoch"], g["from_seq"], g["to_seq"]) for g in gaps],
                )
            c.execute(
                "DELETE FROM tlm_gaps g WHERE NOT EXISTS (SELECT 1 FROM cur_gaps c WHERE "
                "(c.gateway, c.epoch, c.from_seq, c.to_seq) = (g.gateway, g.epoch, g.from_seq, g.to_seq))"
            )
            c.execute(
                "INSERT INTO tlm_gaps (gateway, epoch, from_seq, to_seq) "
                "SELECT * FROM cur_gaps ON CONFLICT DO NOTHING"
            )
        return gaps

    # ------------------------------------------------------------------ checks

    def duplicates_in_db(self) -> int:
        """Rows stored more than once: samples/aggregates by (gateway, series, channel, t),
        events by (gateway, epoch, seq, t, kind). 0 is the exactly-once guarantee."""
        n = 0
        for table, cols in (
            ("tlm_samples", "gateway, series, channel, t"),
            ("tlm_aggregates", "gateway, series, channel, t"),
            ("tlm_events", "gateway, epoch, seq, t, kind, source"),
        ):
            (d,) = (
                self._c()
                .execute(
                    f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {table} "
                    f"GROUP BY {cols} HAVING count(*) > 1) x"
                )
                .fetchone()
            )
            n += int(d)
        return n

    def close(self) -> None:
        if not self.conn.closed:
            self.conn.close()
