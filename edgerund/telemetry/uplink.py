"""The MQTT 5 uplink: drains the spool to the broker, paced, and serves `cmd/` messages.

Theory of operation
-------------------
One task (`run`) loops over connection sessions with a capped, jittered exponential
backoff (delay = min(max, initial * 2**attempt) * U(0.5, 1); reset after a CONNACK).
A session is an aiomqtt client with MQTT 5, clean start OFF and a session expiry (the
broker keeps our `cmd/+` subscription and queues commands while we are away), a retained
last will `state` = offline, and TLS from CA / client certificate files when configured.
After the CONNACK it publishes the retained birth `state` (online, spool epoch, boot time)
and the retained `meta`, subscribes to `cmd/+` (no-local), then runs a reader (commands)
and a sender in one TaskGroup: when the broker goes away the reader's iterator raises,
the group cancels everything and the loop reconnects. The reader hands each `cmd/{name}`
request to `dispatch` (telemetry/commands.py) and publishes the reply it returns to the
request's response topic (default `cmd/{name}/reply`) with its correlation data.

The sender never hands the backlog to paho's RAM queue. It takes one row at a time from
the spool in priority order (evt, then agg, then raw; oldest first within a class; the
evt query is re-run whenever a commit happened, so a live event jumps ahead of a backlog
of raw batches), waits for a byte token bucket (`replay_bytes_per_s`, burst
`replay_burst_bytes`) and for a free in-flight slot (`inflight_max`), signs the batch
(identity key; the trailer is added at send time so the spool holds unsigned rows and loss
records can be written from the spool thread), and publishes it at QoS 1.

No wait of a session is unbounded: the reader runs from the CONNACK on (so a broker
lost during the birth ends the session), the birth has `BIRTH_TIMEOUTS` ack timeouts, and
each signature `ack_timeout_s`. A soak run (seed soak1-20261206) once left the uplink
connected to nobody for half an hour, most likely in its birth, awaiting a meta signature
the identity never answered (the TPM worker dropped a call it took off the queue just
after its context was abandoned; fixed in identity/worker.py), with no reader yet to
notice that the broker had gone.

Signing failures (TPM busy, hung or gone) never silently downgrade to unsigned telemetry:
the batch is not published and stays undelivered in the spool (`sign_held` counts it), the
sender pauses for `sign_retry_s`, waits for in-flight publishes, and re-reads the spool
from the start, so held batches go out signed once the identity answers again. Only
`uplink.allow_unsigned: true` publishes unsigned instead (counted in `unsigned_batches`).

PUBACK: aiomqtt 2.x `await client.publish(..., qos=1)` returns when paho's `on_publish`
fires, which for QoS 1 is on PUBACK, but it drops the MQTT 5 reason code, and a PUBACK
with a code >= 0x80 (not authorized, quota exceeded, ...) means the broker did NOT take
the message. `_AckClient` therefore records the reason code per message id and
`publish_acked` returns it; only a success code lets the row be marked delivered in the
spool. A publish that gets no PUBACK within `ack_timeout_s` ends the session.
Rows whose publish was interrupted stay undelivered and are sent again in the next
session: duplicates are possible (QoS 1) and carry the same (epoch, seq) dedup key.

PUBACK 0x10 (no matching subscribers) is a success code in MQTT, but for a batch it means
the broker passed it to nobody and dropped it: mosquitto 2.0.11 forgets a shared
subscription when it restarts, so batches the gateway replays before the consumer
subscribes again vanish (found by the soak harness, seed soak1-20261206). With
`uplink.require_subscriber` (the default) such a row is NOT marked delivered
(`no_subscriber_held` counts it) and the sender pauses as after a signing failure, for a
backoff that starts at `no_subscriber_retry_s` and doubles per pause up to
`no_subscriber_retry_max_s` (times U(0.75, 1); reset by the next batch the broker
delivered; one pause per round of in-flight publishes, however many got 0x10), so a site
whose broker has no consumer keeps its data in the spool (the cap's loss records name
what it evicts) without spinning. The first 0x10 and the first delivery after it are
logged (`telemetry_no_subscriber`, `telemetry_subscriber_back`), not every retry. Retained
`meta`/`state` and command replies are not affected: the broker stores a retained message
whatever the code, and a reply nobody waits for is not data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgerund.errors import CommandError as CommandRejected
from edgerund.telemetry.codec import Cls
from edgerund.telemetry.config import UplinkConfig, broker_credentials
from edgerund.telemetry.signing import Signer, meta_with_ver
from edgerund.telemetry.spool import Row, Spool

if TYPE_CHECKING:
    import ssl

log = structlog.get_logger("edgerund.telemetry.uplink")

CONTENT_TYPE = "application/vnd.edgerund.tlm.v1"
_NO_MATCHING_SUBSCRIBERS = 0x10  # PUBACK reason code (MQTT 5, 3.4.2.1)
# the birth (subscribe, signed metas, state) may take this many ack timeouts, then the
# session ends and the next one tries again
BIRTH_TIMEOUTS = 3
FETCH_ROWS = 64  # rows read per spool round trip (payloads, so bounded: <= 64 batches in RAM)
Dispatch = Callable[[str, bytes], Awaitable[bytes | None]]
"""(command name, request payload) -> reply payload, or None for no reply."""


def _props(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _json_props() -> Properties:
    props = _props(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    return props


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    async def take(self, n: int) -> None:
        need = min(float(n), self.burst)  # a batch bigger than the burst waits for a full bucket
        while True:
            self._refill()
            if self.tokens >= need:
                self.tokens -= n  # may go negative: the debt is paid before the next send
                return
            await asyncio.sleep((need - self.tokens) / self.rate)


class _AckClient(aiomqtt.Client):
    """aiomqtt client that keeps the PUBACK reason code (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.puback_codes: dict[int, ReasonCode] = {}
        # aiomqtt warns above 10 pending calls; our own in-flight window bounds them.
        self.pending_calls_threshold = 1 << 16

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        self.puback_codes[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """aiomqtt 2.5 schedules `loop.add_writer(sock.fileno(), ...)` with the fd read
        when paho asks, from any thread; when the link drops before the loop runs it, the
        fd is closed (EBADF: "Exception in callback" with a traceback, found by the soak
        harness during a link cut) or, worse, already reused by another socket. Read the
        fd on the loop, and only if the socket is still this client's open socket."""

        def callback() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken pipe: the connection is gone (as aiomqtt)
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            fd = sock.fileno()
            if fd < 0 or client.socket() is not sock:
                return  # closed (or replaced) meanwhile: nothing to wait on
            self._loop.add_writer(fd, callback)

        self._loop.call_soon_threadsafe(register)

    def _on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_writer(fd)

    async def publish_acked(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
        ack_timeout_s: float,
    ) -> ReasonCode | None:
        info = self._client.publish(topic, payload, 1, retain, properties)
        if info.rc != 0:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        self.puback_codes.pop(info.mid, None)
        confirmation = asyncio.Event()
        with self._pending_call(info.mid, confirmation, self._pending_publishes):
            await self._wait_for(confirmation.wait(), timeout=ack_timeout_s)
        return self.puback_codes.pop(info.mid, None)


@dataclass
class UplinkStats:
    connected: bool = False
    sent_batches: int = 0
    sent_bytes: int = 0
    replayed_batches: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    last_error: str | None = None
    inflight: int = 0
    inflight_peak: int = 0
    publish_rejected: int = 0
    sign_errors: int = 0
    sign_held: int = 0  # batches not published because signing failed (kept in the spool)
    no_subscriber_held: int = 0  # batches PUBACKed 0x10 (kept in the spool, retried)
    no_subscriber: bool = False  # the last batch PUBACK was 0x10: holding the backlog
    unsigned_batches: int = 0  # published unsigned (only with uplink.allow_unsigned)
    connected_since: float | None = None


class Uplink:
    def __init__(
        self,
        cfg: UplinkConfig,
        *,
        site: str,
        gateway: str,
        spool: Spool,
        signer: Signer | None,
        meta: Callable[[], tuple[int, str]],
        birth: Callable[[], dict[str, Any]],
        dispatch: Dispatch,
    ) -> None:
        self.cfg = cfg
        if cfg.tls is not None and cfg.tls.server_name is not None:
            # accepted by the schema, not implemented: say so instead of ignoring it
            log.warning(
                "uplink_tls_server_name_unused",
                server_name=cfg.tls.server_name,
                message=f"the broker's certificate is checked against uplink.host ({cfg.host})",
            )
        self.base = f"{cfg.topic_prefix}/{site}/{gateway}"
        self.client_id = cfg.client_id or f"edgerund-{gateway}"
        self.spool = spool
        self.signer = signer
        self._meta = meta
        self._birth = birth
        self.stats = UplinkStats()
        self._dispatch = dispatch
        self._bucket = TokenBucket(cfg.replay_bytes_per_s, cfg.replay_burst_bytes)
        self._wake = asyncio.Event()
        self._gen = 0
        self._stopping = asyncio.Event()
        self._down = asyncio.Event()  # set while not connected
        self._down.set()
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()
        self._client: _AckClient | None = None
        self._cursor_reset = 0
        # loop.time() before which held batches are not retried (signing failed, or the
        # broker had no subscriber): the sender pauses, then re-reads the spool
        self._retry_at = 0.0
        self._signing_failed = False
        self._round = 0  # bumped each time the sender resumes after a pause
        self._no_sub_round = -1  # the round whose 0x10 already set a pause
        self._no_sub_delay_s = cfg.no_subscriber_retry_s  # the next no-subscriber pause
        self._meta_pending = False  # a meta was withheld because signing failed

    # ------------------------------------------------------------ hooks

    @property
    def broker(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def topic(self, cls: Cls) -> str:
        return f"{self.base}/{cls.name.lower()}"

    def wake(self) -> None:
        """New rows were committed (called on the loop)."""
        self._gen += 1
        self._wake.set()

    def reset_cursors(self) -> None:
        """Rows below the cursors became undelivered again (cmd/resend)."""
        self._cursor_reset += 1
        self.wake()

    async def republish(self) -> None:
        """Rebirth: publish state and meta again on the live connection."""
        c = self._client
        if c is None or not self.stats.connected:
            raise CommandRejected("not_connected", "no broker connection")
        await self._publish_birth(c)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Let in-flight publishes finish, publish `state` offline, disconnect."""
        self._stopping.set()
        self.wake()
        if self.stats.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._down.wait(), timeout_s)

    # ------------------------------------------------------------ connection loop

    async def run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._session()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                err = self._describe(exc)
                if self.stats.connected_since is None:
                    self.stats.connect_failures += 1
                if err != self.stats.last_error:
                    log.warning("uplink_down", broker=self.broker, error=err)
                self.stats.last_error = err
                if self.stats.connected_since is not None:
                    attempt = 0
            finally:
                was = self.stats.connected
                self.stats.connected = False
                self._down.set()
                self.stats.connected_since = None
                self._client = None
                if was:
                    self.stats.reconnects += 1
            if self._stopping.is_set():
                return
            delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** min(attempt, 30))
            delay *= random.uniform(0.5, 1.0)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    @staticmethod
    def _describe(exc: BaseException) -> str:
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        return f"{type(exc).__name__}: {exc}"

    def _make_client(
        self, password: str | None = None, tls: ssl.SSLContext | None = None
    ) -> _AckClient:
        cfg = self.cfg
        props = _props(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s
        will_props = _props(PacketTypes.WILLMESSAGE)
        will_props.ContentType = "application/json"
        will = aiomqtt.Will(
            f"{self.base}/state",
            json.dumps({"online": False, "reason": "connection lost"}).encode(),
            qos=1,
            retain=True,
            properties=will_props,
        )
        return _AckClient(
            cfg.host,
            cfg.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=False,
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            properties=props,
            tls_context=tls,
            username=cfg.username,
            password=password,
            max_inflight_messages=cfg.inflight_max + 8,
            max_queued_incoming_messages=256,
        )

    async def _session(self) -> None:
        # files are read off the loop; the client itself is made on it (aiomqtt binds it
        # to the running loop: made in a thread it raised "no running event loop", so a
        # `password_file` uplink never connected until 2026-12-06)
        creds = (
            await asyncio.to_thread(broker_credentials, self.cfg)
            if self.cfg.password_file or self.cfg.tls is not None
            else (None, None)
        )
        client = self._make_client(*creds)
        async with client:
            self._client = client
            self.stats.connected = True
            self._down.clear()
            self.stats.connected_since = time.time()
            log.info("uplink_connected", broker=self.broker, client_id=self.client_id)
            async with asyncio.TaskGroup() as tg:
                # The reader watches the connection from the first moment: a broker that
                # goes away during the birth ends the session (a cancelled body), and the
                # birth itself is bounded, so no wait of the session is without a limit.
                reader = tg.create_task(self._reader(client))
                limit_s = BIRTH_TIMEOUTS * self.cfg.ack_timeout_s
                try:
                    async with asyncio.timeout(limit_s):
                        await client.subscribe(
                            f"{self.base}/cmd/+", options=SubscribeOptions(qos=1, noLocal=True)
                        )
                        await self._publish_birth(client)
                except TimeoutError:
                    raise aiomqtt.MqttError(
                        f"session start (subscribe, meta, state) not done within {limit_s:g} s"
                    ) from None
                sender = tg.create_task(self._sender(client, tg))
                await self._stopping.wait()
                sender.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), 5.0)
                with contextlib.suppress(Exception):
                    await client.publish_acked(
                        f"{self.base}/state",
                        json.dumps({"online": False, "reason": "shutdown"}).encode(),
                        retain=True,
                        ack_timeout_s=2.0,
                    )
                reader.cancel()

    async def _publish_birth(self, client: _AckClient) -> None:
        ver, _ = self._meta()
        birth = dict(self._birth())
        birth.update(online=True, schema_ver=ver, client_id=self.client_id)
        await self._publish_metas(client)
        await self._checked(
            client,
            f"{self.base}/state",
            json.dumps(birth).encode(),
            retain=True,
            properties=_json_props(),
        )

    async def _publish_metas(self, client: _AckClient) -> None:
        """The current `meta` and those of older schemas the backlog still uses, signed.

        While signing fails the metas are withheld (unless `allow_unsigned`), like the
        batches they describe, and published before the first batch once signing works.
        """
        ver, meta_text = self._meta()
        metas = [(f"{self.base}/meta", meta_text)]
        old = [
            v for v in await asyncio.wrap_future(self.spool.backlog_schema_versions()) if v != ver
        ]
        if old:
            for v, text in (await asyncio.wrap_future(self.spool.meta_versions(old))).items():
                metas.append((f"{self.base}/meta/{v}", meta_with_ver(text, v)))
        self._meta_pending = False
        for topic, text in metas:
            signed = await self._signed_meta(text)
            if signed is None:
                self._meta_pending = True
                return
            await self._checked(
                client, topic, signed.encode(), retain=True, properties=_json_props()
            )

    async def _signed_meta(self, text: str) -> str | None:
        """Signed when the gateway signs batches: the meta relabels them, so it is signed
        by the same key (a backend that requires signatures refuses an unsigned meta).
        None when signing fails and unsigned publishing is not allowed."""
        if self.signer is None:
            return text
        try:
            async with asyncio.timeout(self.cfg.ack_timeout_s):
                return await self.signer.sign_meta(text)
        except Exception as exc:
            self.stats.sign_errors += 1
            log.warning("telemetry_meta_sign_failed", error=repr(exc))
            return text if self.cfg.allow_unsigned else None

    async def _checked(
        self,
        client: _AckClient,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> ReasonCode | None:
        rc = await client.publish_acked(
            topic,
            payload,
            retain=retain,
            properties=properties,
            ack_timeout_s=self.cfg.ack_timeout_s,
        )
        if rc is not None and rc.is_failure:
            self.stats.publish_rejected += 1
            raise aiomqtt.MqttError(f"broker refused publish to {topic}: PUBACK {rc}")
        return rc

    # ------------------------------------------------------------ sender

    async def _sender(self, client: _AckClient, tg: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(self.cfg.inflight_max)
        cursors = {c: 0 for c in Cls}
        buffers: dict[Cls, list[Row]] = {c: [] for c in Cls}
        seen_gen = {c: -1 for c in Cls}
        reset_seen = self._cursor_reset
        session_start = time.time()
        while True:
            if self._retry_at:  # rows were held: pause, then re-read them in order
                await self._pause()
                reset_seen = -1  # forces the cursor reset below
            if reset_seen != self._cursor_reset:
                reset_seen = self._cursor_reset
                cursors = {c: 0 for c in Cls}
                buffers = {c: [] for c in Cls}
                seen_gen = {c: -1 for c in Cls}
            gen = self._gen
            row: Row | None = None
            for cls in (Cls.EVT, Cls.AGG, Cls.RAW):
                if not buffers[cls] and seen_gen[cls] != gen:
                    rows = await asyncio.wrap_future(
                        self.spool.fetch(cls, cursors[cls], FETCH_ROWS)
                    )
                    seen_gen[cls] = gen if len(rows) < FETCH_ROWS else -1
                    buffers[cls] = rows
                    if rows:
                        cursors[cls] = rows[-1].seq
                if buffers[cls]:
                    row = buffers[cls].pop(0)
                    break
            if row is None:
                while self._gen == gen and self._cursor_reset == reset_seen:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 5.0)
                continue
            await self._bucket.take(len(row.payload) + 64)
            await slots.acquire()
            if self._retry_at:  # a row was held meanwhile: this one waits for the re-read
                slots.release()
                continue
            task = tg.create_task(self._publish_row(client, row, row.created < session_start))
            self.stats.inflight += 1
            self._idle.clear()
            self.stats.inflight_peak = max(self.stats.inflight_peak, self.stats.inflight)
            # The slot and the in-flight count are given back by a done callback, not by a
            # `finally` in the coroutine: a task the group cancels before its first step (the
            # session died right after it was created) never runs its body, and a count that
            # never came back down kept the sender of every later session waiting for
            # `_idle` in its pause, so nothing was sent again (soak, 2026-12-06).
            task.add_done_callback(lambda _t: self._publish_done(slots))

    def _publish_done(self, slots: asyncio.Semaphore) -> None:
        self.stats.inflight -= 1
        if not self.stats.inflight:
            self._idle.set()
        slots.release()

    async def _publish_row(self, client: _AckClient, row: Row, historical: bool) -> None:
        payload = row.payload
        if self.signer is not None:
            try:
                # bounded here too: an identity that never answers one call must not hold
                # an in-flight slot (and with it every later pause) for ever
                async with asyncio.timeout(self.cfg.ack_timeout_s):
                    payload = await self.signer.sign(payload)
            except Exception as exc:
                self.stats.sign_errors += 1
                if not self._signing_failed:  # log the state change, not every retry
                    self._signing_failed = True
                    log.error(
                        "telemetry_sign_failed", error=repr(exc),
                        action="publishing unsigned" if self.cfg.allow_unsigned
                        else "holding batches in the spool",
                    )  # fmt: skip
                if not self.cfg.allow_unsigned:
                    self.stats.sign_held += 1
                    self._hold_for(self.cfg.sign_retry_s)
                    return  # not acked: the row stays undelivered in the spool
                self.stats.unsigned_batches += 1
            else:
                if self._signing_failed:
                    self._signing_failed = False
                    log.info("telemetry_sign_recovered")
                if self._meta_pending:  # the batch must not arrive before its meta
                    await self._publish_metas(client)
        props = _props(PacketTypes.PUBLISH)
        props.ContentType = CONTENT_TYPE
        user = [("epoch", str(self.spool.epoch)), ("seq", str(row.seq))]
        if historical:
            user.append(("hist", "1"))
        props.UserProperty = user
        if row.cls is Cls.RAW and self.cfg.message_expiry_raw_s:
            props.MessageExpiryInterval = self.cfg.message_expiry_raw_s
        rc = await self._checked(client, self.topic(row.cls), payload, properties=props)
        if self._delivered_to_nobody(rc):
            return  # not acked: the row stays undelivered in the spool
        self.spool.ack([row.seq])
        self.stats.sent_batches += 1
        self.stats.sent_bytes += len(payload)
        if historical:
            self.stats.replayed_batches += 1

    def _hold_for(self, delay_s: float) -> None:
        """Pause the sender for at least `delay_s`; held rows are re-read after it."""
        self._retry_at = max(self._retry_at, asyncio.get_running_loop().time() + delay_s)

    async def _pause(self) -> None:
        """Wait out the pause and every in-flight publish, then open a new round."""
        loop = asyncio.get_running_loop()
        while True:  # a publish that ends during the wait may extend the pause
            await asyncio.sleep(max(0.0, self._retry_at - loop.time()))
            await self._idle.wait()
            if loop.time() >= self._retry_at:
                break
        self._retry_at = 0.0
        self._round += 1

    def _delivered_to_nobody(self, rc: ReasonCode | None) -> bool:
        """True when the batch must stay in the spool: PUBACK 0x10 under
        `require_subscriber`. Tracks the held/resumed state and the pause backoff."""
        if rc is not None and rc.value == _NO_MATCHING_SUBSCRIBERS and self.cfg.require_subscriber:
            self.stats.no_subscriber_held += 1
            if not self.stats.no_subscriber:
                self.stats.no_subscriber = True
                log.warning(
                    "telemetry_no_subscriber", broker=self.broker,
                    action="holding batches in the spool",
                )  # fmt: skip
            if self._no_sub_round != self._round:  # one pause (and one doubling) per round
                self._no_sub_round = self._round
                # jittered: the gateways of a fleet do not retry in step after a restart
                self._hold_for(self._no_sub_delay_s * random.uniform(0.75, 1.0))
                self._no_sub_delay_s = min(
                    self.cfg.no_subscriber_retry_max_s, self._no_sub_delay_s * 2
                )
            return True
        if rc is None or rc.value == 0:  # delivered to a subscriber (or MQTT 3 ack)
            self._no_sub_delay_s = self.cfg.no_subscriber_retry_s
            if self.stats.no_subscriber:
                self.stats.no_subscriber = False
                log.info("telemetry_subscriber_back", broker=self.broker, action="resumed")
        return False

    # ------------------------------------------------------------ commands

    async def _reader(self, client: _AckClient) -> None:
        async for msg in client.messages:
            await self._handle(client, msg)

    async def _handle(self, client: _AckClient, msg: aiomqtt.Message) -> None:
        topic = str(msg.topic)
        name = topic.rsplit("/", 1)[-1]
        payload = (
            msg.payload
            if isinstance(msg.payload, bytes | bytearray)
            else str(msg.payload or "").encode()
        )
        props = msg.properties
        reply_topic = f"{self.base}/cmd/{name}/reply"
        rt = getattr(props, "ResponseTopic", None) if props is not None else None
        if rt and not any(c in rt for c in "#+") and not rt.startswith("$"):
            reply_topic = rt
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        reply = await self._dispatch(name, bytes(payload))
        if reply is None:
            return
        rprops = _props(PacketTypes.PUBLISH)
        if corr:
            rprops.CorrelationData = corr
        try:
            await client.publish_acked(
                reply_topic, reply, properties=rprops, ack_timeout_s=self.cfg.ack_timeout_s
            )
        except aiomqtt.MqttError:
            raise
        except Exception as exc:  # a bad ResponseTopic must not end the session
            log.warning("telemetry_cmd_reply_failed", cmd=name, error=repr(exc))
