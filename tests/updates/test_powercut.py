"""SIGKILL at every state boundary (EDGERUND_TEST_ABORT_AT), then a restart: exactly the
old or exactly the new model is active, the disk is consistent, and the loop runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgerund.updates.slots import SlotStore
from tests.updates import models as M
from tests.updates.support import Publisher, seed_dir

REPO = Path(__file__).resolve().parents[2]

# phase -> the version that must be active after the restart
COMMIT_PATH = {
    "RECEIVED": "1.0.0",
    "VERIFIED": "1.0.0",
    "STAGE.invalidated": "1.0.0",
    "STAGE.moved": "1.0.0",
    "STAGED": "2.0.0",  # resumed: precheck rerun, trial, commit
    "PRECHECKED": "2.0.0",
    "TRIAL": "2.0.0",  # attempt 1 died: retried
    "TRIAL.flipped": "2.0.0",
    "PROBATION": "2.0.0",
    "COMMITTED": "2.0.0",
    "COMMITTED.ratcheted": "2.0.0",
}
ROLLBACK_PATH = {"ROLLED_BACK": "1.0.0", "ROLLED_BACK.flipped": "1.0.0"}


def run_stub(
    tmp: Path, bundle: Path | None, abort_at: str | None
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env.pop("EDGERUND_TEST_ABORT_AT", None)
    if abort_at:
        env["EDGERUND_TEST_ABORT_AT"] = abort_at
    cmd = [sys.executable, "-m", "tests.updates.daemon_stub", str(tmp)] + (
        [str(bundle)] if bundle else []
    )
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=120)


def check_consistent(tmp: Path, expect: str) -> dict[str, Any]:
    res = json.loads((tmp / "result.json").read_text())
    store = SlotStore(tmp / "state" / "models" / "m1", "m1")
    cur = os.readlink(store.current)
    rec, note = store.load_record()
    assert rec is not None and note is None
    assert rec.state in ("COMMITTED", "ROLLED_BACK", "REJECTED", "IDLE"), rec.state
    assert rec.active == cur
    assert store.verify_slot(cur)  # every file re-hashes to the marker
    assert store.marker(cur).version == expect
    assert rec.slots[cur].version == expect
    assert res["runner_version"] == expect
    assert Path(res["runner_dir"]) == store.dir(cur)
    assert res["ticks"] > 3
    assert not store.staging.exists()
    other = "b" if cur == "a" else "a"
    if rec.slots[other] is None:
        assert store.marker(other) is None
    counter = tmp / "state" / "updates" / "security_counter"
    stored = int(counter.read_text()) if counter.exists() else 0
    assert stored == (3 if expect == "2.0.0" else 0)
    return res


def _prepare(tmp: Path, publisher: Publisher, rollback: bool) -> Path:
    seed_dir(tmp / "shipped", M.affine())
    publisher.write_keyring(tmp / "keyring.json")
    kw: dict[str, Any] = {"health": {"probation_s": 0.3}}
    if rollback:  # fails probation (score far above its declared maximum)
        kw = {"model": M.affine(100.0), "health": {"probation_s": 1.0, "score_max": 10.0}}
    return publisher.bundle(tmp / "v2.bundle", version="2.0.0", counter=3, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("phase", [*COMMIT_PATH, *ROLLBACK_PATH])
def test_sigkill_at_boundary(phase: str, tmp_path: Path, publisher: Publisher) -> None:
    expect = COMMIT_PATH.get(phase) or ROLLBACK_PATH[phase]
    bundle = _prepare(tmp_path, publisher, rollback=phase in ROLLBACK_PATH)
    p = run_stub(tmp_path, bundle, phase)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-3000:]
    assert not (tmp_path / "result.json").exists()
    p = run_stub(tmp_path, None, None)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    check_consistent(tmp_path, expect)


@pytest.mark.slow
def test_sigkill_in_trial_forever_gives_up(tmp_path: Path, publisher: Publisher) -> None:
    """A model that kills the daemon every time it is trialled: after `attempts` deaths the
    restart rolls back for good (no boot loop)."""
    bundle = _prepare(tmp_path, publisher, rollback=False)
    assert run_stub(tmp_path, bundle, "TRIAL.flipped").returncode == -signal.SIGKILL
    assert run_stub(tmp_path, None, "TRIAL.flipped").returncode == -signal.SIGKILL
    p = run_stub(tmp_path, None, "TRIAL.flipped")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    res = check_consistent(tmp_path, "1.0.0")
    m1 = res["status"]["models"][0]
    assert m1["state"] == "ROLLED_BACK" and m1["last_failure"]["reason"] == "crash_loop"
