"""The inbox's persistent record of refused files (refused.py): refusals and crashes while
processing survive a restart, so a poisoned USB stick is not retried in a loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgerund.updates.refused import CRASHED, RefusedRecord, RefusedStore, file_key


def test_refusal_survives_restart(tmp_path: Path) -> None:
    f = tmp_path / "evil.bundle"
    f.write_bytes(b"x" * 1000)
    key = file_key(f)
    s = RefusedStore(tmp_path / "state" / "inbox-refused.json")
    assert s.load() == []
    s.begin(key, f.name, time.time())
    s.finish(key, f.name, "tar_extension", "pax header", time.time())
    s2 = RefusedStore(s.path)
    assert s2.load() == []
    e = s2.refused(key)
    assert e is not None and e.reason == "tar_extension"
    assert (os.stat(s.path).st_mode & 0o777) == 0o600


def test_death_while_processing_is_remembered(tmp_path: Path) -> None:
    f = tmp_path / "crash.bundle"
    f.write_bytes(b"y" * 10)
    key = file_key(f)
    s = RefusedStore(tmp_path / "r.json")
    s.load()
    s.begin(key, f.name, time.time())
    # the daemon dies here: no finish()
    s2 = RefusedStore(tmp_path / "r.json")
    (crashed,) = s2.load()
    assert crashed.reason == CRASHED and crashed.name == "crash.bundle"
    assert s2.refused(key) is not None
    assert RefusedStore(tmp_path / "r.json").load() == []  # reported once


def test_accepted_file_is_forgotten_and_changed_file_is_new(tmp_path: Path) -> None:
    f = tmp_path / "ok.bundle"
    f.write_bytes(b"a" * 10)
    key = file_key(f)
    s = RefusedStore(tmp_path / "r.json")
    s.load()
    s.begin(key, f.name, 1.0)
    s.finish(key, f.name, None, "", 2.0)
    assert s.refused(key) is None and s.record.entries == {}
    s.finish(key, f.name, "expired", "", 3.0)
    f.write_bytes(b"b" * 10)  # rewritten: a new file
    os.utime(f, ns=(1, 1))
    assert s.refused(file_key(f)) is None


def test_record_is_bounded_and_corruption_is_not_fatal(tmp_path: Path) -> None:
    r = RefusedRecord(max_entries=3)
    for i in range(5):
        r.finish(f"k{i}", f"f{i}", "bad", "", float(i))
    assert list(r.entries) == ["k2", "k3", "k4"]
    p = tmp_path / "r.json"
    p.write_bytes(b"{not json")
    s = RefusedStore(p)
    assert s.load() == []
    assert (tmp_path / "r.json.broken").exists()
