"""A device calibration cut short by a SIGKILL at a state boundary of its install
(EDGERUND_TEST_ABORT_AT, the same hook as the bundle power-cut tests), then a restart:
exactly the base model or exactly the calibration runs, its slot re-verifies (device
signature included), nothing is left in flight, and a commit once answered is kept."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from edgerund.inference.overlay import OVERLAY_FILE
from edgerund.updates.slotcheck import verify_slot
from edgerund.updates.slots import SlotStore
from tests.helpers.daemon import DaemonProcess
from tests.learning.test_daemon_calibration import config as calibration_config
from tests.learning.test_daemon_drift import drift_of, wait_until

# phase -> what runs after the restart: "base", "cal", or None (resumed: the trial is
# retried, and its probation decides)
PHASES: dict[str, str | None] = {
    "VERIFIED": "base",  # staging wiped, REJECTED(interrupted)
    "STAGE.moved": "base",  # the half-installed slot has no marker: REJECTED(interrupted)
    "PRECHECKED": None,  # precheck rerun, trial
    "TRIAL.flipped": None,  # `current` points at the calibration, the record does not
    "PROBATION": None,
    "COMMITTED": "cal",
}


def updates_row(d: DaemonProcess) -> dict[str, Any]:
    row: dict[str, Any] = d.call("status")["updates"]["models"][0]
    return row


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_during_a_calibration_install(phase: str, tmp_path: Path) -> None:
    cfg = calibration_config(tmp_path)
    cfg["models"][0]["auto_adapt"] = False
    cfg["updates"]["probation_s"] = 2.0
    env = {"EDGERUND_TEST_HOOKS": "1", "EDGERUND_TEST_ABORT_AT": phase}
    d = DaemonProcess(tmp_path, cfg, env=env)
    try:
        d.start()
        d.wait_ready()
        base = d.call("models")[0]["version"]
        # the model runs the loop and the drift monitor has blocks (the input windows are
        # full: no start-up input faults counted against the trial)
        assert wait_until(lambda: drift_of(d).get("blocks", 0) >= 2, 30.0), d.log_text[-2000:]
        # a harmless calibration (no shift), through the whole gate
        with contextlib.suppress(Exception):  # the daemon dies under our feet
            d.call("test-adapt", {"model": "motor-ae", "shift_sd": 0.0}, timeout_s=60.0)
        assert d.proc is not None
        assert d.proc.wait(30) == -9, d.log_text[-3000:]
        d.stop()
        d.extra_env.pop("EDGERUND_TEST_ABORT_AT")
        d.start()
        d.wait_ready()
        settled = wait_until(
            lambda: (
                updates_row(d)["state"] in ("COMMITTED", "ROLLED_BACK", "REJECTED", "IDLE")
                and d.call("status")["updates"]["job"] is None
            ),
            60.0,
            step_s=0.5,
        )
        row = updates_row(d)
        assert settled, (row, d.log_text[-3000:])
        want = PHASES[phase]
        cal = f"{base}+cal.1"
        if want is None:
            want = "cal" if row["state"] == "COMMITTED" else "base"
            if want == "base":  # resumed and rolled back: by its probation, with a reason
                assert row["last_failure"]["reason"].startswith("probation_"), row
        version = cal if want == "cal" else base
        assert row["version"] == version, (phase, row)
        assert wait_until(lambda: d.call("models")[0]["version"] == version, 10.0)
        if want == "base":
            assert row["state"] in ("REJECTED", "ROLLED_BACK"), row
        # the disk agrees: the active slot re-verifies from its signatures, no staging
        store = SlotStore(tmp_path / "state" / "models" / "motor-ae", "motor-ae")
        active = row["active_slot"]
        assert store.verify_slot(active)
        assert (store.dir(active) / OVERLAY_FILE).exists() == (want == "cal")
        assert not store.staging.exists()
        v = verify_slot(
            store.dir(active),
            None,
            model="motor-ae",
            shipped_dir=Path(cfg["models"][0]["path"]),
            device_key=d.call("identity")["signing_key_pem"],
        )
        assert v.ok, v
    finally:
        d.stop()
        time.sleep(0.1)
