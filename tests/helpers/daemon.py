"""Run the real daemon as a subprocess with a temporary config, socket and state dir.

    with DaemonProcess(tmp_path, {"sensors": [...]}) as d:
        d.wait_ready()
        st = d.call("status")

The config is the minimal valid one (gateway, paths, diag under tmp_path) deep-merged with
the overrides. A NotifySocket stands in for systemd: it collects READY=1, WATCHDOG=1 and
STATUS= datagrams so tests can assert on them. WATCHDOG_USEC is set so the daemon pings.
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


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class NotifySocket:
    """A fake $NOTIFY_SOCKET: a datagram socket collecting sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for _, m in self.messages)

    def times(self, key: str) -> list[float]:
        return [t for t, m in self.messages if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.sock.close()


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
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    rc = self.proc.wait(5)
            else:
                rc = self.proc.returncode
        if self.notify is not None:
            with contextlib.suppress(Exception):
                self.notify.close()
            self.notify = None
        return rc


def simulated(tmp_path: Path, overrides: dict[str, Any] | None = None, **kw: Any) -> DaemonProcess:
    """A DaemonProcess on the shipped simulated config, with its paths moved under
    tmp_path (so tests never collide with each other or a developer's simulator)."""
    from edgerund.config.loader import simulate_config_path

    cfg = yaml.safe_load(simulate_config_path().read_text())
    cfg["paths"] = {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")}
    cfg.setdefault("diag", {})
    cfg["diag"]["socket"] = str(tmp_path / "diag.sock")
    cfg["diag"]["mode"] = 0o666
    cfg.setdefault("logging", {})["format"] = "json"
    cfg = deep_merge(cfg, overrides or {})
    d = DaemonProcess(
        tmp_path, config_text=yaml.safe_dump(cfg, sort_keys=False), simulate=True, **kw
    )
    d.config = cfg
    return d
