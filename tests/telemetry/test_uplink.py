"""Uplink behaviour against a real mosquitto: outages, pacing, priorities, commands, TLS."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from structlog.testing import capture_logs

from edgerund.remote import RemoteCommands
from edgerund.telemetry.codec import Cls, SeriesBlock
from edgerund.telemetry.component import TelemetryComponent
from tests.fixtures.binaries import free_port
from tests.telemetry.conftest import HubStandIn, make_config, make_ctx, telemetry_in, until
from tests.telemetry.mqtt_proxy import MqttProxy


async def _emit_until(hub: HubStandIn, stop: asyncio.Event, rate_hz: float = 20.0) -> int:
    n = 0
    while not stop.is_set():
        hub.emit("env", "temp", round(20 + 0.01 * (n % 13), 2))
        n += 1
        await asyncio.sleep(1.0 / rate_hz)
    return n


@pytest.mark.parametrize("shared", [False, True], ids=["plain-sub", "shared-sub+resend"])
async def test_broker_outage_loses_nothing(
    tmp_path: Path, mosquitto: Any, collector_factory: Any, loop_guard: Any, shared: bool
) -> None:
    """Plain persistent subscription: the broker queues for the consumer across its
    restart. Shared subscription: mosquitto 2.0.11 forgets it on restart, so the broker
    PUBACKs batches replayed before the consumer resubscribes with 0x10 and drops them;
    the gateway keeps them in the spool until the consumer is back (cmd/resend stays the
    repair path for any gap left)."""
    # blockbuster (in loop_guard) fails any blocking call on the loop deterministically;
    # the lag threshold only catches gross stalls (the CI machine has 2 shared cores).
    loop_guard.threshold_s = 0.3
    ctx = make_ctx(make_config(tmp_path, mosquitto, telemetry={"batch_max_age_s": 0.5}), tmp_path)
    hub = HubStandIn([("env", "temp", "degC")])
    col = await collector_factory(
        mosquitto,
        client_id="outage-consumer",
        group="g" if shared else None,
        resend_after_s=1.0 if shared else None,
    )
    async with telemetry_in(ctx, hub) as tel:
        stop = asyncio.Event()
        emitter = asyncio.create_task(_emit_until(hub, stop))
        await col.wait_for(lambda: col.consumer.counts["batches"] >= 3)
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.sleep(3.0)  # the outage: batches keep being sealed into the spool
        assert tel.status()["telemetry"]["connected"] is False
        assert tel.spool.stats.backlog_batches >= 3
        n_before = col.consumer.counts["batches"]
        await asyncio.to_thread(mosquitto.start)
        # Keep producing until the consumer is back and receiving live batches, so any
        # batch the broker did not keep for it shows up as a gap before a later seq.
        await col.wait_for(lambda: col.consumer.counts["batches"] >= n_before + 3, 30)
        stop.set()
        emitted = await emitter
        await asyncio.sleep(1.0)  # let the last open batch seal
        await tel.spool.aflush()
        last_seq = tel.spool.last_seq
        await col.wait_for(lambda: tel.spool.stats.backlog_batches == 0, 30)
        await col.wait_for(lambda: (tel.spool.epoch, last_seq) in col.seqs(), 30)
        await col.wait_for(lambda: not col.consumer.gaps(), 30)  # shared: repaired by resend
        assert tel.status()["telemetry"]["reconnects"] >= 1
    seqs = {s for e, s in col.seqs() if e == tel.spool.epoch}
    assert seqs == set(range(min(seqs), max(seqs) + 1)) and max(seqs) >= last_seq
    assert col.consumer.gaps() == []
    values = [
        (t, v)
        for r in col.of("series")
        if r.get("name") == "env.temp" and r["cls"] == "raw"
        for t, v in zip(r["t_ms"], r["values"]["value"], strict=True)
    ]
    assert len(values) == emitted  # every sample, once (duplicates are dropped by (epoch, seq))
    assert tel.status()["telemetry"]["lost_samples"] == 0


async def _fill_backlog(tel: TelemetryComponent, n: int, samples: int) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        t = 1_700_000_000_000 + i * 60_000 + np.arange(samples, dtype=np.int64) * 100
        v = rng.integers(-20000, 20000, samples)  # incompressible: a known wire size
        await asyncio.wrap_future(
            tel.spool.append(Cls.RAW, [SeriesBlock(1, t, (v,), (-3,))], tel.schema_ver)
        )


async def test_replay_respects_inflight_limit_and_events_jump_ahead(
    tmp_path: Path, mosquitto: Any
) -> None:
    proxy = MqttProxy(mosquitto.port, delay_s=0.05)
    port = free_port()
    # No consumer here: what is measured is the wire, so the broker's PUBACK 0x10 (no
    # subscriber) counts as delivered, as MQTT has it (tests/telemetry/test_no_subscriber.py).
    cfg = make_config(
        tmp_path,
        mosquitto,
        uplink={"port": port, "inflight_max": 3, "require_subscriber": False},
    )
    ctx = make_ctx(cfg, tmp_path)
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill_backlog(tel, 40, 50)
        assert tel.status()["telemetry"]["connected"] is False
        await proxy.start(port)
        try:
            t0 = time.monotonic()
            while len([p for p in proxy.publishes if p.topic.endswith("/raw")]) < 10:
                assert time.monotonic() - t0 < 30
                await asyncio.sleep(0.02)
            ctx.events.publish("anomaly.start", "loop1", score=1.0)
            while tel.spool.stats.backlog_batches:
                assert time.monotonic() - t0 < 60
                await asyncio.sleep(0.05)
        finally:
            await proxy.stop()
    topics = [p.topic.rsplit("/", 1)[-1] for p in proxy.publishes if p.pid is not None]
    raw_idx = [i for i, t in enumerate(topics) if t == "raw"]
    evt_idx = [i for i, t in enumerate(topics) if t == "evt"]
    assert len(raw_idx) >= 40 and evt_idx
    assert evt_idx[0] < raw_idx[-10]  # the live event overtook the remaining backlog
    # 50 ms of latency per PUBACK with 40 batches queued: an unlimited client would have
    # them all in flight. The network saw at most 3 (and the limit was actually reached).
    assert (
        2 <= proxy.max_outstanding <= 3 + 1
    )  # +1: a birth/meta publish may overlap the first batch


async def test_replay_is_paced_by_byte_rate(tmp_path: Path, mosquitto: Any) -> None:
    proxy = MqttProxy(mosquitto.port)
    port = free_port()
    rate, burst = 40_000, 4096
    cfg = make_config(
        tmp_path,
        mosquitto,
        uplink={
            "port": port,
            "replay_bytes_per_s": rate,
            "replay_burst_bytes": burst,
            "require_subscriber": False,  # no consumer: the pacing on the wire is measured
        },
    )
    ctx = make_ctx(cfg, tmp_path)
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill_backlog(tel, 30, 200)
        backlog = tel.spool.stats.backlog_bytes
        await proxy.start(port)
        try:
            t0 = time.monotonic()
            while tel.spool.stats.backlog_batches:
                assert time.monotonic() - t0 < 60
                await asyncio.sleep(0.05)
        finally:
            await proxy.stop()
    raw = [p for p in proxy.publishes if p.topic.endswith("/raw")]
    assert len(raw) == 30
    span = raw[-1].t - raw[0].t
    sent = sum(p.size for p in raw[:-1])
    assert backlog > 3 * burst
    # Bytes put on the wire between the first and the last publish never exceed
    # rate * time + burst (10% slack for the per-batch accounting overhead).
    assert sent <= 1.1 * (rate * span + burst), (sent, span)
    assert span >= 0.8 * (sent - burst) / rate


async def test_malformed_cmd_messages_rejected(tmp_path: Path, mosquitto: Any) -> None:
    cfg = make_config(tmp_path, mosquitto, uplink={"cmd_max_bytes": 4096})
    ctx = make_ctx(cfg, tmp_path)
    got: list[bytes] = []

    async def echo(payload: bytes) -> bytes:
        got.append(payload)
        return b"pong:" + payload

    router = RemoteCommands()
    router.register("echo", echo)  # another component's command, registered with the root's router
    async with telemetry_in(ctx, HubStandIn([("env", "temp", "degC")]), router=router) as tel:
        await until(lambda: tel.status()["telemetry"]["connected"], 20, "connected")
        base = "tlm/v1/lab/gw1/cmd"
        cases = [
            ("resend", b"not json", "bad_json"),
            ("resend", b"[1,2]", "bad_json"),
            ("resend", json.dumps({"epoch": "x", "from_seq": 1, "to_seq": 2}).encode(), "bad_args"),
            ("resend", json.dumps({"epoch": 1, "from_seq": 5, "to_seq": 2}).encode(), "bad_args"),
            (
                "resend",
                json.dumps({"epoch": 1, "from_seq": 1, "to_seq": 2}).encode(),
                "wrong_epoch",
            ),
            (
                "upload_raw",
                json.dumps({"series": "nope.*", "from_ms": 0, "to_ms": 1}).encode(),
                "unknown_series",
            ),
            ("upload_raw", b"\xff\xfe", "bad_json"),
            ("nosuch", b"{}", "unknown_command"),
            ("rebirth", b"x" * 5000, "too_large"),
        ]
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            await c.subscribe(f"{base}/+/reply", qos=1)
            replies: dict[str, list[dict[str, Any]]] = {}
            for name, payload, _ in cases:
                await c.publish(f"{base}/{name}", payload, qos=1)
            await c.publish(f"{base}/echo", b"hello", qos=1)
            await c.publish(f"{base}/rebirth", b"{}", qos=1)
            n = 0
            async with asyncio.timeout(20):
                async for m in c.messages:
                    name = str(m.topic).split("/")[-2]
                    body = m.payload if isinstance(m.payload, bytes) else b""
                    replies.setdefault(name, []).append(
                        json.loads(body) if name != "echo" else {"raw": body}
                    )
                    n += 1
                    if n == len(cases) + 2:
                        break
        codes = sorted(
            r["error"]["code"] for rs in replies.values() for r in rs if r.get("ok") is False
        )
        assert codes == sorted(c for _, _, c in cases)
        assert replies["echo"] == [{"raw": b"pong:hello"}] and got == [b"hello"]
        assert any(r.get("ok") is True for r in replies["rebirth"])
        st = tel.status()["telemetry"]
        assert st["cmd_rejected"] == len(cases) and st["connected"] is True


async def test_resend_republishes_kept_batches(
    tmp_path: Path, mosquitto: Any, collector_factory: Any
) -> None:
    ctx = make_ctx(make_config(tmp_path, mosquitto), tmp_path)
    col = await collector_factory(mosquitto, client_id="resend-consumer")
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill_backlog(tel, 5, 10)
        await col.wait_for(lambda: col.consumer.counts["batches"] >= 5)
        first = min(s for _, s in col.seqs())
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            await c.subscribe("tlm/v1/lab/gw1/cmd/resend/reply", qos=1)
            await c.publish(
                "tlm/v1/lab/gw1/cmd/resend",
                json.dumps(
                    {"epoch": tel.spool.epoch, "from_seq": first, "to_seq": first + 2}
                ).encode(),
                qos=1,
            )
            async with asyncio.timeout(10):
                async for m in c.messages:
                    reply = json.loads(m.payload if isinstance(m.payload, bytes) else b"{}")
                    break
        assert reply == {"ok": True, "id": None, "requeued": 3, "missing": 0}
        await col.wait_for(lambda: col.consumer.counts["duplicates"] >= 3)
    dups = {r["seq"] for r in col.of("duplicate")}
    assert dups == {first, first + 1, first + 2}


async def test_tls_with_client_certificate(tmp_path: Path, mosquitto_tls: Any) -> None:
    b = mosquitto_tls
    tls = {"ca_file": b.tls.ca_file, "cert_file": b.tls.client_cert, "key_file": b.tls.client_key}
    # not implemented: named at start, not silently ignored
    tls["server_name"] = "broker.example"
    # no consumer: the TLS session is tested, a PUBACK (0x10 included) completes a publish
    up = {"port": b.tls_port, "tls": tls, "require_subscriber": False}
    ctx = make_ctx(make_config(tmp_path, b, uplink=up), tmp_path)
    with capture_logs() as logs:
        async with telemetry_in(ctx, HubStandIn([])) as tel:
            await _fill_backlog(tel, 2, 10)
            t0 = time.monotonic()
            while tel.spool.stats.backlog_batches:
                assert time.monotonic() - t0 < 20, tel.status()
                await asyncio.sleep(0.05)
            assert tel.status()["telemetry"]["connected"]
    unused = [e for e in logs if e["event"] == "uplink_tls_server_name_unused"]
    assert unused and unused[0]["server_name"] == "broker.example"


async def test_tls_handshake_refused_is_reported_not_fatal(
    tmp_path: Path, mosquitto_tls: Any
) -> None:
    b = mosquitto_tls
    from tests.fixtures.mosquitto import make_test_pki

    other = make_test_pki(tmp_path / "other-pki")  # a CA the broker's certificate is not from
    tls = {"ca_file": other.ca_file, "cert_file": b.tls.client_cert, "key_file": b.tls.client_key}
    ctx = make_ctx(make_config(tmp_path, b, uplink={"port": b.tls_port, "tls": tls}), tmp_path)
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill_backlog(tel, 2, 10)
        t0 = time.monotonic()
        while tel.uplink is not None and tel.uplink.stats.connect_failures < 2:
            assert time.monotonic() - t0 < 20
            await asyncio.sleep(0.05)
        st = tel.status()["telemetry"]
        assert st["connected"] is False
        assert "certificate" in (st["last_error"] or "").lower()
        assert st["backlog_batches"] == 2


async def test_consumer_repairs_a_gap_with_resend(tmp_path: Path, mosquitto: Any) -> None:
    """A consumer without a persistent session misses batches while it is away; the next
    batch it sees exposes the gap, and cmd/resend brings the missing ones back. With
    `require_subscriber: false`: the default holds such batches in the spool instead."""
    from edgerund.backend.consumer import Consumer, run
    from tests.telemetry.conftest import Collector

    cfg = make_config(tmp_path, mosquitto, uplink={"require_subscriber": False})
    ctx = make_ctx(cfg, tmp_path)
    col = Collector(Consumer())

    async def consume(stop: asyncio.Event) -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(
            run(
                col.consumer,
                col,
                host=mosquitto.host,
                port=mosquitto.port,
                client_id="gap-consumer",
                session_expiry_s=0,
                stop=stop,
                ready=ready,
                resend_after_s=0.5,
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        await stop.wait()
        await task

    async with telemetry_in(ctx, HubStandIn([])) as tel:
        stop1 = asyncio.Event()
        c1 = asyncio.create_task(consume(stop1))
        await asyncio.sleep(0.3)
        await _fill_backlog(tel, 3, 10)
        await col.wait_for(lambda: col.consumer.counts["batches"] >= 3)
        stop1.set()
        await c1
        await _fill_backlog(tel, 4, 10)  # nobody listens: the broker drops these
        await until(lambda: tel.spool.stats.backlog_batches == 0, 20, "sent")
        stop2 = asyncio.Event()
        c2 = asyncio.create_task(consume(stop2))
        await asyncio.sleep(0.5)
        await _fill_backlog(tel, 1, 10)
        await col.wait_for(lambda: col.consumer.counts["batches"] >= 8, 30)
        stop2.set()
        await c2
    asked = col.of("resend_requested")
    assert asked and asked[0]["to_seq"] - asked[0]["from_seq"] == 3
    assert col.consumer.gaps() == []


async def test_a_session_dying_right_after_scheduling_a_publish_does_not_stall_the_sender(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Soak 2026-12-06 (seed soak1-20261206, the long profile without kills): after a link
    cut the gateway reconnected again and again but sent nothing more for 13 minutes; the
    spool stayed at its cap, evicting. The session had died right after the sender created
    a publish task, the group cancelled that task before its first step, so its `finally`
    never gave the in-flight count back, and every later pause (signing held, no
    subscriber) waited for an idle that never came."""
    port = free_port()
    cfg = make_config(tmp_path, mosquitto, uplink={"port": port, "require_subscriber": False})
    ctx = make_ctx(cfg, tmp_path)
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill_backlog(tel, 5, 50)
        up = tel.uplink
        assert up is not None and tel.status()["telemetry"]["connected"] is False

        class SessionDies(asyncio.TaskGroup):
            """The first publish task is cancelled before its first step, as the group
            does when the session dies right after it was created; the next one finds
            the session gone."""

            created = 0

            def create_task(self, coro: Any, **kw: Any) -> Any:
                self.created += 1
                if self.created > 1:
                    coro.close()
                    raise aiomqtt.MqttError("the session is gone")
                task = super().create_task(coro, **kw)
                task.cancel()
                return task

        with pytest.raises((aiomqtt.MqttError, ExceptionGroup)):
            async with SessionDies() as tg:
                await up._sender(None, tg)  # type: ignore[arg-type]  # no publish starts
        assert tg.created == 2
        assert up.stats.inflight == 0 and up._idle.is_set()
        # ... and the next session, which starts with a pause (a signing failure held a
        # row), still drains the backlog
        up._hold_for(0.05)
        proxy = MqttProxy(mosquitto.port)
        await proxy.start(port)
        try:
            await until(lambda: tel.spool.stats.backlog_batches == 0, 30)
        finally:
            await proxy.stop()


