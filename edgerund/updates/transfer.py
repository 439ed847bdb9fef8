"""Chunked, resumable, size-capped bundle transfer over MQTT (`.../cmd/update`).

Wire format: each MQTT message is one JSON header line, a newline, then (for `chunk`) the
raw chunk bytes. Every request gets a JSON reply on `.../cmd/update/reply`.

    {"op":"begin","id":ID,"size":N,"sha256":HEX}    -> {"ok":true,"id":ID,"next_offset":K}
    {"op":"chunk","id":ID,"offset":K}\\n<bytes>      -> {"ok":true,"id":ID,"next_offset":K'}
    {"op":"status","id":ID}                         -> {"ok":true,"id":ID,"next_offset":K,"size":N}
    {"op":"commit","id":ID}                         -> {"ok":true,"id":ID,"accepted":true}
    {"op":"abort","id":ID}                          -> {"ok":true,"id":ID}
    errors                                          -> {"ok":false,"id":ID,"error":{code,message}}

Resumable: the partial file lives in `<state_dir>/updates/transfers/ID.part` with its header
in `ID.json`, so after a reconnect or a daemon restart `begin` (same id, size, sha256) or
`status` answers where to continue. A chunk at the wrong offset is not an error: the reply
names the offset the device wants (duplicates after a retry are ignored, gaps are refused).
Capped: `size` must be within bundle_max_mb, a chunk within mqtt_chunk_max_kb, and no chunk
may run past the announced size (an endless sender is cut at the cap). At `commit` the file
is complete and its SHA-256 must equal the announced one before the update pipeline sees it.
Stale transfers (no chunk for mqtt_transfer_ttl_s) are dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerund.errors import EdgerundError, TrustError
from edgerund.updates import fsutil
from edgerund.updates.jsonguard import check_depth

HEADER_MAX_BYTES = 4096
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TransferError(EdgerundError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Transfer:
    id: str
    size: int
    sha256: str
    offset: int
    last_s: float


def parse_message(payload: bytes) -> tuple[dict[str, Any], bytes]:
    head, _sep, data = payload.partition(b"\n")
    if len(head) > HEADER_MAX_BYTES:
        raise TransferError("bad_request", f"header line longer than {HEADER_MAX_BYTES} bytes")
    try:
        # Unauthenticated: deep nesting would raise RecursionError, not ValueError.
        check_depth(head, "header", "bad_request", max_depth=4)
        hdr = json.loads(head)
    except TrustError as exc:
        raise TransferError("bad_request", str(exc).split(": ", 1)[-1]) from None
    except ValueError:
        raise TransferError("bad_request", "expected a JSON header line") from None
    if not isinstance(hdr, dict):
        raise TransferError("bad_request", "header must be a JSON object")
    return hdr, data


class TransferStore:
    """Blocking; the component calls `handle` in a worker thread."""

    def __init__(
        self, root: Path, *, max_bytes: int, chunk_max: int, ttl_s: float, max_transfers: int
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.chunk_max = chunk_max
        self.ttl_s = ttl_s
        self.max_transfers = max_transfers
        self.active: dict[str, Transfer] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.root.is_dir():
            return
        for meta in self.root.glob("*.json"):
            try:
                d = json.loads(meta.read_text())
                part = self.root / f"{d['id']}.part"
                off = part.stat().st_size if part.exists() else 0
                self.active[d["id"]] = Transfer(
                    d["id"], int(d["size"]), d["sha256"], min(off, int(d["size"])), time.time()
                )
            except (OSError, ValueError, KeyError):
                with contextlib.suppress(OSError):
                    meta.unlink()

    def _drop(self, tid: str) -> None:
        self.active.pop(tid, None)
        for suffix in (".part", ".json"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{tid}{suffix}").unlink()

    def expire(self, now: float) -> list[str]:
        self._load()
        stale = [t.id for t in self.active.values() if now - t.last_s > self.ttl_s]
        for tid in stale:
            self._drop(tid)
        return stale

    def progress(self) -> list[dict[str, Any]]:
        return [
            {
                "id": t.id,
                "bytes_done": t.offset,
                "bytes_total": t.size,
                "percent": round(100.0 * t.offset / t.size, 1) if t.size else 100.0,
            }
            for t in self.active.values()
        ]

    def handle(
        self, hdr: dict[str, Any], data: bytes, now: float
    ) -> tuple[dict[str, Any], Path | None]:
        """Apply one request. Returns (reply, path of a complete verified file on commit)."""
        self._load()
        self.expire(now)
        op = hdr.get("op")
        tid = hdr.get("id")
        if not isinstance(tid, str) or not _ID_RE.match(tid):
            raise TransferError("bad_request", f"id: expected [A-Za-z0-9_-]{{1,64}}, got {tid!r}")
        t = self.active.get(tid)
        if op == "begin":
            size, sha = hdr.get("size"), hdr.get("sha256")
            if not isinstance(size, int) or size <= 0:
                raise TransferError(
                    "bad_request", f"size: expected a positive integer, got {size!r}"
                )
            if size > self.max_bytes:
                raise TransferError(
                    "too_large", f"size: expected at most {self.max_bytes} bytes, got {size}"
                )
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise TransferError("bad_request", "sha256: expected 64 lowercase hex digits")
            if t is not None and (t.size, t.sha256) == (size, sha):
                t.last_s = now
                return {"ok": True, "id": tid, "next_offset": t.offset, "size": t.size}, None
            if t is not None:
                self._drop(tid)
            if len(self.active) >= self.max_transfers:
                raise TransferError("busy", f"at most {self.max_transfers} transfers at a time")
            self.root.mkdir(parents=True, exist_ok=True)
            fsutil.atomic_write(
                self.root / f"{tid}.json",
                json.dumps({"id": tid, "size": size, "sha256": sha}).encode(),
            )
            (self.root / f"{tid}.part").write_bytes(b"")
            self.active[tid] = Transfer(tid, size, sha, 0, now)
            return {"ok": True, "id": tid, "next_offset": 0, "size": size}, None
        if t is None:
            raise TransferError("unknown_transfer", f"no transfer {tid!r} in progress (send begin)")
        t.last_s = now
        if op == "status":
            return {"ok": True, "id": tid, "next_offset": t.offset, "size": t.size}, None
        if op == "abort":
            self._drop(tid)
            return {"ok": True, "id": tid}, None
        if op == "chunk":
            off = hdr.get("offset")
            if not isinstance(off, int) or off < 0:
                raise TransferError("bad_request", f"offset: expected an integer >= 0, got {off!r}")
            if len(data) > self.chunk_max:
                raise TransferError(
                    "chunk_too_large",
                    f"chunk: expected at most {self.chunk_max} bytes, got {len(data)}",
                )
            if off != t.offset:
                # A retried chunk we already have, or a gap: say where to continue.
                return {"ok": True, "id": tid, "next_offset": t.offset, "size": t.size}, None
            if off + len(data) > t.size:
                self._drop(tid)
                raise TransferError(
                    "too_large", f"data runs past the announced size {t.size}; transfer dropped"
                )
            fd = os.open(self.root / f"{tid}.part", os.O_WRONLY | os.O_APPEND)
            try:
                fsutil.write_all(fd, data)
            finally:
                os.close(fd)
            t.offset += len(data)
            return {"ok": True, "id": tid, "next_offset": t.offset, "size": t.size}, None
        if op == "commit":
            if t.offset != t.size:
                raise TransferError("incomplete", f"have {t.offset} of {t.size} bytes")
            part = self.root / f"{tid}.part"
            h = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != t.sha256:
                self._drop(tid)
                raise TransferError(
                    "hash_mismatch",
                    "sha256 of the received bytes differs from the announced one; transfer dropped",
                )
            done = self.root / f"{tid}.bundle"
            os.replace(part, done)
            self._drop(tid)
            return {"ok": True, "id": tid, "accepted": True}, done
        raise TransferError(
            "bad_request", f"op: expected begin|chunk|status|commit|abort, got {op!r}"
        )
