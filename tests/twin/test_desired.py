"""Desired state against simulated daemons and a real mosquitto: a signed patch is applied,
acknowledged in the reported state with its version, survives a daemon restart (re-verified
from its signature); forbidden keys, replays, wrong gateways, expired, unsigned and
publisher-signed documents are refused with the reason in the reported state; a patch
that validates but makes a sensor fail is reverted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from edgerund.backend import twin as T
from edgerund.publisher.build import load_private
from tests.helpers.daemon import DaemonProcess, simulated

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "models" / "dev-keys"
OPERATOR = load_private(DEV / "OPERATOR-DEVELOPMENT-ONLY.key")
PUBLISHER = load_private(DEV / "DEVELOPMENT-ONLY.key")
ALLOW = [
    "loops.*.policy",
    "sensors.*.rate_hz",
    "sensors.*.read_timeout_ms",
    "sensors.*.fail_after",
    "logging.level",
    "telemetry.*",
]


def twin_daemon(tmp_path: Path, broker: Any, gw: str = "sim-gw", **twin: Any) -> DaemonProcess:
    tmp_path.mkdir(exist_ok=True)
    return simulated(
        tmp_path,
        {
            "gateway": {"id": gw},
            "uplink": {"enabled": True, "host": broker.host, "port": broker.port},
            "twin": {
                "check_interval_s": 0.5,
                "probation_s": 2.0,
                "probation_missed_ticks_max": 100000,  # 2 shared CPUs: judge sensors here
                "allow": ALLOW,
                **twin,
            },
        },
    )


async def publish(broker: Any, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.publish(topic, payload, qos=1, retain=True)


async def reported_until(
    broker: Any, gw: str, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 40.0
) -> dict[str, Any]:
    last: dict[str, Any] = {}
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"twin/v1/sim/{gw}/reported", qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    last = json.loads(msg.payload)["signed"]
                    if pred(last):
                        return last
        except TimeoutError:
            raise AssertionError(f"reported never matched; last: {last.get('desired')}") from None
    raise AssertionError("unreachable")


def desired_is(
    version: int | None, outcome: str, reason: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    def pred(doc: dict[str, Any]) -> bool:
        d = doc.get("desired") or {}
        return (
            d.get("version") == version
            and d.get("outcome") == outcome
            and (reason is None or d.get("reason") == reason)
        )

    return pred


async def test_desired_applied_refused_and_kept_across_restart(
    tmp_path: Path, mosquitto: Any
) -> None:
    a = twin_daemon(tmp_path / "a", mosquitto, "sim-gw")
    b = twin_daemon(tmp_path / "b", mosquitto, "sim-gw2")
    topic_a = "twin/v1/sim/sim-gw/desired"
    topic_b = "twin/v1/sim/sim-gw2/desired"
    with a, b:
        a.wait_ready(60)
        b.wait_ready(60)
        await reported_until(mosquitto, "sim-gw", lambda d: True)

        # applied and acknowledged with the new version; the origin of the key is the twin
        patch = {"loops": {"cabinet": {"policy": {"on_ticks": 12}}}, "logging": {"level": "debug"}}
        await publish(mosquitto, topic_a, T.desired("sim-gw", 1, patch, OPERATOR))
        doc = await reported_until(mosquitto, "sim-gw", desired_is(1, "applied"))
        assert doc["config"]["origin"]["loops.cabinet.policy.on_ticks"] == "twin v1"
        view = a.call("config")
        cabinet = next(lp for lp in view["config"]["loops"] if lp["id"] == "cabinet")
        assert cabinet["policy"]["on_ticks"] == 12
        assert view["origin"]["logging.level"] == "twin v1"
        ctl = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgerund.ctl", "--socket", a.socket_path, "config"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert ctl.returncode == 0, ctl.stderr
        assert "loops.cabinet.policy.on_ticks = 12  [twin v1]" in ctl.stdout
        assert "loops.cabinet.period_ms = 100  [file]" in ctl.stdout

        # the same document for another gateway, published to that gateway: refused
        await publish(mosquitto, topic_b, T.desired("sim-gw", 5, patch, OPERATOR))
        await reported_until(mosquitto, "sim-gw2", desired_is(None, "refused", "wrong_gateway"))

        # replay of an older/equal version, forbidden keys, expired, unsigned, wrong role
        cases: list[tuple[bytes, str]] = [
            (T.desired("sim-gw", 1, {"logging": {"level": "info"}}, OPERATOR), "replay"),
            (
                T.desired("sim-gw", 10, {"identity": {"kind": "software"}}, OPERATOR),
                "forbidden_key",
            ),
            (
                T.desired("sim-gw", 11, {"loops": {"motor": {"period_ms": 5}}}, OPERATOR),
                "forbidden_key",
            ),
            (
                T.desired("sim-gw", 12, {"logging": {"level": "info"}}, OPERATOR, expires_s=-10),
                "expired",
            ),
            (T.desired("sim-gw", 13, {"logging": {"level": "info"}}, PUBLISHER), "wrong_role"),
            (
                json.dumps(
                    {
                        "signed": {"type": "edgerund-desired", "gateway": "sim-gw", "version": 14},
                        "signatures": [],
                    }
                ).encode(),
                "unsigned",
            ),
        ]
        for data, reason in cases:
            await publish(mosquitto, topic_a, data)
            await reported_until(
                mosquitto, "sim-gw", lambda d, r=reason: (d.get("desired") or {}).get("reason") == r
            )

        # validates only through the loader: an invalid value names the key path
        await publish(
            mosquitto, topic_a, T.desired("sim-gw", 20, {"logging": {"level": "loud"}}, OPERATOR)
        )
        doc = await reported_until(mosquitto, "sim-gw", desired_is(20, "refused", "invalid"))
        assert "logging.level" in doc["desired"]["message"]
        assert a.call("status")["twin"]["desired_refused"] >= 7

    # a restart: the applied v1 is re-verified from its signature and runs again
    a2 = twin_daemon(tmp_path / "a", mosquitto, "sim-gw")
    with a2:
        a2.wait_ready(60)
        view = a2.call("config")
        cabinet = next(lp for lp in view["config"]["loops"] if lp["id"] == "cabinet")
        assert cabinet["policy"]["on_ticks"] == 12
        assert view["desired"]["applied_version"] == 1

        def applied_v1(doc: dict[str, Any]) -> bool:
            return (doc.get("desired") or {}).get("applied_version") == 1

        await reported_until(mosquitto, "sim-gw", applied_v1)
        # the broker restarts: the reported state is there again (retained, republished)
        mosquitto.stop()
        mosquitto.start()
        await reported_until(mosquitto, "sim-gw", applied_v1, timeout_s=60)


async def test_unhealthy_patch_is_reverted(tmp_path: Path, mosquitto: Any) -> None:
    d = twin_daemon(tmp_path, mosquitto, probation_s=4.0)
    with d:
        d.wait_ready(60)
        await asyncio.sleep(3.0)  # every sensor ok before the change
        before = d.call("status")
        assert all(s["state"] == "ok" for s in before["sensors"] if s["id"] == "cabinet")
        # A 1 ms read timeout fails most reads of the BME280 (a burst through the bus worker
        # takes about that long), not all: at its 1 Hz a run once read it within 1 ms for
        # 4 s, past the probation (a loaded run, 2026-12-06). At 10 Hz a failing read all but surely comes
        # within the probation, and `reprobe_s` (10 s) keeps it failed to its end.
        patch = {"sensors": {"cabinet": {"read_timeout_ms": 1, "fail_after": 1, "rate_hz": 10}}}
        t0 = time.monotonic()
        await publish(
            mosquitto, "twin/v1/sim/sim-gw/desired", T.desired("sim-gw", 1, patch, OPERATOR)
        )
        doc = await reported_until(mosquitto, "sim-gw", desired_is(1, "reverted", "sensors_failed"))
        assert time.monotonic() - t0 >= 4.0
        assert doc["desired"]["message"].endswith("not now: cabinet")
        sensor = next(s for s in d.call("config")["config"]["sensors"] if s["id"] == "cabinet")
        assert sensor["read_timeout_ms"] != 1  # the previous config came back
        assert not (Path(tmp_path) / "state" / "twin" / "applied.json").exists()
