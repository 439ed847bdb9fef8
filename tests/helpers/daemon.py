"""Run the real daemon as a subprocess with a temporary config, socket and state dir.

    with DaemonProcess(tmp_path, {"sensors": [...]}) as d:
        d.wait_ready()
        st = d.call("status")

The config is the minimal valid one (gateway, paths, diag under tmp_path) deep-merged with
the overrides. A NotifySocket (edgerund/toolkit/daemonproc.py, shared with the benchmarks)
stands in for systemd: it collects READY=1, WATCHDOG=1 and STATUS= datagrams so tests can
assert on them. WATCHDOG_USEC is set so the daemon pings.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from edgerund.ctl.client import DiagClient, Unreachable
from edgerund.errors import CommandError
from edgerund.toolkit.daemonproc import NotifySocket, merge, simulated_config, terminate

__all__ = ["DaemonProcess", "NotifySocket", "deep_merge", "simulated"]

REPO = Path(__file__).resolve().parents[2]


deep_merge = merge


class DaemonProcess:
    def __init__(
        self,
        tmp_path: Path,
        overrides: dict[str, Any] | None = None,
        *,
        simulate: bool = False,
        config_text: str | None = None,
        env: dict[str, str] | None = None,
        watchdog_usec: int = 2_000_000,
    ) -> None:
        self.tmp = tmp_path
        self.socket_path = str(tmp_path / "diag.sock")
        self.config_path = tmp_path / "edgerund.yaml"
        base: dict[str, Any] = {
            "gateway": {"id": "test-gw", "site": "lab"},
            "paths": {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
            "diag": {"socket": self.socket_path, "mode": 0o666},
            "logging": {"format": "json", "level": "info"},
        }
        self.config: dict[str, Any] = deep_merge(base, overrides or {})
        if config_text is None:
            self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        else:
            self.config_path.write_text(config_text)
        self.simulate = simulate
        self.extra_env = env or {}
        self.watchdog_usec = watchdog_usec
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        self.log_path = tmp_path / "daemon.log"
        self.started_at = 0.0

    def write_config(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        self.config_path.write_text(text)

    def start(self) -> DaemonProcess:
        notify_path = self.tmp / f"notify-{time.monotonic_ns()}.sock"
        self.notify = NotifySocket(notify_path)
        env = dict(os.environ)
        env.update(
            {
                "NOTIFY_SOCKET": str(notify_path),
                "PYTHONUNBUFFERED": "1",
                "EDGERUND_SOCKET": self.socket_path,
            }
        )
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "edgerund.cli", "run", "-c", str(self.config_path)]
        if self.simulate:
            cmd.append("--simulate")
        self.started_at = time.monotonic()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)
        )
        log.close()
        return self

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait for READY=1; returns seconds from exec. Fails with the daemon's log."""
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.notify.has("READY", "1"):
                return self.notify.times("READY")[0] - self.started_at
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before READY:\n{self.log_text[-4000:]}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no READY=1 within {timeout_s} s:\n{self.log_text[-4000:]}")

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        with DiagClient(self.socket_path, timeout_s=timeout_s) as c:
            return c.call(cmd, args)

    def try_call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return self.call(cmd, args)
        except (Unreachable, CommandError):
            return None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        rc = terminate(self.proc, timeout_s)
        if self.notify is not None:
            with contextlib.suppress(Exception):
                self.notify.close()
            self.notify = None
        return rc


def simulated(tmp_path: Path, overrides: dict[str, Any] | None = None, **kw: Any) -> DaemonProcess:
    """A DaemonProcess on the shipped simulated config, with its paths moved under
    tmp_path (so tests never collide with each other or a developer's simulator)."""
    cfg = simulated_config(tmp_path, overrides)
    d = DaemonProcess(
        tmp_path, config_text=yaml.safe_dump(cfg, sort_keys=False), simulate=True, **kw
    )
    d.config = cfg
    return d
