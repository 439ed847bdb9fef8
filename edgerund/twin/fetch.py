"""Pull one bundle from the broker into a resumable partial file (twin model targets).

Theory of operation (wire format: bundlewire.py, docs/twin.md §5.1). The file is written
through the updates component's `TransferStore` (transfer.py), under the transfer id
`{sha256}` in `<state_dir>/twin/bundles/`: the same caps (`bundle_max_mb`,
`mqtt_chunk_max_kb`), the same refusal of data running past the announced size, the same
SHA-256 check of the whole file at `commit`, and the same resumability: after a daemon
restart or a lost connection `begin` answers the offset already on disk.

On its own MQTT session (`connect_properties`: a Maximum Packet Size just above the chunk
cap, so the broker never delivers a larger message) the fetch subscribes to `meta` (retained; it waits for it if the
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

A target with a `url` (http or https, inside the operator signature) is fetched from it
instead (`fetch_url`): the same store and checks, resumed with an HTTP Range request from
the bytes on disk (a server that ignores Range sends the whole file: it is restarted);
the blocking download runs in a worker thread that a cancelled fetch stops at its next
read. The hash decides here as well: the server is not trusted either.

TLS of the `url` source (`twin.fetch`, twin/config.py): one `ssl.SSLContext`, built in the
worker thread at the first https request and kept (rebuilt only when a file's mtime or
size changed: a renewed client certificate is picked up without a restart), trusting
`ca_file` instead of the system store when set and presenting `client_cert`/`client_key`
to a server that asks. A certificate the context does not trust is an error that says so
(and which trust store it was judged by); a handshake the server refuses (a missing client
certificate) likewise. Both are retried like any network error: the server may be fixed.

Fallback to the broker: after `url_failures_before_broker` consecutive failed attempts
(errors, not downloads cut short that moved bytes) the fetch asks the broker whether the
bundle is published there (`published`: its retained `meta`, within PROBE_S); if it is,
the MQTT source takes over and resumes the same partial file (both sources write the
transfer `{sha256}`), else the url is tried again and the broker asked again after as many
failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from edgerund.errors import TrustError
from edgerund.twin.bundlewire import BundleMeta, chunk_index, chunk_topic, meta_topic, parse_meta
from edgerund.twin.config import FetchTlsError, TwinFetchConfig, ssl_context
from edgerund.twin.targets import MAX_TARGETS, Target
from edgerund.updates.transfer import TransferError, TransferStore

if TYPE_CHECKING:
    # aiomqtt and paho (with urllib, http.client, email) load with the first session, in a
    # thread before READY (twin/component.py): never at import time.
    import ssl

    import aiomqtt
    from paho.mqtt.properties import Properties

log = structlog.get_logger("edgerund.twin.fetch")

WINDOW = 4
ClientFactory = Callable[[], Awaitable["aiomqtt.Client"]]
PACKET_OVERHEAD = 4096  # fixed header, topic, properties of one chunk message
HTTP_TIMEOUT_S = 15.0  # connect, and each read (also how long a cancelled read may linger)
PROBE_S = 10.0  # how long the broker gets to deliver a bundle's retained meta (fallback)
_RANGE_RE = re.compile(r"^bytes (\d+)-\d+/(?:\d+|\*)$")


def _range_start(value: str) -> int | None:
    m = _RANGE_RE.match(value.strip())
    return int(m.group(1)) if m else None


def _stamp(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def connect_properties(chunk_max: int) -> Properties:
    """CONNECT properties of the fetch session: MQTT 5 Maximum Packet Size, so the broker
    drops (for this session) any message larger than a chunk may be; an oversized
    retained "chunk" published by someone else never reaches the daemon's memory, and the
    fetch waits for the genuine one."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.MaximumPacketSize = chunk_max + PACKET_OVERHEAD
    return props


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
        tls: TwinFetchConfig | None = None,
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
        self.tls = tls if tls is not None else TwinFetchConfig()
        self._ssl: ssl.SSLContext | None = None
        self._ssl_stamp: tuple[tuple[int, int] | None, ...] = ()
        self._ssl_lock = threading.Lock()
        self.probe_s = PROBE_S

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
        import aiomqtt  # loaded by the twin before READY (see TYPE_CHECKING)

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

    # -- the HTTP(S) source (a target's optional `url`) --------------------------------------
    async def fetch_url(
        self,
        t: Target,
        *,
        progress: Callable[[int], None],
        keep: frozenset[str] = frozenset(),
        failed: Callable[[str], None] | None = None,
    ) -> Path:
        """As `fetch`, from `t.url` (signed with the target): resumed with a Range request
        from the bytes on disk; a server that ignores Range restarts the file. Retries
        network, TLS and HTTP errors (capped backoff; each one also goes to `failed`)
        until done, handing over to the broker when the bundle is published there (module
        docstring); TransferError when the bytes run past the signed size or do not hash
        to it."""
        assert t.url is not None
        offset = await asyncio.to_thread(self._begin, t, keep)
        log.info(
            "twin_bundle_fetching", model=t.name, version=t.version, sha256=t.sha256,
            size=t.size, resume_offset=offset, source="url",
        )  # fmt: skip
        progress(offset)
        loop = asyncio.get_running_loop()
        moved = [offset]

        def report(n: int) -> None:
            moved[0] = n
            loop.call_soon_threadsafe(progress, n)

        backoff = self.backoff_initial_s
        failures = 0
        fallback_after = self.tls.url_failures_before_broker
        while True:
            stop = threading.Event()
            before = moved[0]
            try:
                done = await asyncio.to_thread(self._http_session, t, stop, report)
            except asyncio.CancelledError:
                stop.set()  # the worker thread ends at its next read
                raise
            except OSError as exc:  # URLError is one; HTTPException becomes one (below)
                error = str(exc)[:300]
                failures = 0 if moved[0] > before else failures + 1
                log.info("twin_bundle_url_failed", sha256=t.sha256, error=error, failures=failures)
                if failed is not None:
                    failed(error)
                done = None
            if done is not None:
                log.info("twin_bundle_fetched", model=t.name, sha256=t.sha256, size=t.size)
                return done
            if fallback_after and failures >= fallback_after:
                failures = 0
                if await self.published(t):
                    log.warning(
                        "twin_bundle_url_fallback", model=t.name, sha256=t.sha256,
                        resume_offset=moved[0], action="fetching from the broker",
                    )  # fmt: skip
                    return await self.fetch(t, progress=progress, keep=keep)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    async def published(self, t: Target) -> bool:
        """Whether the broker holds a valid retained `meta` for `t` (within `probe_s`)."""
        import aiomqtt  # loaded by the twin before READY (see TYPE_CHECKING)

        topic = meta_topic(t.sha256)
        try:
            async with asyncio.timeout(self.probe_s):
                client = await self._client()
                async with client:
                    await client.subscribe(topic, qos=1)
                    async for msg in client.messages:
                        payload = msg.payload
                        if str(msg.topic) != topic or not isinstance(payload, bytes | bytearray):
                            continue
                        if payload:
                            parse_meta(
                                bytes(payload), sha256=t.sha256, size=t.size,
                                chunk_max=self.chunk_max,
                            )  # fmt: skip
                            return True
        except (TimeoutError, aiomqtt.MqttError, TrustError) as exc:
            why = "not published" if isinstance(exc, TimeoutError) else str(exc)[:300]
            log.info("twin_bundle_not_on_broker", sha256=t.sha256, why=why)
        return False

    def _ssl_context(self) -> ssl.SSLContext:
        """Built once (in the worker thread: it reads files) and again only when one of
        the files changed (a renewed client certificate needs no restart); OSError when it
        cannot be built."""
        stamp = tuple(
            _stamp(p) for p in (self.tls.ca_file, self.tls.client_cert, self.tls.client_key)
        )
        with self._ssl_lock:
            if self._ssl is None or stamp != self._ssl_stamp:
                try:
                    self._ssl = ssl_context(self.tls)
                except FetchTlsError as exc:
                    raise OSError(f"twin.fetch.{exc.key}: {exc}") from None
                self._ssl_stamp = stamp
            return self._ssl

    def _trust_store(self) -> str:
        if self.tls.ca_file is not None:
            return f"twin.fetch.ca_file {self.tls.ca_file}"
        return "the system CA store (twin.fetch.ca_file: a private CA)"

    def _http_session(
        self, t: Target, stop: threading.Event, report: Callable[[int], None]
    ) -> Path | None:
        """One request (blocking, in a worker thread): the complete file, or None to retry;
        OSError (a protocol or TLS error included) when the server or the network failed."""
        import http.client  # with urllib.request: only for a `url` target, in this thread
        import ssl
        import urllib.error

        try:
            return self._http_request(t, stop, report)
        except http.client.HTTPException as exc:
            raise OSError(f"HTTP: {type(exc).__name__}: {exc}") from exc
        except (urllib.error.URLError, ssl.SSLError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise OSError(
                    f"TLS: the server's certificate is not trusted by {self._trust_store()}:"
                    f" {reason.verify_message or reason}"
                ) from exc
            if isinstance(reason, ssl.SSLError):
                client = (
                    f"twin.fetch.client_cert {self.tls.client_cert} was presented"
                    if self.tls.client_cert is not None
                    else "no client certificate is configured (twin.fetch.client_cert)"
                )
                raise OSError(
                    f"TLS: the handshake failed ({reason.reason or reason}); {client}"
                ) from exc
            raise

    def _http_request(
        self, t: Target, stop: threading.Event, report: Callable[[int], None]
    ) -> Path | None:
        import urllib.request

        assert t.url is not None
        offset = self._begin(t, frozenset({t.sha256}))
        if offset < t.size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            req = urllib.request.Request(t.url, headers=headers)
            ctx = self._ssl_context() if t.url.startswith("https://") else None
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S, context=ctx) as resp:
                if offset and resp.status == 200:  # Range ignored: the whole file comes
                    self._handle({"op": "abort", "id": t.sha256})
                    offset = self._begin(t, frozenset({t.sha256}))
                elif resp.status == 206:
                    got = _range_start(resp.headers.get("Content-Range", ""))
                    if got != offset:
                        raise TransferError(
                            "bad_range",
                            f"Content-Range: expected to start at {offset}, got {got}",
                        )
                elif resp.status != 200:
                    return None
                report(offset)
                while not stop.is_set():
                    data = resp.read(self.chunk_max)
                    if not data:
                        break
                    reply, _ = self._handle({"op": "chunk", "id": t.sha256, "offset": offset}, data)
                    offset = int(reply["next_offset"])
                    report(offset)
        if stop.is_set() or offset < t.size:
            return None  # cancelled, or the connection ended early: resume with Range
        _, done = self._handle({"op": "commit", "id": t.sha256})
        return done

    async def _session(
        self, client: aiomqtt.Client, t: Target, progress: Callable[[int], None]
    ) -> Path:
        import aiomqtt

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
