"""Staged rollouts against ten REAL simulated gateways (edgerund/toolkit/simfleet.py: the
daemon with its twin and update pipeline, light config) on one mosquitto, with the state
in a real PostgreSQL, driven by `edgerund fleet rollout` as a process:

- a good bundle goes out wave by wave (1, 10 %, 50 %, 100 %), the tool is killed with
  SIGKILL once wave 2 is out and resumed from the database, and every gateway reports
  the bundle committed and runs it, each having received exactly one desired document;
- then a bad bundle (golden vectors its model does not reproduce: the device's precheck
  refuses it) halts after the first wave: the nine others never receive a desired
  document naming it, keep running the good version, and the rollout's record says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from edgerund.publisher import build as B
from edgerund.toolkit.simfleet import SimFleet
from tests.fixtures.postgres import import_psycopg

import_psycopg()

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"
OPERATOR_KEY = DEV / "OPERATOR-DEVELOPMENT-ONLY.key"
N = 10

pytestmark = pytest.mark.skipif(
    not (REF / "manifest.json").exists(), reason="reference model not present"
)


def bundle(out: Path, version: str, counter: int, golden: Path | None = None) -> Path:
    B.build_from_dir(
        REF, out, [B.load_private(DEV / "DEVELOPMENT-ONLY.key")], version=version,
        security_counter=counter, exclude=("model_fp32.onnx",), health={"probation_s": 0.5},
        golden=golden,
    )  # fmt: skip
    return out


def bad_golden(out: Path) -> Path:
    with np.load(io.BytesIO(B.make_golden((REF / "model.onnx").read_bytes(), n=4))) as z:
        arrays = {k: z[k] + (1000.0 if k.startswith("out.") else 0.0) for k in z.files}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.write_bytes(buf.getvalue())
    return out


async def cli(*args: str, timeout_s: float = 600.0) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgerund.cli", "fleet", *args,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(p.communicate(), timeout_s)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def all_reported(broker: Any, gateways: set[str], timeout_s: float = 120.0) -> None:
    seen: set[str] = set()
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe("twin/v1/+/+/reported", qos=1)
        async with asyncio.timeout(timeout_s):
            async for msg in c.messages:
                seen.add(str(msg.topic).split("/")[-2])
                if gateways <= seen:
                    return


async def retained_desired(broker: Any, fleet: SimFleet) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe("twin/v1/+/+/desired", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    if msg.payload:
                        out[str(msg.topic).split("/")[-2]] = json.loads(msg.payload)["signed"]
    return out


async def test_ten_gateways_good_rollout_then_bad_bundle_halts(
    mosquitto: Any, pg_dsn: str, tmp_path: Path
) -> None:
    good = bundle(tmp_path / "good.bundle", "2.1.0", 2)
    bad = bundle(tmp_path / "bad.bundle", "2.2.0", 3, golden=bad_golden(tmp_path / "bad.npz"))
    common = ["--key", str(OPERATOR_KEY), "--postgres", pg_dsn, "--json",
              "--host", mosquitto.host, "--port", str(mosquitto.port)]  # fmt: skip
    fleet = SimFleet(tmp_path / "fleet", mosquitto.host, mosquitto.port, n=N)
    await asyncio.to_thread(fleet.start)
    try:
        await all_reported(mosquitto, set(fleet.procs))
        # the good rollout; the tool is killed (SIGKILL) once wave 2 is out, and resumed
        t0 = time.monotonic()
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgerund.cli", "fleet", "rollout", str(good), "--id", "good",
            "--select", "site=plant-*", "--waves", "1,10%,50%,100%",
            "--halt-if", "rolled_back>0 or failed_rate>2%", "--soak", "2s",
            "--gateway-timeout", "240s", *common,
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert p.stdout is not None
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(400):
            while not (
                events and events[-1]["event"] == "wave_started" and events[-1]["wave"] == 2
            ):
                line = await p.stdout.readline()
                assert line, (events, (await p.stderr.read()).decode()[-3000:] if p.stderr else "")
                events.append(json.loads(line))
        p.kill()
        await p.wait()
        wave1 = next(e for e in events if e["event"] == "wave_started")["gateways"]
        rc, out, err = await cli("resume", "good", *common)
        elapsed = time.monotonic() - t0
        assert rc == 0, out + err[-3000:]
        events += [json.loads(x) for x in out.splitlines()]
        started = [e for e in events if e["event"] == "wave_started"]
        assert [len(e["gateways"]) for e in started] == [1, 4, 5]
        assert events[len(events) - len(out.splitlines())]["event"] == "resumed"
        for gw in fleet.procs:
            m = await asyncio.to_thread(fleet.model, gw)
            assert m["version"] == "2.1.0", (gw, m)
        rc, sout, err = await cli("status", "good", "--postgres", pg_dsn, "--json")
        st = json.loads(sout)
        assert st["state"] == "succeeded" and st["counts"]["committed"] == N
        # one desired document per gateway: what the database recorded is what the broker
        # holds, and no gateway saw a replay (the wave-1 gateway was not targeted again)
        desired = await retained_desired(mosquitto, fleet)
        for t in st["targets"]:
            assert desired[t["gateway"]]["version"] == t["desired_version"] == 1, t
        print(f"good rollout to {N} gateways, killed and resumed: {elapsed:.1f} s; wave 1 {wave1}")

        rc, out, err = await cli(
            "rollout", str(bad), "--id", "bad", "--select", "site=plant-*",
            "--waves", "1,10%,50%,100%", "--halt-if", "rolled_back>0 or failed_rate>2%",
            "--soak", "2s", "--gateway-timeout", "240s", *common,
        )  # fmt: skip
        assert rc == 1, out + err[-3000:]
        events = [json.loads(x) for x in out.splitlines()]
        (halted,) = [e for e in events if e["event"] == "halted"]
        (first,) = [e["gateways"] for e in events if e["event"] == "wave_started"]
        assert len(first) == 1
        rc, sout, err = await cli("status", "bad", "--postgres", pg_dsn, "--json")
        st = json.loads(sout)
        assert st["state"] == "halted" and st["reason"] == halted["reason"]
        assert "refused=1" in st["reason"] and "golden" in st["reason"], st["reason"]
        reached = [t for t in st["targets"] if t["status"] != "pending"]
        assert [t["gateway"] for t in reached] == first
        assert sum(t["status"] == "pending" for t in st["targets"]) == N - 1

        await asyncio.sleep(2.0)
        desired = await retained_desired(mosquitto, fleet)
        for gw in fleet.procs:
            target = desired[gw]["models"]["motor-ae"]
            expected = "2.2.0" if gw in first else "2.1.0"
            assert target["version"] == expected, (gw, target)
            m = await asyncio.to_thread(fleet.model, gw)
            assert m["version"] == "2.1.0", (gw, m)  # the bad model never ran anywhere
    finally:
        await asyncio.to_thread(fleet.stop)
