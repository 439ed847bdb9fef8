"""Run the real daemon (`python -m edgerund.cli run`) as a child process for tools and
benchmarks: a temporary config, state dir and socket, readiness by polling `status` over
the diagnostics socket, clean stop (SIGTERM, then SIGKILL after a grace period).

`simulated(work, overrides)` is the shipped simulated config (edgerund/data/simulate.yaml)
with its paths moved under `work`, deep-merged with the overrides: the whole daemon over
the emulated plant, what `edgerund run --simulate` runs.

`NotifySocket` stands in for systemd's $NOTIFY_SOCKET: a datagram socket whose listener
thread records every sd_notify message (READY=1, WATCHDOG=1, STATUS=...) with the
monotonic time it arrived; `ready_at` is the arrival of the first READY=1. The test
suite's daemon helper (tests/helpers/daemon.py) and the start-up benchmark use this one
class; pass `notify=True` to `DaemonProc` to get one (`.notify`).

Kept apart from the test suite's fixtures on purpose (benchmarks never import tests); it
has none of their assertions, only what a driver of a running daemon needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
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


def terminate(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> int | None:
    """Stop a daemon as systemd does: SIGTERM, SIGKILL after `timeout_s`; its exit code
    (None when there was no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return proc.returncode


class NotifySocket:
    """A fake $NOTIFY_SOCKET: records each sd_notify datagram as (arrival, fields)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            at = time.monotonic()  # stamped first: READY timing is what benchmarks measure
            fields = dict(
                line.split("=", 1)
                for line in data.decode(errors="replace").splitlines()
                if "=" in line
            )
            self.messages.append((at, fields))

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for _, m in self.messages)

    def times(self, key: str, value: str | None = None) -> list[float]:
        return [t for t, m in self.messages if key in m and (value is None or m[key] == value)]

    @property
    def ready_at(self) -> float | None:
        """Monotonic arrival time of the first READY=1, or None yet."""
        ts = self.times("READY", "1")
        return ts[0] if ts else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class DaemonProc:
    def __init__(
        self,
        work: Path,
        overrides: dict[str, Any] | None = None,
        *,
        simulate: bool = False,
        prefix: list[str] | None = None,
        config: dict[str, Any] | None = None,
        notify: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        """`config`: the whole config (no base, no overrides), e.g. from `simulated`;
        `notify`: run under a `NotifySocket` (`.notify`, `wait_notify_ready`)."""
        self.work = work
        self.config = config if config is not None else merge(base_config(work), overrides or {})
        self.socket = str(self.config["diag"]["socket"])
        self.config_path = work / "edgerund.yaml"
        self.log_path = work / "daemon.log"
        self.simulate = simulate
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.use_notify = notify
        self.notify: NotifySocket | None = None
        self.extra_env = env or {}
        self.started_at = 0.0

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
        if self.use_notify:
            self.notify = NotifySocket(self.work / f"notify-{time.monotonic_ns()}.sock")
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        env.update(self.extra_env)
        self.started_at = time.monotonic()
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

    def wait_notify_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds from exec to READY=1 on the notify socket (`notify=True`)."""
        assert self.proc is not None and self.notify is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            at = self.notify.ready_at
            if at is not None:
                return at - self.started_at
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited {self.proc.returncode} before READY:\n{self.log_tail()}"
                )
            time.sleep(0.01)
        raise RuntimeError(f"no READY=1 within {timeout_s} s:\n{self.log_tail()}")

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        with DiagClient(self.socket, timeout_s=timeout_s) as c:
            return c.call(cmd, args)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        rc = terminate(self.proc, timeout_s)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return rc


def simulated_config(work: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shipped simulated config with its paths and socket under `work` (so runs never
    collide with each other or a developer's simulator), merged with `overrides`."""
    from edgerund.config.loader import simulate_config_path

    cfg: dict[str, Any] = yaml.safe_load(simulate_config_path().read_text())
    cfg["paths"] = {"state_dir": str(work / "state"), "run_dir": str(work / "run")}
    cfg.setdefault("diag", {})
    cfg["diag"]["socket"] = str(work / "diag.sock")
    cfg["diag"]["mode"] = 0o666
    cfg.setdefault("logging", {})["format"] = "json"
    return merge(cfg, overrides or {})


def simulated(work: Path, overrides: dict[str, Any] | None = None, **kw: Any) -> DaemonProc:
    """A `DaemonProc` running `edgerund run --simulate` on `simulated_config(work, ...)`."""
    return DaemonProc(work, config=simulated_config(work, overrides), simulate=True, **kw)
