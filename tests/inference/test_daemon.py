"""The models component inside the real daemon: status, the `models` command, bad models."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.daemon import DaemonProcess
from tests.inference.conftest import REF, copy_reference, edit_manifest


def test_daemon_serves_models_status_and_command(tmp_path: Path) -> None:
    models = [{"name": "motor-ae", "path": str(REF), "warmup_runs": 5}]
    with DaemonProcess(tmp_path, {"models": models}) as d:
        d.wait_ready()
        st = d.call("status")
        for row in st["models"]:
            row.pop("drift", None)  # once the drift task ran: tests/learning/test_daemon_drift.py
        assert st["models"] == [
            {
                "name": "motor-ae",
                "active_slot": None,
                "version": "2.0.0",
                "state": "running",
                "provider": "CPUExecutionProvider",
                "provider_fallbacks": [],
            }
        ]
        rows = d.call("models")
        assert len(rows) == 1
        row = rows[0]
        assert row["name"] == "motor-ae" and row["precision"] == "int8"
        assert row["source"] == "config" and row["mode"] in ("inline", "thread")
        assert row["faults"] == 0 and row["nan_outputs"] == 0
        assert 2.0 < row["threshold"] < 5.0


def test_daemon_refuses_a_model_with_a_missing_manifest_field(tmp_path: Path) -> None:
    bad = copy_reference(tmp_path / "bad")
    edit_manifest(bad, lambda doc: doc["output"].pop("name"))
    d = DaemonProcess(tmp_path, {"models": [{"name": "m", "path": str(bad)}]})
    d.start()
    try:
        code = d.wait(timeout_s=30)
    finally:
        d.kill()
    assert code == 2, d.log_text
    assert "models[0].path" in d.log_text and "output.name: missing" in d.log_text
