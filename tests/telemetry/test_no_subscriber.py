"""Issue #19: a batch the broker PUBACKs with 0x10 (no matching subscribers) was delivered
to nobody, so it stays in the spool until a subscriber is there (`uplink.require_subscriber`).

A real mosquitto with no subscriber on the data topics answers every QoS 1 batch with
0x10 and drops it. The gateway's publishes are counted on the wire by a proxy (not by the
uplink's own counters), so a busy retry loop would show."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgerund.config.loader import parse_config
from edgerund.errors import ConfigError
from edgerund.telemetry.codec import Cls, SeriesBlock
from edgerund.telemetry.component import TelemetryComponent
from tests.fixtures.binaries import free_port
from tests.telemetry.conftest import HubStandIn, make_config, make_ctx, telemetry_in, until
from tests.telemetry.mqtt_proxy import MqttProxy

N_BATCHES = 20
DATA = ("/evt", "/agg", "/raw")


async def _fill(tel: TelemetryComponent, n: int) -> list[int]:
    rng = np.random.default_rng(19)
    seqs = []
    for i in range(n):
        t = 1_700_000_000_000 + i * 60_000 + np.arange(50, dtype=np.int64) * 100
        v = rng.integers(-20000, 20000, 50)
        seqs.append(
            await asyncio.wrap_future(
                tel.spool.append(Cls.RAW, [SeriesBlock(1, t, (v,), (-3,))], tel.schema_ver)
            )
        )
    await asyncio.wrap_future(tel.spool.flush())
    return seqs


def _data_publishes(proxy: MqttProxy) -> list[float]:
    return [p.t for p in proxy.publishes if p.topic.endswith(DATA)]


async def test_no_subscriber_holds_batches_until_a_consumer_subscribes(
    tmp_path: Path, mosquitto: Any, collector_factory: Any
) -> None:
    proxy = MqttProxy(mosquitto.port)
    port = free_port()
    cfg = make_config(
        tmp_path,
        mosquitto,
        uplink={"port": port, "no_subscriber_retry_s": 0.5, "no_subscriber_retry_max_s": 2.0},
    )
    ctx = make_ctx(cfg, tmp_path)
    try:
        async with telemetry_in(ctx, HubStandIn([])) as tel:
            st = lambda: tel.status()["telemetry"]  # noqa: E731
            seqs = await _fill(tel, N_BATCHES)  # the backlog is there before the link
            await proxy.start(port)
            await until(lambda: st()["no_subscriber_held_batches"] >= 1, 20, "first 0x10")
            assert st()["no_subscriber"] is True
            held0 = st()["no_subscriber_held_batches"]
            await asyncio.sleep(5.0)  # nobody subscribes: the broker would drop every batch
            wire = _data_publishes(proxy)
            # Held, not delivered: every row is still in the spool, none counted sent.
            assert tel.spool.stats.backlog_batches == N_BATCHES
            assert st()["sent_batches"] == 0 and st()["connected"] is True
            # Retried (the counter rises) but paced: one round of at most inflight_max
            # (8) publishes per pause of 0.5 s doubling to 2 s (jittered down to 0.75x:
            # 0.375 + 0.75 + 1.5 + 1.5 + ...), i.e. at most 7 rounds in the ~5 s since the
            # first. Without the pause the 20 rows would go out back to back, and again.
            assert st()["no_subscriber_held_batches"] > held0, "held rows were never retried"
            assert 0 < len(wire) <= 7 * 8, f"{len(wire)} publishes in 5 s: a busy loop"
            # The pauses grow: the last gap between rounds is longer than the first.
            starts = [t for i, t in enumerate(wire) if i == 0 or t - wire[i - 1] > 0.25]
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            assert len(gaps) >= 2 and gaps[-1] > gaps[0], gaps

            # A consumer joins through a shared subscription, as the reference one does.
            col = await collector_factory(mosquitto, client_id="late-consumer", group="g19")
            await until(lambda: tel.spool.stats.backlog_batches == 0, 30, "spool drained")
            await col.wait_for(lambda: {s for _, s in col.seqs()} >= set(seqs), 10)
            assert st()["no_subscriber"] is False
            assert st()["sent_batches"] == N_BATCHES
    finally:
        await proxy.stop()
    arrived = [r["seq"] for r in col.of("series")]
    assert arrived == seqs, f"not every batch once and in order: {arrived}"
    assert col.consumer.gaps() == []


async def test_require_subscriber_false_keeps_0x10_as_delivered(
    tmp_path: Path, mosquitto: Any
) -> None:
    cfg = make_config(tmp_path, mosquitto, uplink={"require_subscriber": False})
    ctx = make_ctx(cfg, tmp_path)
    async with telemetry_in(ctx, HubStandIn([])) as tel:
        await _fill(tel, N_BATCHES)
        # MQTT's view: PUBACKed means delivered, although the broker dropped them.
        await until(lambda: tel.spool.stats.backlog_batches == 0, 30, "spool drained")
        st = tel.status()["telemetry"]
        assert st["sent_batches"] == N_BATCHES
        assert st["no_subscriber_held_batches"] == 0 and st["no_subscriber"] is False


def test_no_subscriber_retry_bounds_are_checked() -> None:
    text = (
        "gateway:\n  id: gw1\n  site: lab\n"
        "uplink:\n  no_subscriber_retry_s: 60\n  no_subscriber_retry_max_s: 30\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/edgerund/edgerund.yaml")
    msg = str(info.value)
    assert "uplink.no_subscriber_retry_s" in msg and "got 60" in msg, msg
    cfg = parse_config("gateway:\n  id: gw1\n  site: lab\n", "/etc/edgerund/edgerund.yaml")
    assert cfg.uplink.require_subscriber is True  # the default holds 0x10 batches


def test_status_line_says_when_batches_are_held_for_a_subscriber() -> None:
    import io

    from rich.console import Console

    from edgerund.ctl.render import render_status

    def line(held: bool) -> str:
        out = io.StringIO()
        tel = {"connected": True, "backlog_batches": 7, "no_subscriber": held}
        render_status(Console(file=out, width=80), {"version": "x", "telemetry": tel})
        return " ".join(out.getvalue().split())  # the renderer wraps long lines

    assert "lost samples 0, HELD: no subscriber on the broker" in line(True)
    assert "HELD" not in line(False)
