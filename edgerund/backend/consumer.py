"""The reference consumer: what a backend does with `tlm/v1/...` messages.

`Consumer` is pure (topic + payload in, JSON-able records out): it keeps the retained
`meta` of every gateway (by schema version), decodes batches, verifies the signature
trailer against the configured public keys (by 4-byte key id), de-duplicates on
(gateway, spool epoch, batch seq) and tracks which sequences are still missing. A loss
record names the sequences the gateway dropped on purpose, so those are not gaps.

`run` is the MQTT side: batches come through shared subscriptions
(`$share/GROUP/tlm/v1/+/+/evt` ...), so consumers of one group split the load on a broker
cluster; `meta` and `state` through ordinary subscriptions (brokers do not send retained
messages to shared subscriptions). With the SQLite sink the dedup set is the `batches`
table itself, so a restarted consumer (or several sharing one database) still drops
duplicates.

With a transactional `store` (the PostgreSQL sink, edgerund/backend/pgsink.py) the
consumer acknowledges messages manually, and only after the transaction holding them has
committed: a consumer killed at any point leaves the broker holding every message whose
rows are not durably in the database, and its persistent session gets them again on
reconnect (a shared subscription queues for an absent member's session). Messages are
decoded and written in groups (whatever arrived while the previous group was being
committed, up to `group_max`), off the event loop.

One cohesive thing (the reference consumer: its pure `handle` and the MQTT session that
feeds it, sharing the dedup and gap state), hence one module of ~580 lines.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import random
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Protocol

from edgerund.backend import twin as twin_requests
from edgerund.telemetry import codec

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class RangeSet:
    """Disjoint, sorted, inclusive integer ranges: sequences seen or declared lost.

    Memory and time grow with the number of runs, not with the span, so a hostile pair of
    sequences 1 and 2**50 costs two ranges, not a walk over 2**50 numbers.
    """

    __slots__ = ("_hi", "_lo")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, int):
            return False
        i = bisect.bisect_right(self._lo, x) - 1
        return i >= 0 and x <= self._hi[i]

    def __bool__(self) -> bool:
        return bool(self._lo)

    def add(self, x: int) -> None:
        self.add_range(x, x)

    def add_range(self, lo: int, hi: int) -> None:
        i = bisect.bisect_left(self._hi, lo - 1)  # first range that may touch [lo, hi]
        j = i
        while j < len(self._lo) and self._lo[j] <= hi + 1:
            lo, hi = min(lo, self._lo[j]), max(hi, self._hi[j])
            j += 1
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi, strict=True))


@dataclass
class SeqTracker:
    seen: RangeSet = field(default_factory=RangeSet)
    lost: RangeSet = field(default_factory=RangeSet)

    def missing(self) -> list[tuple[int, int]]:
        """The gaps between the lowest and the highest sequence seen or lost."""
        if not self.seen:
            return []
        covered = RangeSet()
        for lo, hi in (*self.seen.ranges(), *self.lost.ranges()):
            covered.add_range(lo, hi)
        runs = covered.ranges()
        return [(a_hi + 1, b_lo - 1) for (_, a_hi), (b_lo, _) in itertools.pairwise(runs)]


def _parse_meta(obj: Any) -> tuple[int, dict[int, dict[str, Any]]]:
    """A meta document's schema version and series by id; DecodeError when malformed."""
    if not isinstance(obj, dict):
        raise codec.DecodeError("meta: expected a JSON object")
    ver = obj.get("schema_ver")
    if not isinstance(ver, int) or isinstance(ver, bool) or not 0 <= ver < 1 << 32:
        raise codec.DecodeError("meta: `schema_ver` must be an integer 0..2**32-1")
    series = obj.get("series", [])
    if not isinstance(series, list):
        raise codec.DecodeError("meta: `series` must be a list")
    out: dict[int, dict[str, Any]] = {}
    for i, s in enumerate(series):
        sid = s.get("id") if isinstance(s, dict) else None
        if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < 1 << 32:
            raise codec.DecodeError(f"meta: series[{i}] has no integer `id`")
        for key in ("name", "unit"):
            if key in s and not isinstance(s[key], str | None):
                raise codec.DecodeError(f"meta: series[{i}].{key} must be a string")
        ch = s.get("channels")
        if ch is not None and not (isinstance(ch, list) and all(isinstance(c, str) for c in ch)):
            raise codec.DecodeError(f"meta: series[{i}].channels must be a list of strings")
        out[sid] = s
    return ver, out


