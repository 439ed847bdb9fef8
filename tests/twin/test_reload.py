"""Reload names every changed key: applied live, or needing a restart (in the log, the
reply and the status/reported state); nothing is ignored silently (#15)."""

from __future__ import annotations

from pathlib import Path

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
