"""`edgerunctl check`'s real-time verdict and the shipped drop-in (systemd/realtime.conf).

The verdict logic is a function of (status, threads' scheduling, drop-ins) and is tested
for each case; the probe reads real threads' policies from /proc: a child process whose
threads are set to SCHED_FIFO with sched_setscheduler, as systemd's CPUSchedulingPolicy=
does before exec (needs CAP_SYS_NICE; skipped without it). The drop-in itself is checked
by `systemd-analyze verify` with the unit, in the packaging test's installed root
(tests/packaging/test_deb.py) and here against the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerund.toolkit.check import (
    OK,
    WARN,
    ThreadSched,
    check_realtime,
    realtime_dropins,
    thread_scheduling,
)

REPO = Path(__file__).resolve().parents[2]
DROPIN = REPO / "systemd" / "realtime.conf"
FIFO, OTHER = os.SCHED_FIFO, os.SCHED_OTHER


def test_verdicts() -> None:
    st = {"pid": 100}
    on = check_realtime(st, [ThreadSched(100, FIFO, 50), ThreadSched(101, FIFO, 50)], [])
    assert on.level == OK and "in effect" in on.message and "SCHED_FIFO priority 50" in on.message
    assert "2 of 2 threads" in on.message

    off = check_realtime(st, [ThreadSched(100, OTHER, 0), ThreadSched(101, OTHER, 0)], [])
    assert off.level == OK and "not in effect" in off.message and "SCHED_OTHER" in off.message
    assert "realtime.conf" in off.fix

    asked = check_realtime(st, [ThreadSched(100, OTHER, 0)], ["/etc/x/realtime.conf"])
    assert asked.level == WARN and "asked for but not in effect" in asked.message
    assert "/etc/x/realtime.conf" in asked.message and "daemon-reload" in asked.fix

    partial = check_realtime(st, [ThreadSched(100, OTHER, 0), ThreadSched(101, FIFO, 10)], [])
    assert partial.level == WARN and "partly" in partial.message

    down = check_realtime(None, None, [])
    assert down.level == WARN and "daemon down" in down.message
    unreadable = check_realtime(st, None, [])
    assert unreadable.level == OK and "unknown" in unreadable.message
    assert check_realtime(st, None, ["/etc/x/realtime.conf"]).level == WARN


def test_dropin_detection(tmp_path: Path) -> None:
    d = tmp_path / "edgerund.service.d"
    d.mkdir()
    shutil.copy(DROPIN, d / "realtime.conf")
    (d / "other.conf").write_text("[Service]\n# CPUSchedulingPolicy=fifo\nNice=-10\n")
    (d / "notes.txt").write_text("CPUSchedulingPolicy=fifo\n")  # not a drop-in (no .conf)
    assert realtime_dropins((str(d), str(tmp_path / "missing"))) == [str(d / "realtime.conf")]
    (d / "realtime.conf").write_text("[Service]\nCPUSchedulingPolicy=other\n")
    assert realtime_dropins((str(d),)) == []


@pytest.fixture
def two_threads() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A process with its main thread and one more; yields it and the second thread's id."""
    code = (
        "import threading, sys, time\n"
        "ev = threading.Event()\n"
        "t = threading.Thread(target=ev.wait, daemon=True); t.start()\n"
        "print(t.native_id, flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    tid = int(p.stdout.readline())
    try:
        yield p, tid
    finally:
        p.kill()
        p.wait()


def _fifo(tid: int, prio: int) -> None:
    try:
        os.sched_setscheduler(tid, FIFO, os.sched_param(prio))
    except PermissionError:
        pytest.skip("no CAP_SYS_NICE here: cannot make a thread SCHED_FIFO")


def test_probe_reads_real_thread_policies(two_threads: tuple[subprocess.Popen[str], int]) -> None:
    p, tid = two_threads
    threads = thread_scheduling(p.pid)
    assert threads is not None and {t.tid for t in threads} >= {p.pid, tid}
    assert check_realtime({"pid": p.pid}, threads, []).message.startswith("not in effect")

    _fifo(tid, 10)  # one thread only, as `chrt -p` on a thread would
    r = check_realtime({"pid": p.pid}, thread_scheduling(p.pid), [])
    assert r.level == WARN and "partly in effect: 1 of" in r.message

    for t in thread_scheduling(p.pid) or []:  # the whole process, as the drop-in does
        _fifo(t.tid, 50)
    r = check_realtime({"pid": p.pid}, thread_scheduling(p.pid), [])
    assert r.level == OK and "in effect: event-loop thread SCHED_FIFO priority 50" in r.message
    assert thread_scheduling(2**22 + 12345) is None  # no such process


def test_dropin_verifies_with_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    text = DROPIN.read_text()
    assert "CPUSchedulingPolicy=fifo" in text and "CPUSchedulingPriority=50" in text
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    (unit_dir / "edgerund.service.d").mkdir(parents=True)
    # The unit names /usr/bin/edgerund and /bin/kill: give the root executables there.
    for exe in ("usr/bin/edgerund", "bin/kill"):
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)
    shutil.copy(REPO / "systemd" / "edgerund.service", unit_dir / "edgerund.service")

    def verify(dropin: str) -> subprocess.CompletedProcess[str]:
        (unit_dir / "edgerund.service.d" / "realtime.conf").write_text(dropin)
        return subprocess.run(
            [analyze, "verify", f"--root={root}", str(unit_dir / "edgerund.service")],
            capture_output=True,
            text=True,
        )

    good = verify(text)
    problems = [ln for ln in (good.stdout + good.stderr).splitlines() if "realtime.conf" in ln]
    assert not problems, good.stdout + good.stderr
    # ... and the drop-in is really read: a bad value in it is reported.
    bad = verify(text.replace("CPUSchedulingPolicy=fifo", "CPUSchedulingPolicy=fastest"))
    assert "realtime.conf" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
