"""Signed remote operations against a running simulated daemon and a real mosquitto:
operator-signed commands run and get gateway-signed replies; unsigned, publisher-signed,
replayed, wrong-gateway, wrong-command and expired ones are refused, counted, and the
connection survives; the retained reported state is signed by the identity key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgerund.backend import twin as T
from edgerund.publisher.build import load_private
from tests.helpers.daemon import simulated

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "models" / "dev-keys"
OPERATOR = load_private(DEV / "OPERATOR-DEVELOPMENT-ONLY.key")
PUBLISHER = load_private(DEV / "DEVELOPMENT-ONLY.key")
BASE = "tlm/v1/sim/sim-gw/cmd"


async def request(broker: Any, name: str, payload: bytes, timeout_s: float = 20.0) -> bytes:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"{BASE}/{name}/reply", qos=1)
        await c.publish(f"{BASE}/{name}", payload, qos=1)
        async with asyncio.timeout(timeout_s):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                return msg.payload
    raise AssertionError("no reply")


async def retained(broker: Any, topic: str, timeout_s: float = 20.0) -> bytes:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout_s):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                return msg.payload
    raise AssertionError("nothing retained")


@pytest.fixture
def daemon(tmp_path: Path, mosquitto: Any) -> Any:
    d = simulated(
        tmp_path,
        {
            "uplink": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port},
            "twin": {"check_interval_s": 0.5},
        },
    )
    with d:
        d.wait_ready(60)
        yield d


async def test_signed_commands_and_refusals(daemon: Any, mosquitto: Any) -> None:
    pem = daemon.call("identity")["signing_key_pem"].encode()
    await asyncio.sleep(1.0)  # the uplink subscribes to cmd/+ after connecting

    def error(data: bytes) -> str:
        return str(json.loads(data)["error"]["code"])

    # unsigned, publisher-signed, wrong gateway, wrong command, expired: refused
    assert error(await request(mosquitto, "status", b"{}")) == "unsigned"
    assert error(await request(mosquitto, "status", b"[1]")) == "malformed"
    bare = json.dumps({"signed": {"type": "edgerund-command"}, "signatures": []}).encode()
    assert error(await request(mosquitto, "status", bare)) == "unsigned"
    pub = T.command("status", "sim-gw", {}, PUBLISHER)
    assert error(await request(mosquitto, "status", pub)) == "wrong_role"
    other = T.command("status", "other-gw", {}, OPERATOR)
    assert error(await request(mosquitto, "status", other)) == "wrong_gateway"
    moved = T.command("status", "sim-gw", {}, OPERATOR)
    assert error(await request(mosquitto, "reload", moved)) == "wrong_command"
    old = T.command("status", "sim-gw", {}, OPERATOR, ts_ms=int((time.time() - 3600) * 1000))
    assert error(await request(mosquitto, "status", old)) == "expired"
    tampered = json.loads(T.command("status", "sim-gw", {}, OPERATOR))
    tampered["signed"]["args"] = {"x": 1}
    assert (
        error(await request(mosquitto, "status", json.dumps(tampered).encode())) == "bad_signature"
    )
    unsigned_resend = json.dumps({"epoch": 1, "from_seq": 1, "to_seq": 2}).encode()
    assert error(await request(mosquitto, "resend", unsigned_resend)) == "unsigned"

    # signed: runs, and the reply is signed by the gateway
    nonce = os.urandom(16).hex()
    good = T.command("status", "sim-gw", {"id": 7}, OPERATOR, nonce=nonce)
    body = T.verify_reply(await request(mosquitto, "status", good), pem, nonce=nonce)
    assert body["ok"] is True and body["status"]["gateway"]["id"] == "sim-gw"
    # the same bytes again: a replay
    assert error(await request(mosquitto, "status", good)) == "replay"

    # remote attestation: a fresh quote for the verifier's nonce
    vnonce = os.urandom(16).hex()
    nonce = os.urandom(16).hex()
    att = T.command("attest", "sim-gw", {"nonce": vnonce}, OPERATOR, nonce=nonce)
    body = T.verify_reply(await request(mosquitto, "attest", att), pem, nonce=nonce)
    assert body["ok"] is True and body["attestation"]["nonce"] == vnonce

    # remote rollback reaches the updates component; its refusal is a signed error reply
    nonce = os.urandom(16).hex()
    rb = T.command("rollback", "sim-gw", {"model": "motor-ae"}, OPERATOR, nonce=nonce)
    body = T.verify_reply(await request(mosquitto, "rollback", rb), pem, nonce=nonce)
    assert body["ok"] is False and body["error"]["code"] == "no_previous"
    unsigned_rb = json.dumps({"model": "motor-ae"}).encode()
    assert error(await request(mosquitto, "rollback", unsigned_rb)) == "unsigned"

    # support-bundle: built on the gateway, pulled in signed chunks, digest in a signed reply
    async def signed(name: str, args: dict[str, Any]) -> dict[str, Any]:
        n = os.urandom(16).hex()
        req = T.command(name, "sim-gw", args, OPERATOR, nonce=n)
        return T.verify_reply(await request(mosquitto, name, req), pem, nonce=n)

    head = await signed("support-bundle", {})
    assert head["ok"] is True and head["chunks"] >= 1
    parts = [
        base64.b64decode(
            (await signed("support-bundle", {"bundle_id": head["bundle_id"], "chunk": i}))["data"]
        )
        for i in range(head["chunks"])
    ]
    blob = b"".join(parts)
    assert len(blob) == head["size"] and hashlib.sha256(blob).hexdigest() == head["sha256"]
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        names = {Path(m.name).name for m in tf.getmembers()}
    assert {"status.json", "log.json", "config.json"} <= names
    assert error(await request(mosquitto, "support-bundle", b"{}")) == "unsigned"

    st = daemon.call("status")["twin"]["commands"]
    assert st["refused_by_reason"]["wrong_role"] == 1
    assert st["refused_by_reason"]["replay"] == 1
    assert st["refused"] >= 8
    assert daemon.call("status")["telemetry"]["connected"] is True  # never disconnected

    # reported state: retained and signed by the identity key
    doc = T.verify_reported(await retained(mosquitto, "twin/v1/sim/sim-gw/reported"), pem)
    assert doc["gateway"] == "sim-gw" and doc["v"] == 1
    assert doc["identity"]["kind"] == "software"
    assert doc["models"] and doc["models"][0]["name"] == "motor-ae"


def test_cli_remote_attest_verified(daemon: Any, mosquitto: Any, tmp_path: Path) -> None:
    """`edgerund twin cmd ... attest` over the broker, reply verified against the gateway
    key, and the quote verified by `edgerund attest verify` (software identity here)."""
    import subprocess
    import sys

    ident = daemon.call("identity")
    pem = tmp_path / "gw.pem"
    pem.write_text(ident["signing_key_pem"])
    ak = tmp_path / "ak.pem"
    ak.write_text(ident["ak_pem"])
    vnonce = os.urandom(16).hex()
    common = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--site", "sim"]
    time.sleep(1.0)
    out = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "twin", "cmd", "sim-gw", "attest",
         json.dumps({"nonce": vnonce}), "--key", str(DEV / "OPERATOR-DEVELOPMENT-ONLY.key"),
         "--public-key", str(pem), *common],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    result = tmp_path / "quote.json"
    result.write_text(json.dumps(json.loads(out.stdout)["attestation"]))
    ok = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "attest", "verify", "--result", str(result),
         "--nonce", vnonce, "--ak-pem", str(ak), "--allow-software"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.startswith("VALID"), ok.stdout + ok.stderr
    stale = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "attest", "verify", "--result", str(result),
         "--nonce", "00" * 16, "--ak-pem", str(ak), "--allow-software"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stale.returncode == 1
    # a publisher key cannot command: refused, exit 1
    bad = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "twin", "cmd", "sim-gw", "status",
         "--key", str(DEV / "DEVELOPMENT-ONLY.key"), *common],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "wrong_role" in bad.stdout
    got = subprocess.run(
        [sys.executable, "-m", "edgerund.cli", "twin", "get", "sim-gw", "--public-key", str(pem),
         *common],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0 and json.loads(got.stdout)["gateway"] == "sim-gw"
