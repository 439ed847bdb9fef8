"""Reload names every changed key: applied live, or needing a restart (in the log, the
reply and the status/reported state); nothing is ignored silently (#15)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.daemon import simulated


def test_reload_names_restart_keys_and_applies_live_ones(tmp_path: Path) -> None:
    d = simulated(tmp_path)
    with d:
        d.wait_ready(60)
        cfg = yaml.safe_load(d.config_path.read_text())
        for lp in cfg["loops"]:
            if lp["id"] == "cabinet":
                lp["period_ms"] = 200  # needs a restart
                lp["policy"]["on_ticks"] = 7  # live
        cfg.setdefault("telemetry", {})["keep_acked_h"] = 2.0  # needs a restart
        cfg.setdefault("daemon", {})["shutdown_timeout_s"] = 9.0  # needs a restart
        d.write_config(yaml.safe_dump(cfg, sort_keys=False))
        res = d.call("reload")
        msg = res["message"]
        for key in (
            "loops.cabinet.period_ms",
            "telemetry.keep_acked_h",
            "daemon.shutdown_timeout_s",
        ):
            assert key in msg, msg
        assert "loops.cabinet.policy" not in msg
        loops = {lp["id"]: lp for lp in d.call("config")["config"]["loops"]}
        assert loops["cabinet"]["policy"]["on_ticks"] == 7
        events = [e for e in d.call("log", {"n": 200}) if e.get("event") == "config_reloaded"]
        assert "loops.cabinet.policy" in events[-1]["applied_live"]
        assert "loops.cabinet.period_ms" in events[-1]["restart_needed"]


def test_sighup_applies_fallback_rules_live(tmp_path: Path) -> None:
    """A loop's fallback rules change live: the rules-only `cabinet` loop trips on a new
    limit below the cabinet's temperature after a SIGHUP, without a restart; a rule on a
    channel the hub does not have is refused and the running rules stay."""
    d = simulated(tmp_path)
    with d:
        d.wait_ready(60)
        pid = d.call("status")["pid"]

        def cabinet() -> dict[str, Any]:
            return next(lp for lp in d.call("loops") if lp["id"] == "cabinet")

        time.sleep(2.0)
        assert cabinet()["anomalies"] == 0 and not cabinet()["anomaly"]
        cfg = yaml.safe_load(d.config_path.read_text())
        lp = next(lp for lp in cfg["loops"] if lp["id"] == "cabinet")
        lp["fallback"][0]["above"] = -50.0  # the cabinet is always warmer than this
        d.write_config(yaml.safe_dump(cfg, sort_keys=False))
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not cabinet()["anomaly"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cabinet()["anomaly"], cabinet()
        events = [e for e in d.call("log", {"n": 300}) if e.get("event") == "config_reloaded"]
        assert "loops.cabinet.fallback" in events[-1]["applied_live"], events[-1]
        assert events[-1]["restart_needed"] == [], events[-1]
        assert d.call("status")["pid"] == pid  # applied in the running process

        # a channel the hub does not have: refused, named, the running rules stay
        lp["fallback"][0] = {
            "sensor": "cabinet",
            "channel": "no_such_channel",
            "stat": "mean",
            "samples": 5,
            "above": 1000.0,
        }
        d.write_config(yaml.safe_dump(cfg, sort_keys=False))
        msg = d.call("reload")["message"]
        assert "no_such_channel" in msg and "restart needed" in msg, msg
        time.sleep(1.5)
        assert cabinet()["anomaly"], cabinet()  # still the -50 rule, not the refused one
