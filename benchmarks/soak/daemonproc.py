"""The daemon as systemd runs it, for the soak harness: `edgerund run --simulate` as a child
process with the unit's `Environment=` and a $NOTIFY_SOCKET listener standing in for
systemd, so the harness knows when a (re)started daemon is READY=1, which ends its "down by
design" window.

Kept out of the test suite on purpose (benchmarks never import tests): it has none of the
fixtures' assertions; a daemon that exits or never gets ready raises RuntimeError with the
tail of its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.peers import unit
from edgerund.toolkit.daemonproc import NotifySocket, terminate

REPO = Path(__file__).resolve().parents[2]


class SupervisedDaemon:
    """One daemon directory (config, socket, log); `start()` execs a new process each time
    (the log is appended to), `stop()` is SIGTERM then SIGKILL."""

    def __init__(self, work: Path, config_text: str, *, env: dict[str, str] | None = None):
        self.work = work
        self.socket_path = str(work / "diag.sock")
        self.config_path = work / "edgerund.yaml"
        self.config_path.write_text(config_text)
        self.config: dict[str, Any] = {}
        self.extra_env = env or {}
        self.log_path = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)

    def start(self) -> SupervisedDaemon:
        if self.notify is not None:
            self.notify.close()
        notify_path = self.work / f"notify-{time.monotonic_ns()}.sock"
        self.notify = NotifySocket(notify_path)
        env = dict(os.environ)
        env.pop("WATCHDOG_USEC", None)
        env.update(unit.environment())
        env.update(
            {
                "NOTIFY_SOCKET": str(notify_path),
                "PYTHONUNBUFFERED": "1",
                "EDGERUND_SOCKET": self.socket_path,
            }
        )
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "edgerund.cli", "run", "-c", str(self.config_path)]
        cmd.append("--simulate")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)
            )
        return self

    @property
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.notify.has("READY", "1"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited {self.proc.returncode} before READY:\n{self.log_text[-4000:]}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"no READY=1 within {timeout_s} s:\n{self.log_text[-4000:]}")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        rc = terminate(self.proc, timeout_s)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return rc
