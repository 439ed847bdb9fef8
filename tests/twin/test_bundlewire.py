"""The bundle-on-the-broker wire format (twin model targets): meta parsing against the signed
target and the caps, and the backend's publisher against a real mosquitto (every chunk and
the meta retained, the file reassembled byte for byte, cleared again)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgerund.backend.bundlestore import publish_bundle, publish_bundle_sync, unpublish_bundle
from edgerund.errors import TrustError
from edgerund.twin.bundlewire import BundleMeta, chunk_index, parse_meta

SHA = "ab" * 32


def _meta(**kw: Any) -> bytes:
    d: dict[str, Any] = {"size": 1000, "chunk_bytes": 300, "chunks": 4, "sha256": SHA}
    d.update(kw)
    return json.dumps(d).encode()


def test_parse_meta_checks_target_and_caps() -> None:
    m = parse_meta(_meta(), sha256=SHA, size=1000, chunk_max=300)
    assert (m.chunks, m.chunk_len(0), m.chunk_len(3)) == (4, 300, 100)
    cases = [
        (_meta(size=999), "bad_meta"),  # disagrees with the signed size
        (_meta(sha256="cd" * 32), "bad_meta"),
        (_meta(chunks=5), "bad_meta"),  # inconsistent with size / chunk_bytes
        (_meta(chunk_bytes=0), "bad_meta"),
        (_meta(chunk_bytes=True), "bad_meta"),
        (_meta(chunk_bytes=500, chunks=2), "chunk_too_large"),
        (b"[" * 50 + b"]" * 50, "bad_meta"),
        (b"not json", "bad_meta"),
        (b" " * 2000, "bad_meta"),
    ]
    for data, code in cases:
        with pytest.raises(TrustError) as ei:
            parse_meta(data, sha256=SHA, size=1000, chunk_max=300)
        assert ei.value.code == code, data[:60]


def test_chunk_index() -> None:
    assert chunk_index(f"bundles/v1/{SHA}/7", SHA) == 7
    assert chunk_index(f"bundles/v1/{SHA}/meta", SHA) is None
    assert chunk_index(f"bundles/v1/{SHA}/07", SHA) is None
    assert chunk_index(f"bundles/v1/{'cd' * 32}/1", SHA) is None


async def _retained(broker: Any, sha: str, want: int) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"bundles/v1/{sha}/#", qos=1)
        with pytest.raises(TimeoutError) if want == 0 else _nullctx():
            async with asyncio.timeout(3.0 if want == 0 else 20.0):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    got[str(msg.topic)] = msg.payload
                    if len(got) == want:
                        break
    return got


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_publish_bundle_retained_and_cleared(tmp_path: Path, mosquitto: Any) -> None:
    blob = os.urandom(10_000)
    path = tmp_path / "b.bundle"
    path.write_bytes(blob)
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as c:
        meta = await publish_bundle(c, path, chunk_bytes=4096)
    assert meta == BundleMeta(10_000, 4096, 3, hashlib.sha256(blob).hexdigest())
    got = await _retained(mosquitto, meta.sha256, 4)
    assert (
        parse_meta(
            got[f"bundles/v1/{meta.sha256}/meta"], sha256=meta.sha256, size=10_000, chunk_max=4096
        )
        == meta
    )
    assert b"".join(got[f"bundles/v1/{meta.sha256}/{i}"] for i in range(3)) == blob
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as c:
        await unpublish_bundle(c, meta)
    assert await _retained(mosquitto, meta.sha256, 0) == {}
    # the synchronous wrapper (CLI code), from a worker thread as a sync caller would
    again = await asyncio.to_thread(
        publish_bundle_sync, path, host=mosquitto.host, port=mosquitto.port, chunk_bytes=8192
    )
    assert again.chunks == 2 and again.sha256 == meta.sha256
    assert len(await _retained(mosquitto, meta.sha256, 3)) == 3
