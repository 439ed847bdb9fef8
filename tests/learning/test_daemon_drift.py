"""The live simulated daemon: an injected gain drift is reported by the drift task in
`models`, `status` and the metrics, and `adapt --dry-run` fits a calibration inside the
signed policy that keeps every must-detect vector detected."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.errors import CommandError
from tests.control.test_daemon_e2e import REF_MODEL, plant_sensors
from tests.helpers.daemon import DaemonProcess

PERIOD_MS = 20


def wait_until(pred: Any, timeout_s: float, step_s: float = 0.25) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step_s)
    return pred()


def config(tmp_path: Path) -> dict[str, Any]:
    return {
        "simulation": {"enabled": True, "seed": 42},
        "sensors": plant_sensors(),
        "models": [
            {
                "name": "motor-ae",
                "path": str(REF_MODEL),
                "drift_block": 25,
                "drift_anomaly_blocks": 3,
            }
        ],
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
                "actuator": {
                    "driver": "emulated",
                    "name": "relay",
                    "safe_value": 0.5,
                    "record_path": str(tmp_path / "relay.jsonl"),
                },
                "active_value": 1.0,
                "normal_value": 0.0,
            }
        ],
    }


def drift_of(d: DaemonProcess) -> dict[str, Any]:
    return d.call("models")[0].get("drift") or {}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gain_drift_reported_and_a_dry_run_calibration_fits(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, config(tmp_path)) as d:
        d.wait_ready()
        assert wait_until(lambda: drift_of(d).get("blocks", 0) >= 6, 60.0), d.log_text[-3000:]
        assert drift_of(d)["state"] in ("ok", "anomaly"), drift_of(d)
        d.call("sim-inject", {"kind": "gain_drift", "duration_s": 3600.0, "severity": 1.0})
        rep = wait_until(lambda: (r := drift_of(d)).get("state") == "drift" and r, 90.0)
        assert rep, (drift_of(d), d.log_text[-3000:])
        assert rep["n_moved"] >= 4
        assert all(m["feature"].startswith("accel_g.") for m in rep["moved"][:3]), rep
        # status + Prometheus carry the compact summary
        st = d.call("status")["models"][0]["drift"]
        assert st["state"] == "drift" and st["n_moved"] >= 4
        metrics = d.call("metrics")
        text = metrics if isinstance(metrics, str) else metrics.get("text", "")
        assert 'edgerund_model_drift_state{model="motor-ae",state="drift"} 1' in text
        assert "drift_detected" in d.log_text

        with pytest.raises(CommandError) as ei:  # installing is not wired yet: says so
            d.call("adapt", {"model": "motor-ae"})
        assert ei.value.code == "not_available"

        fits: list[tuple[float, int, int]] = []  # (seconds, missed ticks, ticks) per fit

        def fitted() -> Any:
            lp0 = d.call("loops")[0]
            t0 = time.monotonic()
            r = d.call("adapt", {"model": "motor-ae", "dry_run": True}, timeout_s=60.0)
            lp1 = d.call("loops")[0]
            fits.append(
                (time.monotonic() - t0, lp1["missed"] - lp0["missed"], lp1["ticks"] - lp0["ticks"])
            )
            return r if r.get("ok") else None

        res = wait_until(fitted, 90.0, step_s=2.0)
        assert res, d.call("adapt", {"model": "motor-ae", "dry_run": True})
        assert res["would_be"] == "2.0.0+cal.1"
        assert res["samples"] >= 600 and res["false_alarm_after"] <= 0.01
        assert res["false_alarm_before"] > 0.2
        assert res["changes"][0]["feature"].startswith("accel_g.")
        assert {"bearing_wear@1.0", "overheat@1.0"} <= set(res["must_detect"])
        # Ticks missed while the fit ran, against the loop's own miss rate on this shared
        # machine before it (the target is 0 on an unloaded gateway; here it is reported).
        secs, missed, ticks = fits[-1]
        lp = d.call("loops")[0]
        base_rate = (lp["missed"] - missed) / max(1, lp["ticks"] - ticks)
        print(
            f"adaptation fit {secs:.2f} s: {missed} of {ticks} ticks missed; base {base_rate:.3f}"
        )
        assert missed <= 3 * base_rate * max(ticks, 1) + 5, (fits, lp)
