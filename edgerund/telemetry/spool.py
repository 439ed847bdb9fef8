"""The crash-safe store-and-forward spool: SQLite in WAL mode, one row per sealed batch.

Theory of operation
-------------------
* One writer thread owns the only connection (telemetry/spooldb.py: the file, its space
  rules and loss records). Every operation (append a sealed batch, mark rows acknowledged,
  fetch the backlog, register series) is a typed closure on its queue (`_Op`: one `_op_*`
  method and its arguments), answered through a concurrent future, so the event loop never
  waits on SQLite, zstd or fsync. Each `_op_*` says in its `_Answer` whether the caller
  hears back at once (reads) or after the commit (writes), and whether the group must
  commit now.
* Appends are *grouped*: the thread keeps one transaction open and commits it
  `commit_interval` after its first write (an `urgent` append, i.e. an event, commits at
  once). Futures resolve only after the commit, so "appended" means "on disk"
  (synchronous=FULL: the WAL is fsynced at every commit, one fsync per group). A group
  that fails to commit, or that SQLite rolls back (disk full), fails exactly the futures
  of the writes in it: nothing is reported stored that is not.
* The writer thread assigns the batch sequence (AUTOINCREMENT: never reused, even after
  deletion) and encodes the batch itself, so sequence order is commit order and the dedup
  key (spool epoch, seq) is unique. A kill -9 loses what the process had not yet handed
  over plus at most one commit interval: the component seals its open raw batch every
  `batch_max_age_s`, which bounds the loss.
* Rows are deleted only after their PUBACK: `ack()` marks them delivered; delivered rows
  are kept (for `cmd/resend`) until `keep_acked_s` or until space is needed.
* Space (a byte budget under `max_bytes`, a TTL per class, loss records for what is
  dropped) and corruption (quarantine, new epoch) are described in spooldb.py; the writer
  runs the TTL housekeeping every `housekeeping_s` and reports a quarantine through
  `on_quarantine` (from the writer thread), a commit through `on_commit`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from edgerund.telemetry.codec import Block, Cls
from edgerund.telemetry.spooldb import Row, SpoolDb, SpoolError, SpoolStats, is_corrupt

__all__ = ["Row", "Spool", "SpoolError", "SpoolStats"]

log = structlog.get_logger("edgerund.telemetry.spool")

T = TypeVar("T")
MAX_OPS_PER_ROUND = 512  # queued calls taken per wake-up before deciding on a commit


@dataclass(frozen=True, slots=True)
class _Answer(Generic[T]):
    """What an operation returns to the writer loop.

    after_commit: resolve the caller's future only once the open transaction has committed
    ("stored" means on disk); otherwise at once (reads). commit_now: commit the group now
    instead of `commit_interval_s` after its first write (events, flush, close, requeue).
    """

    value: T
    after_commit: bool = False
    commit_now: bool = False


@dataclass(frozen=True, slots=True)
class _Op(Generic[T]):
    """One call queued to the writer thread: a typed closure and the caller's future."""

    name: str
    run: Callable[[], _Answer[T]]
    future: cf.Future[T]
    stop: bool = False  # close: the writer commits, checkpoints and ends after this


