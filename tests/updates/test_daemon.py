"""The real daemon (edgerund run) with the real models registry and the shipped reference
model: install a signed bundle over the diagnostics socket, roll back by hand, and survive
a SIGKILL in the middle of the trial."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.publisher import build as B

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"

pytestmark = pytest.mark.skipif(
    not (REF / "manifest.json").exists()
    or not (REPO / "edgerund" / "inference" / "component.py").exists(),
    reason="reference model / models registry not present",
)


def _overrides(tmp: Path) -> dict[str, Any]:
    return {
        "models": [{"name": "motor-ae", "path": str(REF)}],
        "updates": {
            "enabled": True,
            "keyring_file": str(DEV / "keyring.dev.json"),
            "probation_s": 0.5,
            "precheck_runs": 20,
        },
    }


def _bundle(tmp: Path, version: str, counter: int) -> Path:
    out = tmp / f"ref-{version}.bundle"
    B.build_from_dir(
        REF,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version=version,
        security_counter=counter,
        exclude=("model_fp32.onnx",),
        health={"probation_s": 0.5},
    )
    return out


def _models(d: Any) -> dict[str, Any]:
    return {m["name"]: m for m in d.call("status")["updates"]["models"]}


def test_update_and_rollback_over_socket(tmp_path: Path) -> None:
    from tests.helpers.daemon import DaemonProcess

    b = _bundle(tmp_path, "2.1.0", 2)
    with DaemonProcess(tmp_path, _overrides(tmp_path)) as d:
        d.wait_ready(60)
        assert _models(d)["motor-ae"]["version"] == "2.0.0"
        res = d.call("update", {"path": str(b), "wait": "commit"}, timeout_s=120)
        assert res["state"] == "COMMITTED" and res["version"] == "2.1.0"
        st = d.call("status")
        assert os.readlink(tmp_path / "state" / "models" / "motor-ae" / "current") == "b"
        assert json.dumps(st).count("2.1.0") >= 1
        res = d.call("rollback", {"model": "motor-ae"})
        assert res["active_slot"] == "a" and res["version"] == "2.0.0"
        assert res["last_failure"]["reason"] == "manual"


def test_sigkill_during_trial_real_daemon(tmp_path: Path) -> None:
    from tests.helpers.daemon import DaemonProcess

    b = _bundle(tmp_path, "2.1.0", 2)
    d = DaemonProcess(
        tmp_path, _overrides(tmp_path), env={"EDGERUND_TEST_ABORT_AT": "TRIAL.flipped"}
    )
    d.start()
    try:
        d.wait_ready(60)
        d.call("update", {"path": str(b), "wait": "none"})
        assert d.wait(120) == -signal.SIGKILL
    finally:
        d.stop()
    state = tmp_path / "state" / "models" / "motor-ae"
    assert os.readlink(state / "current") == "b"  # killed right after the flip
    d2 = DaemonProcess(tmp_path, _overrides(tmp_path))
    with d2:
        d2.wait_ready(60)
        deadline = time.monotonic() + 60
        while _models(d2)["motor-ae"]["state"] != "COMMITTED" and time.monotonic() < deadline:
            time.sleep(0.2)
        m = _models(d2)["motor-ae"]
        assert m["state"] == "COMMITTED" and m["version"] == "2.1.0" and m["active_slot"] == "b"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
