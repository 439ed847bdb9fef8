"""Pull one bundle from the broker into a resumable partial file (twin model targets).

Theory of operation (wire format: bundlewire.py, docs/twin.md §5.1). The file is written
through the updates component's `TransferStore` (transfer.py), under the transfer id
`{sha256}` in `<state_dir>/twin/bundles/`: the same caps (`bundle_max_mb`,
`mqtt_chunk_max_kb`), the same refusal of data running past the announced size, the same
SHA-256 check of the whole file at `commit`, and the same resumability: after a daemon
restart or a lost connection `begin` answers the offset already on disk.

On its own MQTT session the fetch subscribes to `meta` (retained; it waits for it if the
backend has not published yet), checks it against the SIGNED size and sha256, and then
subscribes to the chunk topics it still needs, at most `window` at a time, starting at
the chunk that holds the first missing byte. Retained messages arrive in any order across
topics, so chunks that come early wait in a buffer (at most `window` chunks); each chunk
is appended in order and its topic unsubscribed. So a resumed fetch moves only the
missing bytes over the network, which matters on a metered cellular link.

Nothing received is trusted: a chunk must have exactly the length meta implies (else
`bad_chunk`, the partial file dropped), and the whole file's hash decides at the end
(`hash_mismatch`, dropped). The caller hands the verified file to the update pipeline.
All file I/O runs in a worker thread, serialised by a lock (a cancelled fetch's last
write may still be running when the next one starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from edgerund.errors import TrustError
from edgerund.twin.bundlewire import BundleMeta, chunk_index, chunk_topic, meta_topic, parse_meta
from edgerund.twin.targets import MAX_TARGETS, Target
from edgerund.updates.transfer import TransferError, TransferStore

log = structlog.get_logger("edgerund.twin.fetch")

WINDOW = 4
ClientFactory = Callable[[], Awaitable[aiomqtt.Client]]


class BundleFetcher:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        chunk_max: int,
        ttl_s: float,
        client: ClientFactory,
        window: int = WINDOW,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.store = TransferStore(
            root,
            max_bytes=max_bytes,
            chunk_max=chunk_max,
            ttl_s=ttl_s,
            max_transfers=MAX_TARGETS + 1,
        )
        self.chunk_max = chunk_max
        self._client = client
        self.window = window
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._lock = threading.Lock()

    def _handle(self, hdr: dict[str, Any], data: bytes = b"") -> tuple[dict[str, Any], Path | None]:
        with self._lock:
            return self.store.handle(hdr, data, time.time())

    def _begin(self, t: Target, keep: frozenset[str]) -> int:
        """Start or resume; drops partial files of bundles no target names any more."""
        with self._lock:
            self.store.expire(time.time())
            for tid in [i for i in self.store.active if i != t.sha256 and i not in keep]:
                self.store.handle({"op": "abort", "id": tid}, b"", time.time())
            # A file committed before a restart but never handed over: fetched again.
            (self.store.root / f"{t.sha256}.bundle").unlink(missing_ok=True)
            reply, _ = self.store.handle(
                {"op": "begin", "id": t.sha256, "size": t.size, "sha256": t.sha256},
                b"",
                time.time(),
            )
        return int(reply["next_offset"])

    async def fetch(
        self,
        t: Target,
        *,
        progress: Callable[[int], None],
        keep: frozenset[str] = frozenset(),
    ) -> Path:
        """The complete file whose SHA-256 is `t.sha256`; TransferError or TrustError with a
        stable code when the transfer is refused. Runs until done (retrying the broker)."""
        offset = await asyncio.to_thread(self._begin, t, keep)
        log.info(
            "twin_bundle_fetching", model=t.name, version=t.version, sha256=t.sha256,
            size=t.size, resume_offset=offset,
        )  # fmt: skip
        progress(offset)
        backoff = self.backoff_initial_s
        while True:
            try:
                client = await self._client()
                async with client:
                    backoff = self.backoff_initial_s
                    return await self._session(client, t, progress)
            except aiomqtt.MqttError as exc:
                log.info("twin_bundle_fetch_disconnected", sha256=t.sha256, error=str(exc))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _session(
        self, client: aiomqtt.Client, t: Target, progress: Callable[[int], None]
    ) -> Path:
        await client.subscribe(meta_topic(t.sha256), qos=1)
        meta: BundleMeta | None = None
        offset = 0
        buffered: dict[int, bytes] = {}
        subscribed: set[int] = set()
        next_sub = 0

        async def fill_window() -> None:
            nonlocal next_sub
            assert meta is not None
            while next_sub < meta.chunks and len(subscribed) + len(buffered) < self.window:
                await client.subscribe(chunk_topic(t.sha256, next_sub), qos=1)
                subscribed.add(next_sub)
                next_sub += 1

        async for msg in client.messages:
            payload = msg.payload
            if not isinstance(payload, bytes | bytearray) or not payload:
                continue  # a cleared retained message: wait for the real one
            topic = str(msg.topic)
            if meta is None:
                if topic != meta_topic(t.sha256):
                    continue
                meta = parse_meta(
                    bytes(payload), sha256=t.sha256, size=t.size, chunk_max=self.chunk_max
                )
                # Begin again: idempotent, and refreshes a transfer that waited for meta
                # longer than the store's time-to-live.
                offset = await asyncio.to_thread(self._begin, t, frozenset({t.sha256}))
                progress(offset)
                if offset >= t.size:  # all on disk before a restart, not yet committed
                    return await self._commit(t)
                next_sub = offset // meta.chunk_bytes
                await fill_window()
                continue
            i = chunk_index(topic, t.sha256)
            if i is None or i not in subscribed:
                continue  # meta again, or a duplicate of a chunk already written
            if len(payload) != meta.chunk_len(i):
                await asyncio.to_thread(self._handle, {"op": "abort", "id": t.sha256})
                raise TrustError(
                    "bad_chunk",
                    f"chunk {i}: expected {meta.chunk_len(i)} bytes, got {len(payload)};"
                    " transfer dropped",
                )
            subscribed.discard(i)
            buffered[i] = bytes(payload)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(chunk_topic(t.sha256, i))
            while (j := offset // meta.chunk_bytes) in buffered:
                data = buffered.pop(j)[offset - j * meta.chunk_bytes :]
                reply, _ = await asyncio.to_thread(
                    self._handle, {"op": "chunk", "id": t.sha256, "offset": offset}, data
                )
                offset = int(reply["next_offset"])
                progress(offset)
            if offset >= t.size:
                return await self._commit(t)
            await fill_window()
        raise aiomqtt.MqttError("the session ended")

    async def _commit(self, t: Target) -> Path:
        _, done = await asyncio.to_thread(self._handle, {"op": "commit", "id": t.sha256})
        if done is None:  # pragma: no cover - commit always returns the file
            raise TransferError("io_error", "commit returned no file")
        log.info("twin_bundle_fetched", model=t.name, sha256=t.sha256, size=t.size)
        return done
