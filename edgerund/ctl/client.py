"""A small synchronous client of the diagnostics socket (edgerunctl, tests, tools)."""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from edgerund.errors import CommandError, EdgerundError

DEFAULT_SOCKET = "/run/edgerund/diag.sock"
SIMULATE_SOCKET = "/tmp/edgerund-sim/diag.sock"


def default_socket() -> str:
    """$EDGERUND_SOCKET, else the system socket, else the simulated daemon's socket."""
    env = os.environ.get("EDGERUND_SOCKET")
    if env:
        return env
    if not Path(DEFAULT_SOCKET).exists() and Path(SIMULATE_SOCKET).exists():
        return SIMULATE_SOCKET
    return DEFAULT_SOCKET


class Unreachable(EdgerundError):
    """The daemon could not be reached (no socket, refused, permission, timeout)."""


class DiagClient:
    def __init__(self, path: str | None = None, timeout_s: float = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    def __enter__(self) -> DiagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            s.close()
            raise Unreachable(
                f"no daemon socket at {self.path} (is edgerund running? "
                "`systemctl status edgerund`; or pass --socket)"
            ) from None
        except PermissionError:
            s.close()
            raise Unreachable(
                f"permission denied on {self.path} (run as root or join the "
                "edgerund group: `sudo usermod -aG edgerund $USER`)"
            ) from None
        except OSError as exc:
            s.close()
            raise Unreachable(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        self._sock = s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.connect()
        assert self._sock is not None
        req_id = next(self._ids)
        line = json.dumps({"id": req_id, "cmd": cmd, "args": args or {}}).encode() + b"\n"
        try:
            self._sock.sendall(line)
            while b"\n" not in self._buf:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    raise Unreachable(f"the daemon closed the connection on {self.path}")
                self._buf += chunk
        except TimeoutError:
            self.close()
            raise Unreachable(f"no answer from {self.path} within {self.timeout_s:g} s") from None
        except OSError as exc:
            self.close()
            raise Unreachable(f"connection to {self.path} failed: {exc}") from None
        raw, self._buf = self._buf.split(b"\n", 1)
        resp = json.loads(raw)
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise CommandError(str(err.get("code", "error")), str(err.get("message", "")))
        return resp.get("result")
