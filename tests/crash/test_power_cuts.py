"""Power cuts, not only SIGKILL (issue #12): the fsync ordering of the slot store and the
spool, checked ALICE-style on traces of the real code (edgerund/toolkit/crashsim).

Bounded for CI: every distinct update state (about 200), a sample of 300 spool states (of
about 2,150; the full run is `make crash-check`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerund.toolkit.crashsim import check, fsmodel, record
from tests.crash.conftest import needs_strace

REPO = Path(__file__).resolve().parents[2]

pytestmark = needs_strace


def _quiet(msg: str) -> None:
    print(msg)


def _lost_after_marker(rec: record.Recording) -> int:
    """States after the `written` marker in which state.json is missing."""
    at = dict(rec.markers)["written"]
    lost = 0
    for st in fsmodel.crash_states(rec.initial, rec.ops):
        if st.point >= at and not any(p == "models/m1/state.json" for p, _, _ in st.key):
            lost += 1
    return lost


def test_directories_created_for_a_file_are_made_durable(tmp_path: Path) -> None:
    """Regression of what the check found: `models/` (and `updates/`, the spool directory)
    were created without an fsync of their parent, so a committed update vanished with the
    directory. make_dirs fsyncs the parent of each directory it creates."""
    plain = record.record_dirs(tmp_path / "plain", durable=False)
    assert _lost_after_marker(plain) > 0  # the checker sees the old bug
    durable = record.record_dirs(tmp_path / "durable", durable=True)
    assert _lost_after_marker(durable) == 0


@pytest.mark.skipif(
    not (REPO / "models" / "reference" / "manifest.json").exists(), reason="no reference model"
)
def test_update_survives_every_power_cut(tmp_path: Path) -> None:
    rep = check.run_update(tmp_path, log=_quiet)
    assert rep.states_checked == rep.states_distinct >= 60
    assert rep.barriers > 20  # the trace really holds the daemon's fsyncs
    assert not rep.inconsistent, rep.inconsistent[:3]


def test_spool_keeps_every_acknowledged_batch(tmp_path: Path) -> None:
    rep = check.run_spool(tmp_path, limit=300, log=_quiet)
    assert rep.states_checked >= 300
    assert not rep.inconsistent, rep.inconsistent[:3]
