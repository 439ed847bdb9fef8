"""Twin benchmark: the shipped daemon (simulated plant) and a real mosquitto on loopback.

Figures:
- `desired_to_applied_ms` p50/p99: from publishing an operator-signed desired document
  (a live patch: a loop's policy) to the gateway's signed reported state acknowledging
  that version as applied. It includes the probation (`--probation-s`, reported apart
  as `probation_ms`), since a desired state is acknowledged only after it.
- `reported_bytes`: the signed reported document as published (JSON, signature included).
- `commands_per_s`: operator-signed `status` commands, verified by the gateway (signature,
  replay window, nonce cache), run, and answered with a gateway-signed reply, pipelined
  `--window` at a time; baseline alongside: the unsigned, exempt `rebirth` over the same
  broker and dispatcher (`baseline_commands_per_s`), and their ratio.
- `missed_ticks`: control-loop ticks missed while the patches were applied (target 0),
  beside `missed_ticks_idle_baseline`: as long again with no patch (the machine's load).

Usage: python benchmarks/twin.py [--patches 20] [--commands 200] [--probation-s 0.5]
The last line is one JSON object with every figure (units in the names).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers.mosquitto import Broker
from edgerund.backend import twin as T
from edgerund.publisher.build import load_private
from edgerund.toolkit.daemonproc import simulated

REPO = Path(__file__).resolve().parents[1]
OPERATOR = load_private(REPO / "models" / "dev-keys" / "OPERATOR-DEVELOPMENT-ONLY.key")
GW = "sim-gw"
CMD = f"tlm/v1/sim/{GW}/cmd"


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(xs), q)), 2) if xs else float("nan")


async def desired_phase(broker: Broker, n: int) -> tuple[list[float], int]:
    times: list[float] = []
    size = 0
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"twin/v1/sim/{GW}/reported", qos=1)
        for v in range(1, n + 1):
            patch = {"loops": {"cabinet": {"policy": {"on_ticks": 5 + v % 7}}}}
            data = T.desired(GW, v, patch, OPERATOR)
            t0 = time.perf_counter()
            await c.publish(f"twin/v1/sim/{GW}/desired", data, qos=1, retain=True)
            async with asyncio.timeout(60):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    doc = json.loads(msg.payload)["signed"]
                    if (doc.get("desired") or {}).get("applied_version") == v:
                        times.append((time.perf_counter() - t0) * 1e3)
                        size = len(msg.payload)
                        break
    return times, size


async def command_phase(broker: Broker, n: int, window: int, signed: bool) -> float:
    name = "status" if signed else "rebirth"
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"{CMD}/{name}/reply", qos=1)
        payloads = [
            T.command(name, GW, {}, OPERATOR, nonce=os.urandom(16).hex()) if signed else b"{}"
            for _ in range(n)
        ]
        got = 0
        sent = 0
        t0 = time.perf_counter()
        while sent < min(window, n):
            await c.publish(f"{CMD}/{name}", payloads[sent], qos=1)
            sent += 1
        async with asyncio.timeout(120):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                if signed:
                    assert "signed" in json.loads(msg.payload), msg.payload[:200]
                got += 1
                if sent < n:
                    await c.publish(f"{CMD}/{name}", payloads[sent], qos=1)
                    sent += 1
                if got == n:
                    break
        return n / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = Path(tempfile.mkdtemp(prefix="twin-bench-"))
    broker = Broker(binary, work / "mq")
    broker.workdir.mkdir(parents=True)
    broker.start()
    (work / "gw").mkdir()
    d = simulated(
        work / "gw",
        {
            "uplink": {"enabled": True, "host": broker.host, "port": broker.port},
            "twin": {
                "check_interval_s": 0.2,
                "probation_s": args.probation_s,
                "probation_missed_ticks_max": 1_000_000,
                "allow": ["loops.*.policy"],
            },
            "logging": {"level": "warning"},
        },
    )
    try:
        with d:
            d.wait_ready(60)
            await asyncio.sleep(2.0)
            t_patch = time.perf_counter()
            before = sum(lp["missed"] for lp in d.call("status")["loops"])
            times, size = await desired_phase(broker, args.patches)
            after = sum(lp["missed"] for lp in d.call("status")["loops"])
            # baseline: missed ticks over as long again with no patch applied (machine load)
            await asyncio.sleep(time.perf_counter() - t_patch)
            idle = sum(lp["missed"] for lp in d.call("status")["loops"])
            base = await command_phase(broker, args.commands, args.window, signed=False)
            cps = await command_phase(broker, args.commands, args.window, signed=True)
            refused = d.call("status")["twin"]["commands"]["refused"]
    finally:
        broker.stop()
    return {
        "desired_to_applied_p50_ms": pct(times, 50),
        "desired_to_applied_p99_ms": pct(times, 99),
        "probation_ms": args.probation_s * 1e3,
        "desired_to_applied_minus_probation_p50_ms": round(
            pct(times, 50) - args.probation_s * 1e3, 2
        ),
        "reported_bytes": size,
        "commands_per_s": round(cps, 1),
        "baseline_commands_per_s": round(base, 1),
        "signed_vs_unsigned_ratio": round(cps / base, 3) if base else None,
        "commands_refused": refused,
        "missed_ticks": after - before,
        "missed_ticks_idle_baseline": idle - after,
        "patches": len(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=20)
    ap.add_argument("--commands", type=int, default=200)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--probation-s", type=float, default=0.5)
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    print(
        f"desired -> applied: p50 {res['desired_to_applied_p50_ms']} ms, p99 "
        f"{res['desired_to_applied_p99_ms']} ms (probation {res['probation_ms']:.0f} ms included)"
    )
    print(f"reported state: {res['reported_bytes']} bytes signed")
    print(
        f"commands: {res['commands_per_s']}/s signed+verified+signed reply vs "
        f"{res['baseline_commands_per_s']}/s unsigned rebirth (ratio {res['signed_vs_unsigned_ratio']})"
    )
    print(
        f"missed control ticks while patching: {res['missed_ticks']} "
        f"(same time idle: {res['missed_ticks_idle_baseline']})"
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
