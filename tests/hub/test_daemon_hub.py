"""End to end: the real daemon (subprocess) in simulated mode, the hub's socket commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.helpers.daemon import DaemonProcess

SENSORS: list[dict[str, Any]] = [
    {"id": "vib", "driver": "mpu6050", "bus": 1, "address": 0x68, "rate_hz": 50},
    {"id": "cab", "driver": "bme280", "bus": 1, "address": 0x76, "rate_hz": 2},
    {"id": "gps", "driver": "nmea", "port": "sim://gps", "rate_hz": 1},
]


def test_sensors_scan_sniff_inject_over_the_socket(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, {"simulation": {"enabled": True}, "sensors": SENSORS}) as d:
        d.wait_ready()
        deadline = time.monotonic() + 20.0
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = d.call("sensors")
            if all(r["state"] == "ok" for r in rows):
                break
            time.sleep(0.2)
        assert [r["id"] for r in rows] == ["vib", "cab", "gps"]
        assert all(r["state"] == "ok" and r["value"] for r in rows), rows
        st = d.call("status")
        assert {s["id"] for s in st["sensors"]} == {"vib", "cab", "gps"}
        assert all(
            {"id", "driver", "state", "value", "read_errors"} <= set(s) for s in st["sensors"]
        )
        scan = d.call("i2c-scan", {"bus": 1})
        by = {r["address"]: r["status"] for r in scan}
        assert by["0x68"] == "in use" and by["0x44"] == "responds" and by["0x40"] == "responds"
        deadline = time.monotonic() + 10.0  # the GPS talks once a second
        frames = d.call("serial-sniff", {"port": "sim://gps", "n": 2})
        while len(frames) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            frames = d.call("serial-sniff", {"port": "sim://gps", "n": 2})
        assert len(frames) == 2 and all(f["text"].startswith("$GP") for f in frames)
        res = d.call(
            "sim-inject", {"kind": "dropout", "duration_s": 60, "sensor": "cab", "severity": 1.0}
        )
        assert res["sensor"] == "bme280"
        deadline = time.monotonic() + 20.0
        state = ""
        while time.monotonic() < deadline and state != "failed":
            state = next(r["state"] for r in d.call("sensors") if r["id"] == "cab")
            time.sleep(0.2)
        assert state == "failed"
        assert next(r["state"] for r in d.call("sensors") if r["id"] == "vib") == "ok"
