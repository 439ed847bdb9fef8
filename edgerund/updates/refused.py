"""What the inbox has refused, remembered across restarts (a pure record + a thin file store).

Why: the inbox (a technician's USB stick) is read on every start. A poisoned file that
the daemon refuses would be offered again after every restart, and one that makes the
daemon die while processing it (whatever the bug) would put the service into a restart
loop. So the inbox marks a file IN FLIGHT, durably, before it processes it, and records
the outcome after: a refused file is remembered with its reason; an accepted one is
forgotten. At the next start an entry still in flight means the daemon died on that file:
it becomes refused (`crashed_while_processing`) and is not offered again.

A file is identified by its name, size, mtime and the SHA-256 of its first 64 KiB
(`file_key`, blocking: the caller runs it in a thread): renaming or rewriting a file makes
it new, re-inserting the same stick does not. The record is bounded (oldest entries are
dropped first) and written atomically (fsutil.atomic_write). An unreadable record file is
moved aside and started afresh: forgetting refusals costs one more refusal each, never
trust.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from edgerund.updates import fsutil

HEAD_BYTES = 64 * 1024
MAX_ENTRIES = 256
RECORD_MAX_BYTES = 1 << 20
CRASHED = "crashed_while_processing"


class Entry(msgspec.Struct, kw_only=True):
    key: str
    name: str
    state: str  # "in_flight" | "refused"
    reason: str = ""
    message: str = ""
    at: float = 0.0


class _Doc(msgspec.Struct):
    schema: int
    entries: list[Entry]


def file_key(path: Path) -> str:
    """name/size/mtime/head-hash identity of an inbox file (never follows a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(HEAD_BYTES)
    h = hashlib.sha256(head).hexdigest()
    return f"{path.name}|{st.st_size}|{st.st_mtime_ns}|{h}"


@dataclass
class RefusedRecord:
    """The pure record: begin/finish/recover transitions over an ordered, bounded map."""

    entries: dict[str, Entry] = field(default_factory=dict)
    max_entries: int = MAX_ENTRIES

    def refused(self, key: str) -> Entry | None:
        e = self.entries.get(key)
        return e if e is not None and e.state == "refused" else None

    def begin(self, key: str, name: str, now: float) -> None:
        self._put(Entry(key=key, name=name, state="in_flight", at=now))

    def finish(self, key: str, name: str, reason: str | None, message: str, now: float) -> None:
        """reason None: accepted, forget it; else remember the refusal."""
        if reason is None:
            self.entries.pop(key, None)
        else:
            self._put(
                Entry(key=key, name=name, state="refused", reason=reason, message=message, at=now)
            )

    def recover(self) -> list[Entry]:
        """At start-up: every entry still in flight is a file the daemon died on."""
        crashed = []
        for k, e in list(self.entries.items()):
            if e.state == "in_flight":
                e = Entry(
                    key=k,
                    name=e.name,
                    state="refused",
                    reason=CRASHED,
                    message="the daemon stopped while processing this file; it is not retried",
                    at=e.at,
                )
                self.entries[k] = e
                crashed.append(e)
        return crashed

    def _put(self, e: Entry) -> None:
        self.entries.pop(e.key, None)
        self.entries[e.key] = e
        while len(self.entries) > self.max_entries:
            del self.entries[next(iter(self.entries))]

    def to_bytes(self) -> bytes:
        return msgspec.json.encode(_Doc(1, list(self.entries.values())))

    @classmethod
    def from_bytes(cls, data: bytes, max_entries: int = MAX_ENTRIES) -> RefusedRecord:
        doc = msgspec.json.decode(data, type=_Doc)
        rec = cls(max_entries=max_entries)
        for e in doc.entries:
            rec._put(e)
        return rec


class RefusedStore:
    """The record on disk (blocking I/O; call from a thread). Every change is durable
    before the call returns, so `begin` really precedes the processing it guards."""

    def __init__(self, path: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.path = path
        self.record = RefusedRecord(max_entries=max_entries)
        self._max = max_entries

    def load(self) -> list[Entry]:
        """Read the record and recover in-flight entries (returned, to be logged)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read(RECORD_MAX_BYTES + 1)
            if len(data) > RECORD_MAX_BYTES:
                raise ValueError("record too large")
            self.record = RefusedRecord.from_bytes(data, self._max)
        except FileNotFoundError:
            self.record = RefusedRecord(max_entries=self._max)
        except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError):
            broken = self.path.with_name(self.path.name + ".broken")
            try:
                os.replace(self.path, broken)
            except OSError:
                pass
            self.record = RefusedRecord(max_entries=self._max)
        crashed = self.record.recover()
        if crashed:
            self._save()
        return crashed

    def refused(self, key: str) -> Entry | None:
        return self.record.refused(key)

    def begin(self, key: str, name: str, now: float) -> None:
        self.record.begin(key, name, now)
        self._save()

    def finish(self, key: str, name: str, reason: str | None, message: str, now: float) -> None:
        self.record.finish(key, name, reason, message, now)
        self._save()

    def _save(self) -> None:
        fsutil.make_dirs(self.path.parent)
        fsutil.atomic_write(self.path, self.record.to_bytes(), mode=0o600)