async def test_a_session_start_that_never_completes_ends_the_session(
    tmp_path: Path, mosquitto: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every await inside the birth is bounded on its own, except the spool's answers;
    the session start as a whole has `BIRTH_TIMEOUTS` ack timeouts, so a spool call that
    never answers costs one session, not the uplink (soak 2026-12-06, the 30-minute wedge)."""
    port = free_port()
    cfg = make_config(
        tmp_path,
        mosquitto,
        uplink={"port": port, "require_subscriber": False, "ack_timeout_s": 0.5},
    )
    ctx = make_ctx(cfg, tmp_path)
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill_backlog(tel, 3, 50)
        up = tel.uplink
        assert up is not None
        real = tel.spool.backlog_schema_versions
        asked: list[float] = []

        def first_never_answers() -> Any:
            asked.append(time.monotonic())
            return concurrent.futures.Future() if len(asked) == 1 else real()

        monkeypatch.setattr(tel.spool, "backlog_schema_versions", first_never_answers)
        proxy = MqttProxy(mosquitto.port)
        await proxy.start(port)
        try:
            await until(lambda: "session start" in (up.stats.last_error or ""), 10)
            assert "within 1.5 s" in (up.stats.last_error or "")
            assert up.stats.reconnects >= 1
            # the next session is born and drains the backlog
            await until(lambda: tel.spool.stats.backlog_batches == 0, 30)
            assert len(asked) >= 2
        finally:
            await proxy.stop()


async def test_login_with_a_password_file(tmp_path: Path, mosquitto_auth: Any) -> None:
    """`uplink.username` + `password_file` against a broker that refuses anonymous
    clients. The uplink used to make its client in a worker thread when a password file
    was set, where aiomqtt cannot bind it to the event loop: it never connected."""
    b = mosquitto_auth
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text(b.password + "\n")
    bad.write_text("not-the-password\n")
    up = {"username": "gw", "password_file": str(good), "require_subscriber": False}
    async with telemetry_in(
        make_ctx(make_config(tmp_path, b, uplink=up), tmp_path), HubStandIn([])
    ) as tel:
        await _fill_backlog(tel, 2, 10)
        await until(lambda: tel.spool.stats.backlog_batches == 0, 20)
        assert tel.status()["telemetry"]["connected"]
    other = tmp_path / "other"
    other.mkdir()
    up = {**up, "password_file": str(bad)}
    async with telemetry_in(
        make_ctx(make_config(other, b, uplink=up), other), HubStandIn([])
    ) as tel:
        await until(lambda: tel.uplink is not None and tel.uplink.stats.connect_failures >= 2, 20)
        assert tel.status()["telemetry"]["connected"] is False
        err = (tel.uplink.stats.last_error or "").lower()
        assert "not authorized" in err or "bad user name or password" in err, err
