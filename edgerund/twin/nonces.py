"""The command gate's nonce cache, persisted (docs/twin.md §3 "Replay after a restart").

Why. A signed command is accepted while its timestamp is inside the window (300 s) and its
nonce unseen. A cache that lives only in memory forgets at a restart, so a command
captured on the broker could be replayed once, after a restart, inside the window. The
cache (auth.ReplayGuard: at most 4096 nonces and a timestamp floor, ~370 KB at most) is
therefore written to `<state_dir>/twin/nonces.json` after every admitted command.

How. `NonceCache.run` is the writer task: it waits until the guard has accepted a new
nonce, dumps it and writes it in a worker thread (temp file, fsync, rename, fsync of the
directory), coalescing commands that arrive during a write; the event loop never waits for
the disk. At start-up (`load`, before any command is dispatched) the file is read back and
every entry checked (its content is unauthenticated; entries out of the window are
dropped). When there is no readable file (first start, deleted, corrupt) the guard's floor
is raised to the start time instead: every command signed before the start is refused
(`replay`), so nothing admitted before the restart can come back either way; the cost is
that a command signed before a restart and delivered after it must be signed again.

Residual: a command admitted in the milliseconds before the write completes, followed at
once by a crash (SIGKILL, power loss), is not in the file; it stays replayable once
within its window. Refusing it would need the write durable before the handler runs,
i.e. the disk on the command path.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import structlog

from edgerund.jsondepth import too_deep
from edgerund.twin.auth import ReplayGuard
from edgerund.updates import fsutil

log = structlog.get_logger("edgerund.twin.nonces")

MAX_FILE_BYTES = 1 << 20


def _read(path: Path) -> object:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    if too_deep(data, 4):
        raise ValueError("nested deeper than a nonce cache")
    return json.loads(data)


def _write(path: Path, snapshot: dict[str, Any]) -> None:
    data = json.dumps(snapshot, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fsutil.atomic_write(path, data, mode=0o600)


class NonceCache:
    def __init__(self, guard: ReplayGuard, path: Path) -> None:
        self.guard = guard
        self.path = path
        self.written = 0  # guard.changes of the last copy on disk
        self.write_errors = 0
        self._wake = asyncio.Event()

    async def load(self) -> None:
        now_ms = int(time.time() * 1000)
        try:
            data = await asyncio.to_thread(_read, self.path)
            n = self.guard.restore(data, now_ms)
        except FileNotFoundError:
            self.guard.raise_floor(now_ms)
            log.info("twin_nonce_cache_new", path=str(self.path), floor_ms=now_ms)
            return
        except (OSError, ValueError) as exc:
            self.guard.raise_floor(now_ms)
            log.warning(
                "twin_nonce_cache_unreadable", path=str(self.path), error=str(exc),
                action="commands signed before now are refused",
            )  # fmt: skip
            return
        log.info("twin_nonce_cache_loaded", nonces=n, floor_ms=self.guard.floor_ms)

    def admitted(self) -> None:
        """A command was admitted: write the cache soon (called on the loop)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            changes = self.guard.changes
            if changes == self.written:
                continue
            snapshot = self.guard.dump()  # a copy: later commands do not change it
            try:
                await asyncio.to_thread(_write, self.path, snapshot)
            except OSError as exc:
                self.write_errors += 1
                log.error("twin_nonce_cache_write_failed", path=str(self.path), error=str(exc))
                continue
            self.written = changes
