"""Replay of a captured signed command across a daemon restart (docs/twin.md §3): the nonce
cache is persisted, so the captured bytes are refused as a replay by the restarted daemon
while they are still inside the time window; without a readable cache the restarted
daemon refuses every command signed before its start. Against the running simulated
daemon and a real mosquitto; fails without the persisted cache (the window alone would
admit the replay)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgerund.backend import twin as T
from edgerund.errors import TrustError
from edgerund.publisher.build import load_private
from edgerund.twin.auth import ReplayGuard
from tests.helpers.daemon import DaemonProcess, simulated

REPO = Path(__file__).resolve().parents[2]
OPERATOR = load_private(REPO / "models" / "dev-keys" / "OPERATOR-DEVELOPMENT-ONLY.key")
BASE = "tlm/v1/sim/sim-gw/cmd"


def _daemon(tmp: Path, broker: Any) -> DaemonProcess:
    return simulated(tmp, {"uplink": {"enabled": True, "host": broker.host, "port": broker.port}})


async def _request(broker: Any, name: str, payload: bytes) -> dict[str, Any]:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"{BASE}/{name}/reply", qos=1)
        await c.publish(f"{BASE}/{name}", payload, qos=1)
        async with asyncio.timeout(30):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                doc = json.loads(msg.payload)
                return dict(doc["signed"]["reply"] if "signed" in doc else doc)
    raise AssertionError("no reply")


async def _until_dispatching(broker: Any) -> None:
    """The uplink subscribes to cmd/+ after connecting: a fresh signed status gets a reply."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with asyncio.timeout(5):
                req = T.command("status", "sim-gw", {}, OPERATOR)
                if (await _request(broker, "status", req)).get("ok"):
                    return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


def test_guard_dump_restore_is_checked() -> None:
    g = ReplayGuard(300)
    now = 1_800_000_000_000
    g.check("ab" * 8, now - 1000, now)
    g2 = ReplayGuard(300)
    doc = json.loads(json.dumps(g.dump()))  # as the file holds it
    doc["nonces"] += [["NOT-HEX", now], ["cd" * 8, "x"], ["ef" * 8, now - 10_000_000], 7]
    assert g2.restore(doc, now) == 1  # only the genuine, in-window entry comes back
    with pytest.raises(TrustError) as ei:
        g2.check("ab" * 8, now - 1000, now)
    assert ei.value.code == "replay"
    with pytest.raises(ValueError):
        g2.restore({"v": 2}, now)


async def test_captured_command_refused_after_restart(tmp_path: Path, mosquitto: Any) -> None:
    d = _daemon(tmp_path, mosquitto)
    with d:
        d.wait_ready(90)
        await _until_dispatching(mosquitto)
        nonce = os.urandom(16).hex()
        captured = T.command("status", "sim-gw", {"id": 1}, OPERATOR, nonce=nonce)
        assert (await _request(mosquitto, "status", captured))["ok"] is True
        cache = tmp_path / "state" / "twin" / "nonces.json"
        deadline = time.monotonic() + 10
        while nonce not in (cache.read_text() if cache.exists() else ""):
            assert time.monotonic() < deadline, "the nonce never reached the cache file"
            await asyncio.sleep(0.1)
        d.kill()  # no clean shutdown: what is on disk is what counts

    d2 = _daemon(tmp_path, mosquitto)
    with d2:
        d2.wait_ready(90)
        await _until_dispatching(mosquitto)
        # the same bytes, well inside the 300 s window: a replay
        reply = await _request(mosquitto, "status", captured)
        assert reply["ok"] is False and reply["error"]["code"] == "replay"
        assert "already used" in reply["error"]["message"]
        assert d2.call("status")["twin"]["commands"]["refused_by_reason"]["replay"] == 1

    # no cache at all (deleted): the floor is the start, the capture is still refused
    (tmp_path / "state" / "twin" / "nonces.json").unlink()
    d3 = _daemon(tmp_path, mosquitto)
    with d3:
        d3.wait_ready(90)
        await _until_dispatching(mosquitto)
        reply = await _request(mosquitto, "status", captured)
        assert reply["ok"] is False and reply["error"]["code"] == "replay"
        assert "sign the command again" in reply["error"]["message"]
