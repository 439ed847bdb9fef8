"""The spool's SQLite file: schema, epoch, quarantine, the byte budget and loss records.

Used only from the spool's writer thread (telemetry/spool.py), which groups the calls
into transactions and answers the callers; this module knows nothing of threads or
futures. See spool.py for the theory of the whole store; here:

* Space: a byte budget derived from `max_bytes` (leaving room for the WAL and for B-tree
  slack, so the files on disk stay under the cap) and a TTL per class. When over budget
  the oldest delivered rows go first, then undelivered raw, agg and evt rows, oldest
  first, and a loss record (an evt batch naming the class, series, time range, sample
  count and the lost batch sequences) is written in the same transaction, so no gap is
  silent; a loss record evicted in turn hands the blocks it carried to the new one. Behind
  the budget SQLite's own page cap (`max_page_count`) is the hard stop; `append` evicts
  before reaching it, and answers SQLITE_FULL (what a full disk gives) by reporting the
  rolled-back group through `on_group_lost`, making room, and retrying.
* Corruption: a database SQLite calls corrupt at open (`PRAGMA quick_check`) or later is
  moved aside as `spool.db.corrupt-<UTC time>` (never deleted), a new one is created with
  the same series numbering and the epoch (a separate, atomically written file that must
  survive the database it numbers) goes up to at least the Unix time in minutes.

One cohesive thing (the database and the rules of its space), hence ~600 lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edgerund.errors import EdgerundError
from edgerund.telemetry import codec
from edgerund.telemetry.codec import Batch, Block, Cls, LossBlock, LossReason, SeriesBlock
from edgerund.updates import fsutil

log = structlog.get_logger("edgerund.telemetry.spool")

ROW_OVERHEAD = 96  # bytes per row beyond its payload (B-tree cell, index entries)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cls INTEGER NOT NULL,
    created REAL NOT NULL,
    t_first_ms INTEGER NOT NULL,
    t_last_ms INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    series TEXT NOT NULL,
    schema_ver INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_backlog ON batches(acked, cls, seq);
CREATE INDEX IF NOT EXISTS ix_age ON batches(acked, seq);
CREATE TABLE IF NOT EXISTS series (name TEXT PRIMARY KEY, id INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS metas (ver INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, json TEXT NOT NULL);
"""


class SpoolError(EdgerundError):
    """A spool operation failed (disk full, I/O error, closed); the data was not stored."""


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    cls: Cls
    created: float
    schema_ver: int
    payload: bytes


@dataclass
class SpoolStats:
    epoch: int = 0
    backlog_batches: int = 0
    backlog_bytes: int = 0
    oldest_created: float | None = None
    kept_acked_batches: int = 0
    total_bytes: int = 0  # accounted bytes (payload + overhead) of every row
    file_bytes: int = 0  # db + wal on disk
    budget_bytes: int = 0
    appended_batches: int = 0
    appended_samples: int = 0
    lost_samples: int = 0
    lost_batches: int = 0
    write_errors: int = 0
    last_error: str | None = None
    quarantined: list[str] = field(default_factory=list)


