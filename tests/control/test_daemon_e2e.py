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
                # std of accel_x over 1 s: normal <= 0.036 g (600 s of seed 42), bearing
                # wear at severity 2 >= 0.065 g
                "fallback": [
                    {
                        "sensor": "motor_vib",
                        "channel": "accel_x",
                        "stat": "std",
                        "samples": 200,
                        "above": 0.045,
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
            d.log_text
        )
        st = d.call("loops")[0]
        assert st["mode"] == "fallback" and st["reason"] == "no model configured"
        assert st["anomaly"] is False

        inj = d.call("sim-inject", {"kind": "bearing_wear", "duration_s": 3.0, "severity": 2.0})
        t_inject = time.time()
        assert inj["kind"] == "bearing_wear"
        active = wait_until(lambda: [c for c in commands(rec) if c["value"] == ACTIVE], 10.0)
        assert active, d.log_text
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
        assert released, d.log_text
        assert released[0]["t_wall"] - t_inject >= 3.0
        st = d.call("status")
        row = next(lp for lp in st["loops"] if lp["id"] == "motor")
        assert row["ticks"] > 100 and set(row["lateness_ms"]) == {"p50", "p99", "max"}
        assert d.stop() == 0
    # shutdown drove the actuator to its safe state
    assert commands(rec)[-1]["value"] == SAFE


REF_MODEL = Path(__file__).resolve().parents[2] / "models" / "reference"


def plant_sensors() -> list[dict[str, Any]]:
    return [
        vib_sensor(),
        {
            "id": "cabinet",
            "driver": "bme280",
            "bus": 1,
            "address": 0x76,
            "rate_hz": 1,
            "mode": "normal",
        },
        {
            "id": "motor_current",
            "driver": "ads1115",
            "bus": 1,
            "address": 0x48,
            "rate_hz": 10,
            "data_rate_sps": 860,
            "inputs": [
                {"name": "motor_a", "input": "ain0", "range_v": 1.024, "scale": 10.0, "unit": "A"}
            ],
        },
    ]


@pytest.mark.slow
def test_model_loop_detects_injected_bearing_anomaly_and_releases(tmp_path: Path) -> None:
    """The reference int8 model in the loop: detection within the configured ticks once the
    window holds worn-bearing data, the actuator emulator gets the command, and releases it
    after the anomaly ends; SIGTERM leaves the actuator in its safe state."""
    if not (REF_MODEL / "manifest.json").exists():
        pytest.fail(f"reference model missing: {REF_MODEL} (run python models/build.py)")
    manifest = json.loads((REF_MODEL / "manifest.json").read_text())
    rec = tmp_path / "relay.jsonl"
    on_ticks, off_ticks = 3, 25
    overrides = {
        "simulation": {"enabled": True, "seed": 42},
        "sensors": plant_sensors(),
        "models": [{"name": "motor-ae", "path": str(REF_MODEL)}],
        "loops": [
            {
                "id": "motor",
                "period_ms": PERIOD_MS,
                "model": "motor-ae",
                "inputs": [
                    {
                        "name": "accel_g",
                        "sensor": "motor_vib",
                        "channels": ["accel_x", "accel_y", "accel_z"],
                        "window": 256,
                    },
                    {
                        "name": "temp_c",
                        "sensor": "cabinet",
                        "channels": ["temperature"],
                        "window": 1,
                    },
                    {
                        "name": "current_a",
                        "sensor": "motor_current",
                        "channels": ["motor_a"],
                        "window": 1,
                    },
                ],
                "policy": {"on_ticks": on_ticks, "off_ticks": off_ticks},
                "fallback": [
                    {
                        "sensor": "motor_vib",
                        "channel": "accel_x",
                        "stat": "std",
                        "samples": 200,
                        "above": 0.039,
                    }
                ],
                "actuator": {
                    "driver": "emulated",
                    "name": "relay",
                    "safe_value": SAFE,
                    "record_path": str(rec),
                },
                "active_value": ACTIVE,
                "normal_value": NORMAL,
                "history": 200,
            }
        ],
    }
    with DaemonProcess(tmp_path, overrides) as d:
        d.wait_ready()
        assert wait_until(
            lambda: (
                (lp := d.call("loops")[0])["mode"] == "model" and lp["actuator"]["value"] == NORMAL
            ),
            20.0,
        ), (d.call("loops"), d.log_text[-3000:])
        st = d.call("loops")[0]
        assert st["model_version"] == manifest["version"]
        assert st["threshold"] == pytest.approx(manifest["threshold"])
        assert st["anomaly"] is False, st["scores"]

        d.call("sim-inject", {"kind": "bearing_wear", "duration_s": 4.0, "severity": 1.0})
        t_inject = time.time()
        active = wait_until(lambda: [c for c in commands(rec) if c["value"] == ACTIVE], 10.0)
        assert active, (d.call("loops"), d.log_text[-3000:])
        delay_s = active[0]["t_wall"] - t_inject
        # the 256-sample window (1.28 s) need not fill completely; on_ticks; 2 s CI slack
        assert delay_s < 1.28 + on_ticks * PERIOD_MS / 1000 + 2.0, delay_s
        st = d.call("loops")[0]
        assert st["mode"] == "model" and st["anomaly"] is True
        above = [s for s in st["scores"] if s is not None and s > st["threshold"]]
        assert len(above) >= on_ticks

        released = wait_until(
            lambda: [
                c
                for c in commands(rec)
                if c["value"] == NORMAL and c["t_wall"] > active[0]["t_wall"]
            ],
            15.0,
        )
        assert released, (d.call("loops"), d.log_text[-3000:])
        assert released[0]["t_wall"] - t_inject >= 4.0
        log = d.log_text
        assert "anomaly.start" in log or "anomaly_start" in log
        assert d.stop() == 0
    assert commands(rec)[-1]["value"] == SAFE
