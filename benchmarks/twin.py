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
- `missed_ticks`: control-loop ticks missed (all loops) while the patches were applied
  (target 0), beside `missed_ticks_idle_baseline`: after each patch, a window as long as
  that patch took with no patch (interleaved, so a change of the machine's load over the
  run hits both sides alike). The daemon runs at the shipped unit's `Nice=` (`--nice`).

Usage: python benchmarks/twin.py [--patches 20] [--commands 200] [--probation-s 0.5] [--nice N]
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

from benchmarks.peers import unit
from benchmarks.peers.mosquitto import Broker
from edgerund.backend import twin as T
from edgerund.publisher.build import load_private
from edgerund.toolkit.daemonproc import DaemonProc, simulated

REPO = Path(__file__).resolve().parents[1]
OPERATOR = load_private(REPO / "models" / "dev-keys" / "OPERATOR-DEVELOPMENT-ONLY.key")
GW = "sim-gw"
CMD = f"tlm/v1/sim/{GW}/cmd"


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(xs), q)), 2) if xs else float("nan")


def missed(d: DaemonProc) -> int:
    return sum(int(lp["missed"]) for lp in d.call("status")["loops"])


async def desired_phase(broker: Broker, d: DaemonProc, n: int) -> dict[str, Any]:
    """n patches; after each one an idle window as long as it took (the baseline)."""
    times: list[float] = []
    size = 0
    patching = idle = 0
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"twin/v1/sim/{GW}/reported", qos=1)
        for v in range(1, n + 1):
            patch = {"loops": {"cabinet": {"policy": {"on_ticks": 5 + v % 7}}}}
            data = T.desired(GW, v, patch, OPERATOR)
            m0 = await asyncio.to_thread(missed, d)
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
            m1 = await asyncio.to_thread(missed, d)
            await asyncio.sleep(time.perf_counter() - t0)  # as long, no patch
            m2 = await asyncio.to_thread(missed, d)
            patching += m1 - m0
            idle += m2 - m1
    return {"times": times, "size": size, "missed": patching, "idle_missed": idle}


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
        prefix=unit.nice_prefix(args.nice),
    )
    try:
        with d:
            d.wait_ready(60)
            await asyncio.sleep(2.0)
            ph = await desired_phase(broker, d, args.patches)
            times, size = ph["times"], ph["size"]
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
        "missed_ticks": ph["missed"],
        "missed_ticks_idle_baseline": ph["idle_missed"],
        "patches": len(times),
        "nice": args.nice,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=20)
    ap.add_argument("--commands", type=int, default=200)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--probation-s", type=float, default=0.5)
    ap.add_argument(
        "--nice",
        type=int,
        default=unit.nice(),
        help="run the daemon at this nice level (default: the shipped unit's Nice=)",
    )
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
