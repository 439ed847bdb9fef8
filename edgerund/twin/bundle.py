"""Remote `support-bundle`: the support bundle built on the gateway and pulled in chunks
through operator-signed commands (docs/twin.md §3).

The first request (`{}`) builds a tar.gz in memory, off the loop: `status.json`, the log
ring (`log.json`), the effective config with secret-looking values redacted
(`config.json`, the same redaction as `edgerunctl support-bundle`) and versions; no file of
the state or identity directories, and every member is scanned for PEM private keys (a hit
aborts). The reply carries `bundle_id`, `size`, `sha256` and `chunks`; since that reply is
signed by the gateway, the digest authenticates the whole bundle. Each next request
`{"bundle_id", "chunk": i}` returns one base64 chunk of `CHUNK_BYTES`. One bundle is kept
(the newest) for `TTL_S`; the size is capped at `MAX_BYTES`.

`build` imports tarfile and the toolkit's redaction (with its checks, diagnostics client
and importlib.metadata) when it runs, in its worker thread: `edgerund run` never needs
them otherwise (start-up time and memory, README "Start-up"), and importing them there
keeps the event loop from paying for the import.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import sys
import time
from typing import Any

from edgerund import __version__
from edgerund.errors import CommandError

CHUNK_BYTES = 48 * 1024  # 64 KiB once base64-encoded in the reply
MAX_BYTES = 8 << 20
TTL_S = 600.0


def build(status: dict[str, Any], log: list[Any], config: dict[str, Any]) -> bytes:
    """The tar.gz bytes (blocking: compression, and the imports on first use)."""
    import tarfile

    from edgerund.toolkit.support_bundle import PRIVATE_PEM, redact

    members = {
        "status.json": json.dumps(status, indent=1, default=str).encode(),
        "log.json": json.dumps(log, default=str).encode(),
        "config.json": json.dumps(redact(config), indent=1, default=str).encode(),
        "versions.json": json.dumps(
            {"edgerund": __version__, "python": sys.version, "platform": platform.platform()}
        ).encode(),
    }
    for name, data in members.items():
        if PRIVATE_PEM.search(data):
            raise CommandError("secret_found", f"{name} holds a private key: bundle refused")
    buf = io.BytesIO()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"edgerund-support-{stamp}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            tf.addfile(info, io.BytesIO(data))
    out = buf.getvalue()
    if len(out) > MAX_BYTES:
        raise CommandError("too_large", f"bundle: expected <= {MAX_BYTES} bytes, got {len(out)}")
    return out


class BundleStore:
    """The newest bundle, served in chunks until it expires."""

    def __init__(self) -> None:
        self.bundle_id: str | None = None
        self.data = b""
        self.made = 0.0

    def put(self, data: bytes) -> dict[str, Any]:
        self.bundle_id = os.urandom(8).hex()
        self.data = data
        self.made = time.monotonic()
        return {
            "bundle_id": self.bundle_id,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "chunk_bytes": CHUNK_BYTES,
            "chunks": (len(data) + CHUNK_BYTES - 1) // CHUNK_BYTES,
        }

    def chunk(self, bundle_id: object, index: object) -> dict[str, Any]:
        if self.bundle_id is None or bundle_id != self.bundle_id:
            raise CommandError(
                "unknown_bundle", f"bundle_id: expected the newest bundle, got {bundle_id!r}"
            )
        if time.monotonic() - self.made > TTL_S:
            self.bundle_id, self.data = None, b""
            raise CommandError("unknown_bundle", "the bundle expired: request a new one")
        n = (len(self.data) + CHUNK_BYTES - 1) // CHUNK_BYTES
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
            raise CommandError("bad_args", f"chunk: expected 0..{n - 1}, got {index!r}")
        part = self.data[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
        return {"bundle_id": bundle_id, "chunk": index, "data": base64.b64encode(part).decode()}
