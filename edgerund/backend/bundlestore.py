"""Publish a model bundle on the broker for twin model targets (backend side).

The wire format is `edgerund/twin/bundlewire.py` (docs/twin.md §5.1): the bundle file in
RETAINED chunks under `bundles/v1/{sha256}/{i}` and, LAST, the retained
`bundles/v1/{sha256}/meta`. Meta goes last so that a gateway which sees it finds every
chunk already on the broker. Re-publishing the same file is harmless (same topics, same
bytes); `unpublish_bundle` clears the retained messages once no target names the bundle.

    meta = await publish_bundle(client, Path("motor-2.1.0.bundle"))      # aiomqtt client
    meta = publish_bundle_sync(Path("motor-2.1.0.bundle"), host="broker", port=1883)
    # then a desired document with
    #   "models": {"motor-ae": {"version": "2.1.0", "sha256": meta.sha256, "size": meta.size}}

Hashing and reading run in a worker thread (a bundle is up to `updates.bundle_max_mb`);
one chunk is in memory at a time. `chunk_bytes` must stay within the gateways'
`updates.mqtt_chunk_max_kb` (default 256 KiB) and the broker's message size limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import aiomqtt

from edgerund.twin.bundlewire import PREFIX, BundleMeta, chunk_topic, meta_topic

DEFAULT_CHUNK_BYTES = 128 * 1024


def bundle_meta(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BundleMeta:
    """Size and SHA-256 of a bundle file, chunked (blocking)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return BundleMeta.plan(size, h.hexdigest(), chunk_bytes)


def _read_chunk(path: Path, meta: BundleMeta, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * meta.chunk_bytes)
        data = f.read(meta.chunk_len(index))
    if len(data) != meta.chunk_len(index):
        raise OSError(f"{path}: changed while being published (chunk {index} short)")
    return data


async def publish_bundle(
    client: aiomqtt.Client,
    path: Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefix: str = PREFIX,
    qos: int = 1,
) -> BundleMeta:
    """Publish `path` retained in chunks, then its meta; returns the meta (size, sha256)."""
    meta = await asyncio.to_thread(bundle_meta, Path(path), chunk_bytes)
    for i in range(meta.chunks):
        data = await asyncio.to_thread(_read_chunk, Path(path), meta, i)
        await client.publish(chunk_topic(meta.sha256, i, prefix), data, qos=qos, retain=True)
    await client.publish(meta_topic(meta.sha256, prefix), meta.to_json(), qos=qos, retain=True)
    return meta


async def unpublish_bundle(
    client: aiomqtt.Client, meta: BundleMeta, *, prefix: str = PREFIX, qos: int = 1
) -> None:
    """Clear the retained messages of a published bundle (meta first: no gateway starts a
    fetch that can no longer finish)."""
    await client.publish(meta_topic(meta.sha256, prefix), b"", qos=qos, retain=True)
    for i in range(meta.chunks):
        await client.publish(chunk_topic(meta.sha256, i, prefix), b"", qos=qos, retain=True)


def _client(
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    tls: ssl.SSLContext | None,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        tls_context=tls,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


def publish_bundle_sync(
    path: Path,
    *,
    host: str = "localhost",
    port: int = 1883,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefix: str = PREFIX,
) -> BundleMeta:
    """`publish_bundle` on its own connection, for synchronous callers (CLI code).
    Must not be called from a running event loop (use `publish_bundle` there)."""

    async def run() -> BundleMeta:
        async with _client(host, port, username, password, tls) as c:
            return await publish_bundle(c, path, chunk_bytes=chunk_bytes, prefix=prefix)

    return asyncio.run(run())


def unpublish_bundle_sync(
    meta: BundleMeta,
    *,
    host: str = "localhost",
    port: int = 1883,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    prefix: str = PREFIX,
) -> None:
    async def run() -> None:
        async with _client(host, port, username, password, tls) as c:
            await unpublish_bundle(c, meta, prefix=prefix)

    asyncio.run(run())


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BundleMeta",
    "bundle_meta",
    "publish_bundle",
    "publish_bundle_sync",
    "unpublish_bundle",
    "unpublish_bundle_sync",
]
