"""The live simulated daemon rolls back, with reason `post_update_drift`, a committed model
whose reference profile does not match the plant, where the previous model's matched.

The bad bundle is the reference model byte for byte with a publisher-signed (dev key)
manifest whose reference profile is shifted: every gate passes (golden vectors, precheck,
probation: the model computes the same scores), it commits, and only the drift monitor,
judging the plant against the new model's own profile, sees the mismatch. A good bundle
(the same model with the true profile) is installed first and stays committed: the rule
is about the profile, not about any update."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.publisher import build as B
from tests.learning.test_daemon_drift import config as drift_config
from tests.learning.test_daemon_drift import drift_of, wait_until

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"


def bundle(tmp: Path, version: str, counter: int, *, shift_profile: bool) -> Path:
    src = tmp / f"model-{version}"
    shutil.copytree(REF, src, ignore=shutil.ignore_patterns("model_fp32.onnx"))
    if shift_profile:
        man = json.loads((src / "manifest.json").read_text())
        feats = man["reference_profile"]["features"]
        # "normal" is 3 sd higher on every feature, and scores 3x higher, than the plant
        feats["mean"] = [m + 3.0 * s for m, s in zip(feats["mean"], feats["std"], strict=True)]
        for k, qs in feats["quantiles"].items():
            feats["quantiles"][k] = [q + 3.0 * s for q, s in zip(qs, feats["std"], strict=True)]
        score = man["reference_profile"]["score"]
        score["quantiles"] = {k: 3.0 * v for k, v in score["quantiles"].items()}
        score["mean"] *= 3.0
        (src / "manifest.json").write_text(json.dumps(man, indent=2))
    out = tmp / f"motor-ae-{version}.bundle"
    B.build_from_dir(
        src,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version=version,
        security_counter=counter,
        health={"probation_s": 1.0},
    )
    return out


def setup(tmp_path: Path, *, window_s: float) -> tuple[Path, Path, dict[str, Any]]:
    """The good bundle (true profile), the bad one (shifted profile) and the daemon's
    config with `post_update_drift_window_s`."""
    good = bundle(tmp_path, "2.0.1", 2, shift_profile=False)
    bad = bundle(tmp_path, "2.0.2", 3, shift_profile=True)
    cfg = drift_config(tmp_path)
    cfg["updates"] = {
        "enabled": True,
        "keyring_file": str(DEV / "keyring.dev.json"),
        "probation_s": 1.0,
        "precheck_runs": 20,
        "post_update_drift_window_s": window_s,
    }
    return good, bad, cfg


def slots(d: Any) -> dict[str, Any]:
    return {m["name"]: m for m in d.call("status")["updates"]["models"]}["motor-ae"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_committed_model_whose_profile_does_not_match_is_rolled_back(tmp_path: Path) -> None:
    from tests.helpers.daemon import DaemonProcess

    good, bad, cfg = setup(tmp_path, window_s=600.0)
    with DaemonProcess(tmp_path, cfg) as d:
        d.wait_ready(60)

        def in_control(version: str) -> Any:
            r = drift_of(d)
            return r.get("blocks", 0) >= 8 and d.call("models")[0]["version"] == version and r

        res = d.call("update", {"path": str(good), "wait": "commit"}, timeout_s=120)
        assert res["state"] == "COMMITTED" and res["version"] == "2.0.1", res
        # the matching profile: the monitor judges block after block, no rollback
        rep = wait_until(lambda: in_control("2.0.1"), 90.0)
        assert rep and rep["state"] in ("ok", "anomaly"), (drift_of(d), d.log_text[-3000:])
        assert slots(d)["state"] == "COMMITTED" and slots(d)["version"] == "2.0.1"

        res = d.call("update", {"path": str(bad), "wait": "commit"}, timeout_s=120)
        assert res["state"] == "COMMITTED" and res["version"] == "2.0.2", res  # every gate
        back = wait_until(lambda: (s := slots(d))["state"] == "ROLLED_BACK" and s, 90.0)
        assert back, (slots(d), drift_of(d), d.log_text[-4000:])
        assert back["version"] == "2.0.1" and back["active_slot"] == "b", back
        fail = back["last_failure"]
        assert fail["reason"] == "post_update_drift", fail
        assert "2.0.2" in fail["message"] and "2.0.1" in fail["message"], fail
        assert "update_post_drift_rollback" in d.log_text
        # the previous model runs again, and nothing more happens
        assert wait_until(lambda: d.call("models")[0]["version"] == "2.0.1", 30.0)
        time.sleep(3.0)
        assert slots(d)["state"] == "ROLLED_BACK" and slots(d)["version"] == "2.0.1"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_rule_survives_a_power_cut_after_the_update(tmp_path: Path) -> None:
    # The verdict on the replaced model is taken before the swap; a restart (here SIGKILL)
    # after the commit must not end the watch. The first run has the rule off, so the bad
    # model stays committed until the kill; the second run, with the rule on, has only the
    # persisted verdict to go by.
    from tests.helpers.daemon import DaemonProcess

    good, bad, cfg = setup(tmp_path, window_s=0.0)
    store = tmp_path / "state" / "models" / "drift_previous.json"
    d = DaemonProcess(tmp_path, cfg)
    with d:
        d.wait_ready(60)
        res = d.call("update", {"path": str(good), "wait": "commit"}, timeout_s=120)
        assert res["state"] == "COMMITTED", res
        rep = wait_until(
            lambda: (
                (r := drift_of(d)).get("blocks", 0) >= 8
                and d.call("models")[0]["version"] == "2.0.1"
                and r
            ),
            90.0,
        )
        assert rep and rep["state"] in ("ok", "anomaly"), drift_of(d)
        res = d.call("update", {"path": str(bad), "wait": "commit"}, timeout_s=120)
        assert res["state"] == "COMMITTED" and res["version"] == "2.0.2", res
        assert wait_until(
            lambda: (
                store.exists() and json.loads(store.read_text())["motor-ae"]["version"] == "2.0.2"
            ),
            30.0,
        ), d.log_text[-3000:]
        assert slots(d)["state"] == "COMMITTED"  # the rule is off in this run
        d.kill()  # the power cut
        cfg["updates"]["post_update_drift_window_s"] = 600.0
        d.write_config({**d.config, **cfg})
        d.start()
        d.wait_ready(60)
        back = wait_until(lambda: (s := slots(d))["state"] == "ROLLED_BACK" and s, 90.0)
        assert back, (slots(d), drift_of(d), d.log_text[-4000:])
        assert back["version"] == "2.0.1", back
        assert back["last_failure"]["reason"] == "post_update_drift", back
