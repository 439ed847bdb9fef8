"""Where bundles come from, besides the socket's `update` command (commands.py): the inbox
directory (a technician's USB stick) and the MQTT chunked transfer (`cmd/update`).

Theory of operation
-------------------
Both only hand files to the job runner; neither parses them. The inbox is polled every
`inbox_poll_ms` off the event loop; a file is submitted once its size and mtime held
still across two polls (the copy finished), and never twice for the same (path, size,
mtime). The inbox also remembers, ACROSS RESTARTS, what it refused (refused.RefusedStore):
a file is marked in flight durably before it is submitted and its outcome recorded after;
a refused file (or one the daemon died on: `crashed_while_processing`) is never offered
again, so a poisoned stick costs one refusal, not one per restart, and cannot put the
service into a restart loop. One refusal is of the moment, not of the file:
`pinned_by_twin` (a twin target pins the model to another version, twin/pins.py). Such a
file is not remembered as refused; it is offered again when the pins' desired version
changes (the backend may have lifted or moved the target) and at the next start, once
each. The inbox takes its rate-limit token (ratelimit.py, bucket `inbox`) before marking a
file: over the limit, the file simply waits for a later poll. MQTT messages are handled
by transfer.TransferStore (resumable, size-capped, the whole file's SHA-256 checked at
commit); a committed transfer is submitted as a job whose file the runner deletes
afterwards. The MQTT handler is registered with the root's
command router (ports.CommandRouter), so nothing waits for the telemetry uplink.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from edgerund.ports import PINNED_BY_TWIN
from edgerund.updates.jobs import Job, JobTicket
from edgerund.updates.ratelimit import SourceLimiter
from edgerund.updates.refused import RefusedStore, file_key
from edgerund.updates.transfer import TransferError, TransferStore, parse_message

log = structlog.get_logger("edgerund.updates")

Submit = Callable[[Job], Awaitable[JobTicket]]


class MqttSource:
    def __init__(self, transfers: TransferStore, submit: Submit) -> None:
        self.transfers = transfers
        self._submit = submit

    async def handle(self, payload: bytes) -> bytes | None:
        """One `cmd/update` message (transfer.py protocol); returns the JSON reply."""
        tid: Any = None
        try:
            hdr, data = parse_message(payload)
            tid = hdr.get("id")
            reply, done = await asyncio.to_thread(self.transfers.handle, hdr, data, time.time())
            if done is not None:
                ticket = await self._submit(Job(done, f"mqtt:{tid}", remove_after=True))
                err = ticket.error if ticket.done.is_set() else None
                if err is not None:  # refused at once (rate_limited): the file is gone
                    raise TransferError(err.code, str(err).split(": ", 1)[-1])
        except TransferError as exc:
            reply = {"ok": False, "id": tid, "error": {"code": exc.code, "message": exc.message}}
        except OSError as exc:
            reply = {"ok": False, "id": tid, "error": {"code": "io_error", "message": str(exc)}}
        return json.dumps(reply).encode()


class InboxSource:
    def __init__(
        self,
        inbox: Path,
        poll_ms: int,
        submit: Submit,
        *,
        refused: RefusedStore,
        limiter: SourceLimiter | None = None,
        pins_version: Callable[[], int] = lambda: 0,
    ) -> None:
        self.inbox = inbox
        self.poll_s = poll_ms / 1000.0
        self._submit = submit
        self.refused = refused
        self.limiter = limiter
        self._pins_version = pins_version
        self._seen: set[tuple[str, int, int]] = set()
        # files refused `pinned_by_twin`, with the pins' version of that refusal
        self._pinned: dict[tuple[str, int, int], int] = {}

    async def run(self) -> None:
        sizes: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                entries = await asyncio.to_thread(scan_inbox, self.inbox)
            except OSError:
                continue  # stick not inserted / unreadable: look again later
            pins = self._pins_version()
            for key, at in list(self._pinned.items()):
                if at != pins:  # the targets changed: the pinned files get another look
                    del self._pinned[key]
                    self._seen.discard(key)
            for path, size, mtime in entries:
                key = (str(path), size, mtime)
                if key in self._seen:
                    continue
                # Only files whose size held still across two polls (copy finished).
                if sizes.get(str(path)) != (size, mtime):
                    sizes[str(path)] = (size, mtime)
                    continue
                await self._offer(path, size, key)

    async def _offer(self, path: Path, size: int, seen_key: tuple[str, int, int]) -> None:
        try:
            fkey = await asyncio.to_thread(file_key, path)
        except OSError:
            return  # vanished or unreadable: look again at the next poll
        entry = self.refused.refused(fkey)
        if entry is not None:
            self._seen.add(seen_key)
            log.info(
                "update_inbox_skipped",
                path=str(path),
                reason=entry.reason,
                message="refused before; not offered again",
            )
            return
        if self.limiter is not None:
            wait_s = self.limiter.take("inbox")
            if wait_s > 0:
                log.info("update_inbox_rate_limited", path=str(path), retry_in_s=round(wait_s, 1))
                return  # not seen: offered again at a later poll
        self._seen.add(seen_key)
        log.info("update_inbox_found", path=str(path), size=size)
        # Durable BEFORE the job touches the file: if the daemon dies on it, the next
        # start finds it in flight and refuses it instead of dying again.
        await asyncio.to_thread(self.refused.begin, fkey, path.name, time.time())
        pins = self._pins_version()
        ticket = await self._submit(Job(path, f"inbox:{path.name}", admitted=True))
        await ticket.done.wait()
        err = ticket.error
        pinned = err is not None and err.code == PINNED_BY_TWIN
        if pinned:
            self._pinned[seen_key] = pins
            log.info(
                "update_inbox_pinned",
                path=str(path),
                message="offered again when the twin's model targets change",
            )
        await asyncio.to_thread(
            self.refused.finish,
            fkey,
            path.name,
            None if err is None or pinned else err.code,  # None: not remembered
            "" if err is None else str(err).split(": ", 1)[-1],
            time.time(),
        )


def scan_inbox(inbox: Path) -> list[tuple[Path, int, int]]:
    """(path, size, mtime_ns) of the candidate files: bundles and keyring documents."""
    out = []
    for p in sorted(inbox.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix in (".tar", ".bundle") or (
            p.suffix == ".json" and p.name.startswith("keyring")
        ):
            st = p.stat()
            out.append((p, st.st_size, st.st_mtime_ns))
    return out
