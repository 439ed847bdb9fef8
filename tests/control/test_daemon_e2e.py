"""End to end: the real daemon in simulated mode, real hub and drivers on emulated devices,
an anomaly injected with `sim-inject`, the emulated actuator's command record read back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import DaemonProcess

SAFE, ACTIVE, NORMAL = 0.5, 1.0, 0.0
PERIOD_MS = 20


def commands(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_until(pred: Any, timeout_s: float, step_s: float = 0.1) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step_s)
    return pred()


def vib_sensor() -> dict[str, Any]:
    return {
        "id": "motor_vib",
        "driver": "mpu6050",
        "bus": 1,
        "address": 0x68,
        "rate_hz": 200,
        "read_timeout_ms": 50,
        "accel_range_g": 4,
        "window": 2048,
    }


@pytest.mark.slow
def test_rules_loop_detects_injected_bearing_wear_and_releases(tmp_path: Path) -> None:
    rec = tmp_path / "relay.jsonl"
    on_ticks, off_ticks = 3, 10
    overrides = {
        "simulation": {"enabled": True, "seed": 42},
        "sensors": [vib_sensor()],
        "loops": [
            {
                "id": "motor",
                "period_ms": PERIOD_MS,
                # normal: std of accel_x over 1 s <= 0.036 g; bearing wear >= 0.042 g
                "fallback": [
                    {
                        "sensor": "motor_vib",
                        "channel": "accel_x",
                        "stat": "std",
                        "samples": 200,
                        "above": 0.039,
                    }
                ],
                "policy": {"on_ticks": on_ticks, "off_ticks": off_ticks},
                "actuator": {
                    "driver": "emulated",
                    "name": "relay",
                    "safe_value": SAFE,
                    "record_path": str(rec),
                },
                "active_value": ACTIVE,
                "normal_value": NORMAL,
            }
        ],
    }
    with DaemonProcess(tmp_path, overrides) as d:
        d.wait_ready()
        assert wait_until(lambda: [c["value"] for c in commands(rec)][-1:] == [NORMAL], 15.0), (
            d.log_text()
        )
        st = d.call("loops")[0]
        assert st["mode"] == "fallback" and st["reason"] == "no model configured"
        assert st["anomaly"] is False

        inj = d.call("sim-inject", {"kind": "bearing_wear", "duration_s": 3.0, "severity": 1.0})
        t_inject = time.time()
        assert inj["kind"] == "bearing_wear"
        active = wait_until(lambda: [c for c in commands(rec) if c["value"] == ACTIVE], 10.0)
        assert active, d.log_text()
        # detection: the 1 s std window must fill with worn-bearing data past the limit,
        # then on_ticks; allow 2 s of slack for a loaded CI machine
        delay_s = active[0]["t_wall"] - t_inject
        assert delay_s < 1.0 + on_ticks * PERIOD_MS / 1000 + 2.0, delay_s
        st = d.call("loops")[0]
        assert st["anomaly"] is True and st["anomalies"] == 1

        # released after the anomaly ends (3 s) and the window drains (1 s)
        released = wait_until(
            lambda: [
                c
                for c in commands(rec)
                if c["value"] == NORMAL and c["t_wall"] > active[0]["t_wall"]
            ],
            12.0,
        )
        assert released, d.log_text()
        assert released[0]["t_wall"] - t_inject >= 3.0
        st = d.call("status")
        row = next(lp for lp in st["loops"] if lp["id"] == "motor")
        assert row["ticks"] > 100 and set(row["lateness_ms"]) == {"p50", "p99", "max"}
        assert d.stop() == 0
    # shutdown drove the actuator to its safe state
    assert commands(rec)[-1]["value"] == SAFE
