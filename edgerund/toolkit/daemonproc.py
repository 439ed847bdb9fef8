"""Run the real daemon (`python -m edgerund.cli run`) as a child process for tools and
benchmarks: a temporary config, state dir and socket, readiness by polling `status` over
the diagnostics socket, clean stop (SIGTERM, then SIGKILL after a grace period).

Kept apart from the test suite's fixtures on purpose (benchmarks never import tests); it
has none of their assertions, only what a driver of a running daemon needs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from edgerund.ctl.client import DiagClient, Unreachable
from edgerund.errors import CommandError

REPO = Path(__file__).resolve().parents[2]


def base_config(work: Path) -> dict[str, Any]:
    return {
        "gateway": {"id": "tool-gw", "site": "lab"},
        "paths": {"state_dir": str(work / "state"), "run_dir": str(work / "run")},
        "diag": {"socket": str(work / "diag.sock"), "mode": 0o666},
        "logging": {"format": "json", "level": "info"},
    }


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DaemonProc:
    def __init__(
        self,
        work: Path,
        overrides: dict[str, Any] | None = None,
        *,
        simulate: bool = False,
        prefix: list[str] | None = None,
    ) -> None:
        self.work = work
        self.config = merge(base_config(work), overrides or {})
        self.socket = str(self.config["diag"]["socket"])
        self.config_path = work / "edgerund.yaml"
        self.log_path = work / "daemon.log"
        self.simulate = simulate
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProc:
        self.work.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "edgerund.cli",
            "run",
            "-c",
            str(self.config_path),
        ]
        if self.simulate:
            cmd.append("--simulate")
        env = dict(os.environ, PYTHONUNBUFFERED="1", EDGERUND_SOCKET=self.socket)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)
            )
        return self

    def __enter__(self) -> DaemonProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds until `status` answers; RuntimeError with the log if it never does."""
        assert self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.call("status", timeout_s=2.0)
                return time.monotonic() - t0
            except (Unreachable, CommandError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"daemon not ready within {timeout_s} s:\n{self.log_tail()}")

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        with DiagClient(self.socket, timeout_s=timeout_s) as c:
            return c.call(cmd, args)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