class Spool:
    """See the module docstring. Thread-safe entry points; async wrappers for the loop."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        ttl_s: dict[Cls, float],
        keep_acked_s: float = 86400.0,
        commit_interval_s: float = 1.0,
        housekeeping_s: float = 30.0,
        on_commit: Callable[[], None] | None = None,
        on_quarantine: Callable[[int, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = SpoolDb(
            directory, max_bytes=max_bytes, ttl_s=ttl_s, keep_acked_s=keep_acked_s, clock=clock
        )
        self.db.on_group_lost = self._fail_pending
        self.dir = self.db.dir
        self.max_bytes = self.db.max_bytes
        self.commit_interval_s = commit_interval_s
        self.housekeeping_s = housekeeping_s
        self.on_commit = on_commit
        self.on_quarantine = on_quarantine
        self._q: queue.Queue[_Op[Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: list[tuple[cf.Future[Any], Any]] = []
        self._closed = False

    @property
    def stats(self) -> SpoolStats:
        return self.db.stats

    @property
    def epoch(self) -> int:
        return self.db.stats.epoch

    @property
    def last_seq(self) -> int:
        """The sequence of the newest row appended (0 before any in this epoch)."""
        return self.db.next_seq - 1

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Open (quarantining a corrupt db) and start the writer thread. Blocking."""
        quarantined = self.db.open()
        if quarantined and self.on_quarantine:
            self.on_quarantine(self.epoch, quarantined)
        self._thread = threading.Thread(target=self._run, name="telemetry-spool", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Commit what is pending and stop the thread. Blocking; idempotent."""
        if self._thread is None or self._closed:
            return
        self._submit("close", self._op_commit, stop=True).result(timeout=60)
        self._thread.join(timeout=60)
        self._closed = True

    # ------------------------------------------------------------ public API

    def _submit(
        self, name: str, run: Callable[[], _Answer[T]], *, stop: bool = False
    ) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        if self._closed or self._thread is None:
            fut.set_exception(SpoolError("spool is closed"))
            return fut
        self._q.put(_Op(name, run, fut, stop))
        return fut

    def append(
        self, cls: Cls, blocks: Sequence[Block], schema_ver: int, *, urgent: bool = False
    ) -> cf.Future[int]:
        """Seal: assign a seq, encode, store. Resolves to the seq once committed."""
        blocks = tuple(blocks)
        return self._submit("append", lambda: self._op_append(cls, blocks, schema_ver, urgent))

    def ack(self, seqs: Sequence[int]) -> cf.Future[None]:
        seqs = tuple(seqs)
        return self._submit("ack", lambda: self._op_ack(seqs))

    def requeue(self, epoch: int, first: int, last: int) -> cf.Future[tuple[list[int], int]]:
        """Mark kept rows first..last undelivered again (cmd/resend): (requeued, missing)."""
        return self._submit("requeue", lambda: self._op_requeue(epoch, first, last))

    def fetch(self, cls: Cls, after_seq: int, limit: int) -> cf.Future[list[Row]]:
        return self._submit("fetch", lambda: _Answer(self.db.fetch(cls, after_seq, limit)))

    def register_series(self, names: Sequence[str]) -> cf.Future[dict[str, int]]:
        names = tuple(names)
        return self._submit("series", lambda: _written(*self.db.register_series(names)))

    def register_meta(self, meta_json: str) -> cf.Future[int]:
        return self._submit("meta", lambda: _written(*self.db.register_meta(meta_json)))

    def meta_versions(self, vers: Sequence[int]) -> cf.Future[dict[int, str]]:
        vers = tuple(vers)
        return self._submit("get_metas", lambda: _Answer(self.db.meta_versions(vers)))

    def backlog_schema_versions(self) -> cf.Future[list[int]]:
        return self._submit("backlog_vers", lambda: _Answer(self.db.backlog_versions()))

    def flush(self) -> cf.Future[None]:
        return self._submit("flush", self._op_commit)

    def housekeeping(self) -> cf.Future[None]:
        return self._submit("housekeeping", self._op_housekeeping)

    async def aflush(self) -> None:
        await asyncio.wrap_future(self.flush())

    # ------------------------------------------------------------ operations (writer thread)

    def _op_append(
        self, cls: Cls, blocks: Sequence[Block], schema_ver: int, urgent: bool
    ) -> _Answer[int]:
        seq = self.db.append(cls, blocks, schema_ver)
        return _Answer(seq, after_commit=True, commit_now=urgent)

    def _op_ack(self, seqs: Sequence[int]) -> _Answer[None]:
        self.db.ack(seqs)
        return _Answer(None, after_commit=True)  # acks ride with the next group commit

    def _op_requeue(self, epoch: int, first: int, last: int) -> _Answer[tuple[list[int], int]]:
        return _Answer(self.db.requeue(epoch, first, last), after_commit=True, commit_now=True)

    def _op_housekeeping(self) -> _Answer[None]:
        self.db.housekeeping()
        return _Answer(None, after_commit=True, commit_now=True)

    def _op_commit(self) -> _Answer[None]:
        """flush and close: answered once everything before them is committed."""
        return _Answer(None, after_commit=True, commit_now=True)

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        deadline: float | None = None
        next_house = time.monotonic() + self.housekeeping_s
        while True:
            now = time.monotonic()
            wait = min(next_house, deadline if deadline is not None else next_house) - now
            try:
                item: _Op[Any] | None = self._q.get(timeout=max(0.0, wait))
            except queue.Empty:
                item = None
            batch_items = [item] if item else []
            while item is not None and len(batch_items) < MAX_OPS_PER_ROUND:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                batch_items.append(item)
            commit_now = False
            stop = False
            for op in batch_items:
                # Cancelled by its caller before it ran: skipped. Once running, the future
                # cannot be cancelled any more (a caller that stops waiting, e.g. an
                # uplink session torn down mid-fetch, cancels its wrapper only), so the
                # set_result below never meets a cancelled future, which would raise
                # InvalidStateError here and end this thread: the spool would take no
                # more batches (soak and CI, 2026-12-06).
                if not op.future.set_running_or_notify_cancel():
                    continue
                try:
                    answer = op.run()
                except Exception as exc:
                    self._fail(exc, op.future)
                    if is_corrupt(exc):
                        self._recover_corrupt(exc)
                    continue
                if answer.after_commit:
                    self._pending.append((op.future, answer.value))
                else:
                    op.future.set_result(answer.value)
                if op.stop:
                    stop = True
                    commit_now = True
                elif answer.commit_now:
                    commit_now = True
                if self.db.dirty and deadline is None:
                    deadline = time.monotonic() + self.commit_interval_s
            now = time.monotonic()
            if now >= next_house:
                try:
                    self.db.housekeeping()
                except Exception as exc:
                    self._fail(exc, None)
                next_house = now + self.housekeeping_s
            if self.db.dirty and deadline is None:
                deadline = now + self.commit_interval_s
            if self.db.dirty and (commit_now or (deadline is not None and now >= deadline)):
                self._commit()
                deadline = None
            elif not self.db.dirty:
                deadline = None
                self._resolve_pending()
            if stop:
                self.db.close()
                return

    def _fail(self, exc: BaseException, fut: cf.Future[Any] | None) -> None:
        st = self.db.stats
        st.write_errors += 1
        msg = f"{type(exc).__name__}: {exc}"
        if msg != st.last_error:
            log.error("spool_error", error=msg)
        st.last_error = msg
        if fut is not None and not fut.done():
            fut.set_exception(SpoolError(msg))

    def _fail_pending(self, exc: BaseException) -> None:
        """The open group is gone: every write waiting for its commit failed."""
        pending, self._pending = self._pending, []
        for fut, _ in pending:
            self._fail(exc, fut)

    def _commit(self) -> None:
        try:
            self.db.commit()
        except Exception as exc:
            self._fail_pending(exc)
            if is_corrupt(exc):
                self._recover_corrupt(exc)
            return
        self._resolve_pending()
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:
                log.exception("spool_on_commit_failed")

    def _resolve_pending(self) -> None:
        pending, self._pending = self._pending, []
        for fut, result in pending:
            if not fut.done():
                fut.set_result(result)

    def _recover_corrupt(self, exc: BaseException) -> None:
        self._fail_pending(exc)
        dest = self.db.recover_corrupt(exc)
        if self.on_quarantine:
            self.on_quarantine(self.epoch, dest)


def _written(value: T, wrote: bool) -> _Answer[T]:
    """A registration: answered after the commit (at once) if it wrote, else at once."""
    return _Answer(value, after_commit=wrote, commit_now=wrote)
