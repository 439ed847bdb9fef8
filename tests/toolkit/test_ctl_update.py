"""`edgerunctl update` judges the update's final state (issue #12 item 16): exit 0 only
when the model was committed; a rollback at the end of probation or a rejection is exit 1
with the reason. Against the real daemon with the shipped reference model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.ctl.update import verdict
from edgerund.publisher import build as B
from tests.helpers.daemon import DaemonProcess

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "reference"
DEV = REPO / "models" / "dev-keys"
CTL = [sys.executable, "-m", "edgerund.ctl"]


def _bundle(tmp: Path, version: str, counter: int, **health: Any) -> Path:
    out = tmp / f"ref-{version}.bundle"
    B.build_from_dir(
        REF,
        out,
        [B.load_private(DEV / "DEVELOPMENT-ONLY.key")],
        version=version,
        security_counter=counter,
        exclude=("model_fp32.onnx",),
        health={"probation_s": 0.5, **health},
    )
    return out


def _state(d: DaemonProcess) -> str:
    models = {m["name"]: m for m in d.call("models-slots")}
    return str(models["motor-ae"]["state"])


def test_verdict_is_pure() -> None:
    assert verdict({"name": "m", "state": "COMMITTED"}) is None
    assert verdict({"keyring": {"version": 2}}) is None
    failed = {"name": "m", "state": "ROLLED_BACK", "last_failure": {"reason": "nan_outputs"}}
    assert verdict(failed) == "m ROLLED_BACK: nan_outputs"


@pytest.mark.skipif(not (REF / "manifest.json").exists(), reason="reference model absent")
def test_update_exit_code_follows_the_final_state(tmp_path: Path) -> None:
    overrides = {
        "models": [{"name": "motor-ae", "path": str(REF)}],
        "updates": {
            "enabled": True,
            "keyring_file": str(DEV / "keyring.dev.json"),
            "probation_s": 0.5,
            "precheck_runs": 20,
        },
    }
    ok = _bundle(tmp_path, "2.1.0", 2)
    long_probation = _bundle(tmp_path, "2.2.0", 3, probation_s=30.0)
    too_slow = _bundle(tmp_path, "2.3.0", 4, latency_p95_ms=1e-6)
    with DaemonProcess(tmp_path, overrides) as d:
        d.wait_ready(60)
        ctl = [*CTL, "--socket", d.socket_path, "--timeout", "120"]

        r = subprocess.run([*ctl, "update", str(ok)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "COMMITTED" in r.stdout

        # The trial starts, the client waits; the probation ends in a rollback.
        p = subprocess.Popen(
            [*ctl, "update", str(long_probation)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while _state(d) != "PROBATION":
            assert time.monotonic() < deadline, "never reached probation"
            assert p.poll() is None, p.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        assert p.poll() is None, "the client answered before the probation verdict"
        d.call("rollback", {"model": "motor-ae"})
        out, err = p.communicate(timeout=30)
        assert p.returncode == 1, (out, err)
        assert "motor-ae ROLLED_BACK: manual" in err

        # A bundle refused by the precheck.
        r = subprocess.run(
            [*ctl, "update", str(too_slow)], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 1, r.stdout
        assert "latency" in r.stderr
        assert d.stop() == 0
