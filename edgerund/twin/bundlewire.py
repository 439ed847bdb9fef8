"""Model bundles published on the broker for twin model targets: the wire format (pure).

A backend that sets a model target in a desired document (docs/twin.md §5) makes the bundle
file available on the broker, RETAINED, in chunks:

    bundles/v1/{sha256}/meta   JSON {"size": N, "chunk_bytes": C, "chunks": K, "sha256": HEX}
    bundles/v1/{sha256}/{i}    the raw bytes [i*C, min((i+1)*C, N)) of the file, i = 0..K-1

`sha256` is the lowercase hex SHA-256 of the whole bundle file, the same value the
operator-signed desired document names, so the topic is content-addressed: one bundle is
published once for every gateway of the fleet, and a gateway can never be fed another
file under that name without failing the hash at the end. The retained messages are what
makes the transfer a pull: a gateway that connects hours later, or resumes after a restart,
subscribes and the broker hands it the chunks it asks for.

Nothing on these topics is trusted: `meta` only has to agree with the signed target (size
and sha256) and with the gateway's caps, a chunk only has to have the length `meta`
implies; the whole file's SHA-256 is checked before the update pipeline sees it, and the
pipeline then checks the publisher signature as for any other source. This module is the
single definition both sides use (the backend's `edgerund/backend/bundlestore.py`
publishes with it, the daemon's `edgerund/twin/fetch.py` parses with it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgerund.errors import TrustError
from edgerund.updates.jsonguard import check_depth

PREFIX = "bundles/v1"
META_MAX_BYTES = 1024
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA_RE.match(value))


def meta_topic(sha256: str, prefix: str = PREFIX) -> str:
    return f"{prefix}/{sha256}/meta"


def chunk_topic(sha256: str, index: int, prefix: str = PREFIX) -> str:
    return f"{prefix}/{sha256}/{index}"


def filter_topic(sha256: str, prefix: str = PREFIX) -> str:
    """Every topic of one bundle (what a backend clears, what a viewer watches)."""
    return f"{prefix}/{sha256}/#"


def chunk_index(topic: str, sha256: str, prefix: str = PREFIX) -> int | None:
    """The chunk number of a chunk topic of this bundle, else None (meta, other bundles)."""
    base = f"{prefix}/{sha256}/"
    if not topic.startswith(base):
        return None
    tail = topic[len(base) :]
    if not tail.isdigit() or len(tail) > 9 or (len(tail) > 1 and tail[0] == "0"):
        return None
    return int(tail)


@dataclass(frozen=True, slots=True)
class BundleMeta:
    size: int
    chunk_bytes: int
    chunks: int
    sha256: str

    @classmethod
    def plan(cls, size: int, sha256: str, chunk_bytes: int) -> BundleMeta:
        if size <= 0 or chunk_bytes <= 0:
            raise ValueError(f"size and chunk_bytes must be > 0, got {size}, {chunk_bytes}")
        return cls(size, chunk_bytes, -(-size // chunk_bytes), sha256)

    def chunk_len(self, index: int) -> int:
        """The length chunk `index` must have."""
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "size": self.size,
                "chunk_bytes": self.chunk_bytes,
                "chunks": self.chunks,
                "sha256": self.sha256,
            },
            separators=(",", ":"),
        ).encode()


def parse_meta(data: bytes, *, sha256: str, size: int, chunk_max: int) -> BundleMeta:
    """Check a `meta` message (unauthenticated) against the signed target and the caps.
    TrustError("bad_meta", ...) when it disagrees."""
    if len(data) > META_MAX_BYTES:
        raise TrustError("bad_meta", f"meta: expected <= {META_MAX_BYTES} bytes, got {len(data)}")
    check_depth(data, "meta", "bad_meta", max_depth=2)
    try:
        raw = json.loads(data)
    except ValueError:
        raise TrustError("bad_meta", "meta: expected a JSON object") from None
    if not isinstance(raw, dict):
        raise TrustError("bad_meta", "meta: expected a JSON object")
    fields: dict[str, int] = {}
    for k in ("size", "chunk_bytes", "chunks"):
        v = raw.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise TrustError("bad_meta", f"meta.{k}: expected a positive integer, got {v!r}")
        fields[k] = v
    if raw.get("sha256") != sha256:
        raise TrustError("bad_meta", f"meta.sha256: expected {sha256}, got {raw.get('sha256')!r}")
    if fields["size"] != size:
        raise TrustError(
            "bad_meta", f"meta.size: expected {size} (the signed target), got {fields['size']}"
        )
    meta = BundleMeta.plan(size, sha256, fields["chunk_bytes"])
    if meta.chunks != fields["chunks"]:
        raise TrustError(
            "bad_meta", f"meta.chunks: expected {meta.chunks} for that size, got {fields['chunks']}"
        )
    if meta.chunk_bytes > chunk_max:
        raise TrustError(
            "chunk_too_large",
            f"meta.chunk_bytes: expected at most {chunk_max} bytes, got {meta.chunk_bytes}",
        )
    return meta