def is_corrupt(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return True
    msg = str(exc).lower()
    return "malformed" in msg or "not a database" in msg or "corrupt" in msg


def _block_summary(blocks: Sequence[Block]) -> tuple[int, int, int, str]:
    t_first, t_last, n = 1 << 62, 0, 0
    ids: list[int] = []
    for b in blocks:
        if isinstance(b, SeriesBlock):
            t_first = min(t_first, int(b.t_ms.min()))
            t_last = max(t_last, int(b.t_ms.max()))
            n += b.n * len(b.values)
            ids.append(b.series_id)
        elif isinstance(b, LossBlock):
            t_first, t_last = min(t_first, b.t_first_ms), max(t_last, b.t_last_ms)
        else:
            t_first, t_last = min(t_first, b.t_ms), max(t_last, b.t_ms)
    if t_first > t_last:
        t_first = t_last = 0
    return t_first, t_last, n, ",".join(str(i) for i in sorted(set(ids)))


class SpoolDb:
    """The database of one spool directory (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        ttl_s: dict[Cls, float],
        keep_acked_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "spool.db"
        self.max_bytes = int(max_bytes)
        # The WAL is truncated back to this after checkpoints; the B-tree wastes up to a
        # quarter of its pages after deletions (freed pages are reused, never returned).
        self.wal_limit = max(64 * 1024, min(4 * 1024 * 1024, self.max_bytes // 8))
        self.budget = int((self.max_bytes - 2 * self.wal_limit) * 0.7)
        self.ttl_s = dict(ttl_s)
        self.keep_acked_s = keep_acked_s
        self.clock = clock
        self.stats = SpoolStats(budget_bytes=self.budget)
        self.series_ids: dict[str, int] = {}
        self.next_seq = 1
        self.dirty = False  # a transaction with writes is open
        self.page_size = 4096
        self.max_pages = 1 << 30
        # Called when SQLite rolled the open group back on its own (SQLITE_FULL): the
        # writer fails the callers whose writes were in it.
        self.on_group_lost: Callable[[BaseException], None] = lambda exc: None
        self._conn: sqlite3.Connection | None = None
        self._in_txn = False

    def _read_epoch(self) -> int | None:
        try:
            return int((self.dir / "epoch").read_text().strip())
        except (OSError, ValueError):
            return None

    def _write_epoch(self, epoch: int) -> None:
        tmp = self.dir / "epoch.tmp"
        with open(tmp, "w") as f:
            f.write(f"{epoch}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "epoch")
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _bump_epoch(self) -> None:
        old = self._read_epoch() or 0
        new = max(old + 1, int(self.clock() // 60))
        self._write_epoch(new)
        self.stats.epoch = new

    def _quarantine(self, why: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.path.with_name(f"spool.db.corrupt-{stamp}")
        n = 1
        while dest.exists():
            dest = self.path.with_name(f"spool.db.corrupt-{stamp}.{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(dest) + suffix))
        self.stats.quarantined.append(str(dest))
        log.error("spool_quarantined", path=str(dest), reason=why)
        return str(dest)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={self.wal_limit}")
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, self.wal_limit // 4096 // 2)}")
        # The hard stop behind the byte budget: SQLite itself refuses to grow the database
        # file past the cap (SQLITE_FULL), which `_append` answers like a full disk.
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self.page_size = page
        self.max_pages = max(64, (self.max_bytes - self.wal_limit) // page)
        conn.execute(f"PRAGMA max_page_count={self.max_pages}")
        return conn

    def _room(self) -> int:
        """Bytes the database may still use before SQLite's page cap (free pages count)."""
        assert self._conn is not None
        count = int(self._conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        return (self.max_pages - count + free) * self.page_size

    def open(self) -> str | None:
        """Open (quarantining a corrupt db); returns where a corrupt one was moved."""
        # Durable: a database in a directory whose own entry never reached the disk is
        # lost with it at a power cut (the crash-consistency check, toolkit/crashsim).
        fsutil.make_dirs(self.dir)
        fresh = not self.path.exists()
        quarantined: str | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            res = conn.execute("PRAGMA quick_check").fetchone()
            if res is None or res[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {res[0] if res else 'no answer'}")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if not is_corrupt(exc) and "quick_check" not in str(exc):
                raise
            quarantined = self._quarantine(str(exc))
            fresh = True
            conn = self._connect()
            conn.executescript(_SCHEMA)
        self._conn = conn
        epoch = self._read_epoch()
        if fresh or epoch is None:
            self._bump_epoch()
        else:
            self.stats.epoch = epoch
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='batches'").fetchone()
        self.next_seq = (int(row[0]) if row else 0) + 1
        for name, sid in conn.execute("SELECT name, id FROM series"):
            self.series_ids[name] = sid
        self._recount()
        return quarantined

    def _recount(self) -> None:
        assert self._conn is not None
        c = self._conn
        n, b = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM batches WHERE acked=0"
        ).fetchone()
        na, ba = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM batches WHERE acked=1"
        ).fetchone()
        self.stats.backlog_batches, self.stats.backlog_bytes = int(n), int(b)
        self.stats.kept_acked_batches = int(na)
        self.stats.total_bytes = int(b) + int(ba) + ROW_OVERHEAD * (int(n) + int(na))
        self._refresh_oldest()

    def _refresh_oldest(self) -> None:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT created FROM batches WHERE acked=0 ORDER BY seq LIMIT 1"
        ).fetchone()
        self.stats.oldest_created = float(row[0]) if row else None
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.path.getsize(str(self.path) + suffix)
        self.stats.file_bytes = size

    # ------------------------------------------------------------ transactions

    def begin(self) -> sqlite3.Connection:
        assert self._conn is not None
        if not self._in_txn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_txn = True
        self.dirty = True
        return self._conn

    def commit(self) -> None:
        """Commit the open group; on failure roll back, recount and re-raise."""
        assert self._conn is not None
        try:
            self._conn.execute("COMMIT")
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            self._in_txn = False
            self.dirty = False
            self._reload_after_rollback()
            raise
        self._in_txn = False
        self.dirty = False
        self._refresh_oldest()
        if self.stats.file_bytes > self.max_bytes - self.wal_limit:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._refresh_oldest()

    def close(self) -> None:
        """Checkpoint the WAL into the database and close (after the last commit)."""
        assert self._conn is not None
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _reload_after_rollback(self) -> None:
        # The rolled-back group changed nothing on disk: recount from the database.
        with contextlib.suppress(sqlite3.Error):
            row = (
                self._conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name='batches'"
                ).fetchone()
                if self._conn
                else None
            )
            self.next_seq = (int(row[0]) if row else 0) + 1
            self._recount()

    def recover_corrupt(self, exc: BaseException) -> str:
        """Move the corrupt database aside and start a new epoch; returns where it went."""
        assert self._conn is not None
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._in_txn = False
        self.dirty = False
        dest = self._quarantine(str(exc))
        conn = self._connect()
        conn.executescript(_SCHEMA)
        self._conn = conn
        self._bump_epoch()
        self.next_seq = 1
        # Keep the series numbering: the meta we publish stays valid.
        conn.executemany(
            "INSERT INTO series(name, id) VALUES (?, ?)", list(self.series_ids.items())
        )
        self._recount()
        return dest

    # ------------------------------------------------------------ operations

    def ack(self, seqs: Sequence[int]) -> None:
        """Mark delivered (kept for cmd/resend while keep_acked_s > 0) or delete."""
        self.begin()
        rows = self._select_in(
            "SELECT seq, LENGTH(payload) FROM batches WHERE acked=0 AND seq IN ({})", seqs
        )
        if self.keep_acked_s > 0:
            self._exec_in("UPDATE batches SET acked=1 WHERE seq IN ({})", [r[0] for r in rows])
            self.stats.kept_acked_batches += len(rows)
        else:
            self._exec_in("DELETE FROM batches WHERE seq IN ({})", [r[0] for r in rows])
            self.stats.total_bytes -= sum(r[1] + ROW_OVERHEAD for r in rows)
        self.stats.backlog_batches -= len(rows)
        self.stats.backlog_bytes -= sum(r[1] for r in rows)

    def requeue(self, epoch: int, first: int, last: int) -> tuple[list[int], int]:
        """Kept rows first..last undelivered again: (requeued seqs, missing count)."""
        if epoch != self.stats.epoch:
            raise SpoolError(f"epoch {epoch} is not the current spool epoch {self.stats.epoch}")
        c = self.begin()
        rows = c.execute(
            "SELECT seq, LENGTH(payload) FROM batches WHERE acked=1 AND seq BETWEEN ? AND ?",
            (first, last),
        ).fetchall()
        pend = c.execute(
            "SELECT COUNT(*) FROM batches WHERE acked=0 AND seq BETWEEN ? AND ?", (first, last)
        ).fetchone()[0]
        self._exec_in("UPDATE batches SET acked=0 WHERE seq IN ({})", [r[0] for r in rows])
        self.stats.kept_acked_batches -= len(rows)
        self.stats.backlog_batches += len(rows)
        self.stats.backlog_bytes += sum(r[1] for r in rows)
        missing = (last - first + 1) - len(rows) - int(pend)
        return [r[0] for r in rows], missing

    def fetch(self, cls: Cls, after: int, limit: int) -> list[Row]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT seq, cls, created, schema_ver, payload FROM batches "
            "WHERE acked=0 AND cls=? AND seq>? ORDER BY seq LIMIT ?",
            (int(cls), after, limit),
        ).fetchall()
        return [Row(r[0], Cls(r[1]), r[2], r[3], bytes(r[4])) for r in rows]

    def register_series(self, names: Sequence[str]) -> tuple[dict[str, int], bool]:
        """Stable ids of `names` (new ones numbered on), and whether any was written."""
        new = [n for n in names if n not in self.series_ids]
        if not new:
            return {n: self.series_ids[n] for n in names}, False
        c = self.begin()
        nxt = max(self.series_ids.values(), default=0) + 1
        for n in new:
            self.series_ids[n] = nxt
            c.execute("INSERT INTO series(name, id) VALUES (?, ?)", (n, nxt))
            nxt += 1
        return {n: self.series_ids[n] for n in names}, True

    def register_meta(self, text: str) -> tuple[int, bool]:
        """The version of this meta content (a new one numbered on), and whether written."""
        assert self._conn is not None
        h = hashlib.sha256(text.encode()).hexdigest()
        row = self._conn.execute("SELECT ver FROM metas WHERE hash=?", (h,)).fetchone()
        if row:
            return int(row[0]), False
        c = self.begin()
        ver = int(c.execute("SELECT COALESCE(MAX(ver), 0) + 1 FROM metas").fetchone()[0])
        c.execute("INSERT INTO metas(ver, hash, json) VALUES (?, ?, ?)", (ver, h, text))
        return ver, True

    def meta_versions(self, vers: Sequence[int]) -> dict[int, str]:
        rows = self._select_in("SELECT ver, json FROM metas WHERE ver IN ({})", vers)
        return {int(v): j for v, j in rows}

    def backlog_versions(self) -> list[int]:
        """The schema versions the undelivered rows were written with."""
        assert self._conn is not None
        sql = "SELECT DISTINCT schema_ver FROM batches WHERE acked=0"
        return [int(r[0]) for r in self._conn.execute(sql)]

    def _select_in(self, sql: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        out: list[tuple[Any, ...]] = []
        ids = list(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            out += self._conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return out

    def _exec_in(self, sql: str, ids: Sequence[int]) -> None:
        assert self._conn is not None
        ids = list(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            self._conn.execute(sql.format(",".join("?" * len(chunk))), chunk)

    def append(self, cls: Cls, blocks: Sequence[Block], schema_ver: int) -> int:
        """Insert; when the disk (or the page cap) is full, make room and retry once."""
        try:
            return self._insert(cls, blocks, schema_ver)
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc).lower():
                raise
            self.stats.write_errors += 1
            if self.stats.last_error != str(exc):
                log.error("spool_full", error=str(exc), file_bytes=self.stats.file_bytes)
            self.stats.last_error = f"OperationalError: {exc}"
            assert self._conn is not None
            if not self._conn.in_transaction:
                # SQLite rolled the whole group back: those batches are gone, say so.
                self._in_txn = False
                self.dirty = False
                self.on_group_lost(exc)
                self._reload_after_rollback()
                self.begin()
            # Free a tenth of the budget (oldest, lowest class first, with loss records):
            # the freed pages are reused by the retried insert.
            self._shrink(max(self.stats.total_bytes // 10, 64 * 1024))
            return self._insert(cls, blocks, schema_ver)

    def _insert(self, cls: Cls, blocks: Sequence[Block], schema_ver: int) -> int:
        c = self.begin()
        seq = self.next_seq
        payload = codec.encode(Batch(cls, self.stats.epoch, seq, schema_ver, tuple(blocks)))
        # Hitting SQLITE_FULL rolls back the whole open group, so never go there on
        # purpose: below the page cap's margin, evict first (the soft budget normally
        # keeps far from it; this catches accounting drift and B-tree slack).
        margin = 2 * len(payload) + 16 * self.page_size
        if self._room() < margin:
            self._shrink(max(margin, self.stats.total_bytes // 10))
            if self.next_seq != seq:  # the loss record took that sequence
                seq = self.next_seq
                payload = codec.encode(Batch(cls, self.stats.epoch, seq, schema_ver, tuple(blocks)))
        t_first, t_last, n, series = _block_summary(blocks)
        c.execute(
            "INSERT INTO batches(seq, cls, created, t_first_ms, t_last_ms, n_samples, series, schema_ver, payload)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, int(cls), self.clock(), t_first, t_last, n, series, schema_ver, payload),
        )
        self.next_seq = seq + 1
        self.stats.backlog_batches += 1
        self.stats.backlog_bytes += len(payload)
        self.stats.total_bytes += len(payload) + ROW_OVERHEAD
        self.stats.appended_batches += 1
        self.stats.appended_samples += n
        if cls is not Cls.EVT or n:
            # Enforce per insert, not per commit: a long group must not overshoot the cap.
            self._enforce_budget()
        return seq

    def _drop(
        self, where: str, params: tuple[Any, ...], reason: LossReason, need: int | None
    ) -> int:
        """Delete undelivered rows matching `where`, oldest first (all of them, or until
        `need` bytes are freed), and record one loss block per class. Returns bytes freed."""
        assert self._conn is not None
        freed = 0
        rows = self._conn.execute(
            f"SELECT seq, cls, LENGTH(payload), t_first_ms, t_last_ms, n_samples, series, schema_ver "
            f"FROM batches WHERE acked=0 AND {where} ORDER BY seq",
            params,
        ).fetchall()
        per_cls: dict[int, list[tuple[Any, ...]]] = {}
        chosen: list[int] = []
        for r in rows:
            if need is not None and freed >= need:
                break
            chosen.append(r[0])
            per_cls.setdefault(r[1], []).append(r)
            freed += r[2] + ROW_OVERHEAD
        if not chosen:
            return 0
        carried = self._loss_blocks_in(
            [int(r[0]) for r in per_cls.get(int(Cls.EVT), ()) if int(r[5]) == 0]
        )
        self._exec_in("DELETE FROM batches WHERE seq IN ({})", chosen)
        self.stats.total_bytes -= freed
        self.stats.backlog_batches -= len(chosen)
        self.stats.backlog_bytes -= freed - ROW_OVERHEAD * len(chosen)
        for cls_v, rs in per_cls.items():
            sids = sorted({int(s) for r in rs for s in str(r[6]).split(",") if s})
            n = sum(int(r[5]) for r in rs)
            loss = LossBlock(
                reason,
                Cls(cls_v),
                min(int(r[3]) for r in rs),
                max(int(r[4]) for r in rs),
                n,
                tuple(int(r[0]) for r in rs),
                tuple(sids),
            )
            self.stats.lost_samples += n
            self.stats.lost_batches += len(rs)
            log.warning(
                "spool_loss",
                reason=reason.name.lower(),
                cls=Cls(cls_v).name.lower(),
                batches=len(rs),
                samples=n,
            )
            # A dropped loss record takes the blocks it carried into the new one: the
            # sequences it named must stay named, or they become a silent gap.
            extra = carried if cls_v == int(Cls.EVT) else []
            self._insert(Cls.EVT, [loss, *extra], int(rs[-1][7]))
        return freed

    def _loss_blocks_in(self, seqs: Sequence[int]) -> list[LossBlock]:
        """The loss blocks carried by the (sample-less evt) rows `seqs`."""
        assert self._conn is not None
        out: list[LossBlock] = []
        for i in range(0, len(seqs), 500):
            chunk = list(seqs[i : i + 500])
            rows = self._conn.execute(
                f"SELECT payload FROM batches WHERE seq IN ({','.join('?' * len(chunk))})"
                " ORDER BY seq",
                chunk,
            ).fetchall()
            for (payload,) in rows:
                try:
                    blocks = codec.decode(bytes(payload)).batch.blocks
                except codec.DecodeError:
                    continue  # a row that does not decode is quarantined elsewhere
                out.extend(b for b in blocks if isinstance(b, LossBlock))
        return out

    def _enforce_budget(self) -> None:
        if self.stats.total_bytes <= self.budget:
            return
        self._shrink(self.stats.total_bytes - int(self.budget * 0.9))

    def _shrink(self, amount: int) -> None:
        """Free `amount` accounted bytes: delivered rows, then raw, agg, evt (with loss)."""
        assert self._conn is not None
        target = self.stats.total_bytes - amount
        # Delivered rows go first: nothing is lost by dropping them.
        need = self.stats.total_bytes - target
        rows = self._conn.execute(
            "SELECT seq, LENGTH(payload) FROM batches WHERE acked=1 ORDER BY seq"
        ).fetchall()
        chosen: list[int] = []
        freed = 0
        for seq, ln in rows:
            if freed >= need:
                break
            chosen.append(seq)
            freed += ln + ROW_OVERHEAD
        if chosen:
            self._exec_in("DELETE FROM batches WHERE seq IN ({})", chosen)
            self.stats.total_bytes -= freed
            self.stats.kept_acked_batches -= len(chosen)
        for cls in (Cls.RAW, Cls.AGG, Cls.EVT):
            # Free a little more than needed: the loss record written for what is
            # dropped must fit too (and must not be the next thing evicted).
            while (need := self.stats.total_bytes - target) > 0:
                if not self._drop("cls=?", (int(cls),), LossReason.EVICTED_CAP, need + 2048):
                    break

    def housekeeping(self) -> None:
        """Drop rows past their class TTL (with loss records) and old delivered rows."""
        assert self._conn is not None
        now = self.clock()
        self.begin()
        for cls, ttl in self.ttl_s.items():
            self._drop("cls=? AND created<?", (int(cls), now - ttl), LossReason.EXPIRED_TTL, None)
        rows = self._conn.execute(
            "SELECT seq, LENGTH(payload) FROM batches WHERE acked=1 AND created<?",
            (now - self.keep_acked_s,),
        ).fetchall()
        if rows:
            self._exec_in("DELETE FROM batches WHERE seq IN ({})", [r[0] for r in rows])
            self.stats.total_bytes -= sum(r[1] + ROW_OVERHEAD for r in rows)
            self.stats.kept_acked_batches -= len(rows)