class Consumer:
    """Pure: (topic, payload) in, JSON-able records out. `handle` never raises on input:
    everything it cannot accept becomes one record `{"type": "invalid", "error": ...}`
    (codec.DecodeError is the one error type of every decoding failure)."""

    def __init__(
        self,
        *,
        public_keys: Iterable[Any] = (),
        require_signature: bool = False,
        prefix: str = "tlm/v1",
        dedup: bool = True,
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        self.keys: dict[bytes, Any] = {}
        for k in public_keys:
            spki = k.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.keys[codec.key_id_for(spki)] = k
        self.require_signature = require_signature
        # False when a database is the dedup and gap authority (PostgresSink): a batch must
        # reach it again after a failed commit, so memory must not call the redelivery a
        # duplicate; and a member of a group sees every other sequence, so its own ranges
        # would only fragment (memory growing with the stream) without telling anything.
        self.dedup = dedup
        self.prefix = prefix.split("/")
        self.metas: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.trackers: dict[tuple[str, int], SeqTracker] = {}
        self.sites: dict[str, str] = {}  # gateway -> site, from the topics seen
        self.counts = {"batches": 0, "duplicates": 0, "invalid": 0, "unverified": 0}

    @staticmethod
    def load_public_key(pem: bytes) -> Any:
        from cryptography.hazmat.primitives import serialization

        return serialization.load_pem_public_key(pem)

    def is_seen(self, gateway: str, epoch: int, seq: int) -> bool:
        t = self.trackers.get((gateway, epoch))
        return t is not None and seq in t.seen

    def mark_seen(self, gateway: str, epoch: int, seq: int) -> None:
        self.trackers.setdefault((gateway, epoch), SeqTracker()).seen.add(seq)

    def _verified(self, sig: codec.Signature | None, verify: Any) -> bool | None:
        """True/False when a configured key could check `sig`, None when none could."""
        if sig is None or not self.keys:
            return None
        key = self.keys.get(sig.key_id)
        return key is not None and bool(verify(key))

    def _refusal(self, verified: bool | None, signed: bool) -> str | None:
        if verified is False:
            return "signature does not verify with the given key(s)"
        if self.require_signature and verified is None:
            return "unsigned" if not signed else "signed by an unknown key"
        return None

    def handle(
        self, topic: str, payload: bytes, received: float | None = None
    ) -> list[dict[str, Any]]:
        parts = topic.split("/")
        n = len(self.prefix)
        if parts[:n] != self.prefix or len(parts) < n + 3:
            return [
                {
                    "type": "invalid",
                    "topic": topic,
                    "error": "topic is not tlm/v1/{site}/{gateway}/...",
                }
            ]
        site, gw, kind = parts[n], parts[n + 1], parts[n + 2]
        rec_base = {"site": site, "gateway": gw, "topic": topic}
        try:
            out = self._handle(site, gw, kind, payload, rec_base, received)
        except codec.DecodeError as exc:
            self.counts["invalid"] += 1
            return [dict(rec_base, type="invalid", error=str(exc))]
        self.sites[gw] = site
        return out

    def _handle(
        self,
        site: str,
        gw: str,
        kind: str,
        payload: bytes,
        rec_base: dict[str, Any],
        received: float | None,
    ) -> list[dict[str, Any]]:
        if kind in ("meta", "state"):
            obj = codec.loads_bounded(payload, kind) if payload else {}
            if kind == "state":
                if not isinstance(obj, dict):
                    raise codec.DecodeError("state: expected a JSON object")
                self.states[gw] = obj
                return [dict(rec_base, type=kind, value=obj)]
            if not obj:  # an empty retained message clears the topic
                return [dict(rec_base, type=kind, value=obj)]
            ver, series = _parse_meta(obj)
            sig = codec.meta_signature(obj)
            verified = self._verified(sig, lambda k: codec.verify_meta(obj, k))
            why = self._refusal(verified, sig is not None)
            if why is not None:
                raise codec.DecodeError(f"meta: {why}")
            self.metas[(gw, ver)] = series
            return [dict(rec_base, type=kind, value=obj, verified=verified)]
        if kind not in ("evt", "agg", "raw"):
            return [dict(rec_base, type="ignored")]
        # Authenticate before decompressing or parsing anything of the body.
        framed = codec.unframe(payload)
        verified = self._verified(
            framed.signature,
            lambda k: codec.verify_signature(framed.signature, framed.signed_bytes, k),
        )
        why = self._refusal(verified, framed.signature is not None)
        if why is not None:
            raise codec.DecodeError(f"batch {framed.epoch}/{framed.seq}: {why}")
        if verified is None:  # counted per processed batch, duplicates included
            self.counts["unverified"] += 1
        if self.dedup and self.is_seen(gw, framed.epoch, framed.seq):
            self.counts["duplicates"] += 1
            return [dict(rec_base, type="duplicate", epoch=framed.epoch, seq=framed.seq)]
        dec = codec.decode_framed(framed)
        b = dec.batch
        self.counts["batches"] += 1
        if self.dedup:
            self.mark_seen(gw, b.epoch, b.seq)
            tracker = self.trackers[(gw, b.epoch)]
            for blk in b.blocks:
                if isinstance(blk, codec.LossBlock):
                    for s in blk.seqs:
                        tracker.lost.add(s)
        meta = self.metas.get((gw, b.schema_ver))
        out = codec.to_json(dec, meta)
        for r in out:
            r.update(
                rec_base,
                verified=verified,
                received=received if received is not None else time.time(),
            )
        return out

    def gaps(self) -> list[dict[str, Any]]:
        out = []
        for (gw, epoch), t in sorted(self.trackers.items()):
            for lo, hi in t.missing():
                out.append(
                    {"type": "gap", "gateway": gw, "epoch": epoch, "from_seq": lo, "to_seq": hi}
                )
        return out


class JsonLinesSink:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.stream.write(json.dumps(r, separators=(",", ":")) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class SqliteSink:
    """Durable sink: one row per accepted batch (the dedup key), samples upserted by
    (gateway, series, channel, t_ms), events and loss records as rows."""

    def __init__(self, path: str, consumer: Consumer) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript("""
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS batches (gateway TEXT, epoch INTEGER, seq INTEGER, cls TEXT, site TEXT,
                received REAL, verified INTEGER, PRIMARY KEY (gateway, epoch, seq));
            CREATE TABLE IF NOT EXISTS samples (gateway TEXT, series TEXT, channel TEXT, t_ms INTEGER, value REAL,
                PRIMARY KEY (gateway, series, channel, t_ms));
            CREATE TABLE IF NOT EXISTS events (gateway TEXT, epoch INTEGER, seq INTEGER, t_ms INTEGER, kind TEXT,
                source TEXT, fields TEXT);
            CREATE TABLE IF NOT EXISTS losses (gateway TEXT, epoch INTEGER, seq INTEGER, reason TEXT, cls TEXT,
                t_first_ms INTEGER, t_last_ms INTEGER, n_samples INTEGER, seqs TEXT, series TEXT);
        """)
        for gw, epoch, seq in self.db.execute("SELECT gateway, epoch, seq FROM batches"):
            consumer.mark_seen(gw, epoch, seq)

    def write(self, records: list[dict[str, Any]]) -> None:
        with self.db:
            done: set[tuple[str, int, int]] = set()
            for r in records:
                t = r.get("type")
                if t in ("series", "event", "loss", "empty"):
                    key = (r["gateway"], r["epoch"], r["seq"])
                    if key not in done:
                        done.add(key)
                        self.db.execute(
                            "INSERT OR IGNORE INTO batches VALUES (?,?,?,?,?,?,?)",
                            (
                                *key,
                                r["cls"],
                                r["site"],
                                r["received"],
                                None if r["verified"] is None else int(r["verified"]),
                            ),
                        )
                if t == "series":
                    name = r.get("name") or f"#{r['series_id']}"
                    for ch, vals in r["values"].items():
                        self.db.executemany(
                            "INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?)",
                            [
                                (r["gateway"], name, ch, tm, v)
                                for tm, v in zip(r["t_ms"], vals, strict=True)
                            ],
                        )
                elif t == "event":
                    self.db.execute(
                        "INSERT INTO events VALUES (?,?,?,?,?,?,?)",
                        (
                            r["gateway"],
                            r["epoch"],
                            r["seq"],
                            r["t_ms"],
                            r["kind"],
                            r["source"],
                            json.dumps(r["fields"]),
                        ),
                    )
                elif t == "loss":
                    self.db.execute(
                        "INSERT INTO losses VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            r["gateway"],
                            r["epoch"],
                            r["seq"],
                            r["reason"],
                            r["loss_cls"],
                            r["t_first_ms"],
                            r["t_last_ms"],
                            r["n_samples"],
                            json.dumps(r["seqs"]),
                            json.dumps(r["series_ids"]),
                        ),
                    )

    def close(self) -> None:
        self.db.close()


Sink = JsonLinesSink | SqliteSink


class WriteResult(Protocol):
    new_batches: int
    duplicates: int
    rejected: int


class Store(Protocol):
    """A transactional sink: `write_many` commits all it is given or raises."""

    def write_many(self, messages: list[list[dict[str, Any]]]) -> WriteResult: ...

    def refresh_gaps(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


async def run(
    consumer: Consumer,
    sink: Sink,
    *,
    host: str,
    port: int,
    group: str | None = "edgerund",
    prefix: str = "tlm/v1",
    client_id: str | None = None,
    session_expiry_s: int = 3600,
    tls: tuple[str, str | None, str | None] | None = None,
    stop: asyncio.Event | None = None,
    max_batches: int | None = None,
    gap_report_s: float | None = None,
    ready: asyncio.Event | None = None,
    resend_after_s: float | None = None,
    store: Store | None = None,
    group_max: int = 200,
    command_key: Ed25519PrivateKey | None = None,
) -> None:
    """Consume until `stop` is set or `max_batches` new batches arrived; reconnects.

    With `resend_after_s`, a gap still open after that long is requested from its gateway
    with `cmd/resend` (again every 30 s while it stays open): the repair path for batches
    the broker did not queue for us (e.g. a shared subscription lost in a broker restart).
    A gateway runs `resend` only when an operator signed it (docs/twin.md): give the
    operator's `command_key`, or the requests are refused (an unsigned request is sent only
    to gateways that do not gate their commands).

    With `store`, batches, meta and state go to it (acknowledged after its commit), gaps
    come from it, and `sink` gets only the consumer's own reports (resend requests).
    """
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions

    stop = stop or asyncio.Event()
    share = f"$share/{group}/" if group else ""
    topics = [f"{share}{prefix}/+/+/{k}" for k in ("evt", "agg", "raw")]
    topics += [f"{prefix}/+/+/meta", f"{prefix}/+/+/meta/+", f"{prefix}/+/+/state"]
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    tls_params = (
        aiomqtt.TLSParameters(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2]) if tls else None
    )
    start_batches = consumer.counts["batches"]
    backoff = 0.5
    last_gap = time.monotonic()
    gap_seen: dict[tuple[str, int, int, int], float] = {}
    gap_asked: dict[tuple[str, int, int, int], float] = {}

    store_gaps: list[dict[str, Any]] = []

    async def ask_resends(client: Any) -> None:
        now = time.monotonic()
        current = set()
        for g in store_gaps if store is not None else consumer.gaps():
            key = (g["gateway"], g["epoch"], g["from_seq"], g["to_seq"])
            current.add(key)
            first = gap_seen.setdefault(key, now)
            site = consumer.sites.get(g["gateway"])
            if site is None or resend_after_s is None or now - first < resend_after_s:
                continue
            if now - gap_asked.get(key, -1e9) < 30.0:
                continue
            gap_asked[key] = now
            body = {"epoch": key[1], "from_seq": key[2], "to_seq": key[3]}
            request = (
                json.dumps(body).encode()
                if command_key is None
                else twin_requests.command("resend", key[0], body, command_key)
            )
            await client.publish(f"{prefix}/{site}/{key[0]}/cmd/resend", request, qos=1)
            sink.write([{"type": "resend_requested", "gateway": key[0], **body}])
        for k in list(gap_seen):
            if k not in current:
                del gap_seen[k]

    async def read(client: Any) -> None:
        nonlocal last_gap
        async for msg in client.messages:
            payload = msg.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload or "").encode()
            sink.write(consumer.handle(str(msg.topic), bytes(payload)))
            if (
                max_batches is not None
                and consumer.counts["batches"] - start_batches >= max_batches
            ):
                stop.set()
            if gap_report_s is not None and time.monotonic() - last_gap >= gap_report_s:
                last_gap = time.monotonic()
                sink.write(consumer.gaps())
            if stop.is_set():
                return

    def decode_and_commit(msgs: list[Any]) -> None:
        assert store is not None
        recs = []
        for m in msgs:
            payload = m.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload or "").encode()
            recs.append(consumer.handle(str(m.topic), bytes(payload)))
        res = store.write_many(recs)
        # The consumer counted every decoded batch; the database knows which were new, and
        # which it refused (set aside in the database, acknowledged, not retried).
        consumer.counts["batches"] -= res.duplicates + res.rejected
        consumer.counts["duplicates"] += res.duplicates
        consumer.counts["invalid"] += res.rejected

    async def read_into_store(client: Any) -> None:
        nonlocal last_gap, store_gaps
        assert store is not None
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            async for msg in client.messages:
                queue.put_nowait(msg)

        pumper = asyncio.create_task(pump())
        try:
            while not stop.is_set():
                if pumper.done():
                    pumper.result()  # the connection ended: raise its error
                    return
                msgs = []
                with contextlib.suppress(TimeoutError):
                    msgs.append(await asyncio.wait_for(queue.get(), 0.5))
                while msgs and len(msgs) < group_max and not queue.empty():
                    msgs.append(queue.get_nowait())
                if msgs:
                    await asyncio.to_thread(decode_and_commit, msgs)
                    for m in msgs:  # in order of receipt, as MQTT requires
                        if m.qos > 0:
                            client._client.ack(m.mid, m.qos)
                if (
                    max_batches is not None
                    and consumer.counts["batches"] - start_batches >= max_batches
                ):
                    stop.set()
                if gap_report_s is not None and time.monotonic() - last_gap >= gap_report_s:
                    last_gap = time.monotonic()
                    store_gaps = await asyncio.to_thread(store.refresh_gaps)
        finally:
            pumper.cancel()
            with contextlib.suppress(BaseException):
                await pumper

    async def tick(client: Any) -> None:
        while True:
            await asyncio.sleep(1.0)
            await ask_resends(client)

    async def session() -> None:
        client = aiomqtt.Client(
            host,
            port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            tls_params=tls_params,
        )
        if store is not None:
            # PUBACK only after the commit (aiomqtt has no API for it: paho's, underneath).
            client._client.manual_ack_set(True)
        async with client:
            for t in topics:
                await client.subscribe(t, options=SubscribeOptions(qos=1))
            if ready is not None:
                ready.set()
            ticker = asyncio.create_task(tick(client)) if resend_after_s is not None else None
            try:
                await (read(client) if store is None else read_into_store(client))
            finally:
                if ticker is not None:
                    ticker.cancel()

    while not stop.is_set():
        stopper = asyncio.create_task(stop.wait())
        worker = asyncio.create_task(session())
        done, _ = await asyncio.wait({stopper, worker}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if worker not in done:
            worker.cancel()
            with contextlib.suppress(BaseException):
                await worker
            break
        exc = worker.exception()
        if exc is None:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff * random.uniform(0.5, 1.0))
        backoff = min(backoff * 2, 10.0)
