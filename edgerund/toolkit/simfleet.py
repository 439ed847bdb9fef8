"""A fleet of simulated gateways on one broker, for fleet tests and benchmarks.

Each gateway is the real daemon (`edgerund run --simulate`: real drivers on emulated
devices, the reference model, the update pipeline, the twin) in its own process, work
directory and software identity, on a LIGHT version of the shipped simulated config so
that ten of them fit on two shared cores: three sensors at low rates (the motor loop's
inputs), the motor loop only, every 500 ms, telemetry to the same broker. The twin and
the update pipeline are the shipped ones; probation tolerates missed ticks and faults
(a loaded host must not roll a genuine bundle back: probation itself is judged in
tests/updates), while the precheck with the bundle's golden vectors stays strict, which
is what a bad bundle fails on the device.

    with SimFleet(work, broker_host, broker_port, n=10) as fleet:
        fleet.procs["gw-00"].call("status")
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from edgerund.config.loader import simulate_config_path
from edgerund.toolkit.daemonproc import DaemonProc

KEEP_SENSORS = {"motor_vib": 20.0, "cabinet": 1.0, "motor_current": 2.0}


def light_config(
    work: Path, gateway: str, site: str, host: str, port: int, *, loop_period_ms: int = 500
) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(simulate_config_path().read_text())
    cfg["sensors"] = [s for s in cfg["sensors"] if s["id"] in KEEP_SENSORS]
    for s in cfg["sensors"]:
        s["rate_hz"] = KEEP_SENSORS[s["id"]]
    motor = next(lp for lp in cfg["loops"] if lp["id"] == "motor")
    motor["period_ms"] = loop_period_ms
    cfg["loops"] = [motor]
    cfg["gateway"] = {"id": gateway, "site": site}
    cfg["paths"] = {"state_dir": str(work / "state"), "run_dir": str(work / "run")}
    cfg["diag"] = {"socket": str(work / "diag.sock"), "mode": 0o666}
    cfg["logging"] = {"format": "json", "level": "info"}
    cfg["uplink"] = {"enabled": True, "host": host, "port": port}
    cfg["twin"] = {"check_interval_s": 1.0, "probation_s": 1.0}
    cfg["updates"] = {
        **cfg.get("updates", {}),
        "probation_s": 1.0,
        "precheck_runs": 10,
        "probation": {"max_missed_ticks": 1_000_000, "max_faults": 1_000_000},
    }
    return cfg


class SimFleet:
    def __init__(
        self,
        work: Path,
        host: str,
        port: int,
        *,
        n: int = 10,
        sites: tuple[str, ...] = ("plant-a", "plant-b"),
        prefix: str = "gw",
    ) -> None:
        self.procs: dict[str, DaemonProc] = {}
        for i in range(n):
            gw = f"{prefix}-{i:02d}"
            d = work / gw
            self.procs[gw] = DaemonProc(
                d, light_config(d, gw, sites[i % len(sites)], host, port), simulate=True
            )
        self.site = {gw: sites[i % len(sites)] for i, gw in enumerate(self.procs)}

    def start(self, timeout_s: float = 180.0) -> float:
        """Start every daemon, return the seconds until all answer `status`."""
        t0 = time.monotonic()
        for p in self.procs.values():
            p.start()
        with ThreadPoolExecutor(len(self.procs)) as ex:
            list(ex.map(lambda p: p.wait_ready(timeout_s), self.procs.values()))
        return time.monotonic() - t0

    def stop(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.procs))) as ex:
            list(ex.map(lambda p: p.stop(), self.procs.values()))

    def model(self, gw: str, name: str = "motor-ae") -> dict[str, Any]:
        models = self.procs[gw].call("status")["updates"]["models"]
        return dict(next(m for m in models if m["name"] == name))

    def __enter__(self) -> SimFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
