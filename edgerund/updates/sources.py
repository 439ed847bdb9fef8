"""Where bundles come from, besides the socket's `update` command (commands.py): the inbox
directory (a technician's USB stick) and the MQTT chunked transfer (`cmd/update`).

Theory of operation
-------------------
Both only hand files to the job runner; neither parses them. The inbox is polled every
`inbox_poll_ms` off the event loop; a file is submitted once its size and mtime held
still across two polls (the copy finished), and never twice for the same (path, size,
mtime). MQTT messages are handled by transfer.TransferStore (resumable, size-capped, the
whole file's SHA-256 checked at commit); a committed transfer is submitted as a job whose
file the runner deletes afterwards. The MQTT handler is registered with the root's
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

from edgerund.updates.jobs import Job, JobTicket
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
                await self._submit(Job(done, f"mqtt:{tid}", remove_after=True))
        except TransferError as exc:
            reply = {"ok": False, "id": tid, "error": {"code": exc.code, "message": exc.message}}
        except OSError as exc:
            reply = {"ok": False, "id": tid, "error": {"code": "io_error", "message": str(exc)}}
        return json.dumps(reply).encode()


class InboxSource:
    def __init__(self, inbox: Path, poll_ms: int, submit: Submit) -> None:
        self.inbox = inbox
        self.poll_s = poll_ms / 1000.0
        self._submit = submit
        self._seen: set[tuple[str, int, int]] = set()

    async def run(self) -> None:
        sizes: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                entries = await asyncio.to_thread(scan_inbox, self.inbox)
            except OSError:
                continue  # stick not inserted / unreadable: look again later
            for path, size, mtime in entries:
                key = (str(path), size, mtime)
                if key in self._seen:
                    continue
                # Only files whose size held still across two polls (copy finished).
                if sizes.get(str(path)) != (size, mtime):
                    sizes[str(path)] = (size, mtime)
                    continue
                self._seen.add(key)
                log.info("update_inbox_found", path=str(path), size=size)
                await self._submit(Job(path, f"inbox:{path.name}"))


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
