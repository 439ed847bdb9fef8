"""A small synchronous client of the diagnostics socket (edgerunctl, tests, tools).

Which socket: `--socket`, else $EDGERUND_SOCKET, else the system socket
/run/edgerund/diag.sock; only when that one does not exist, the simulator's
/tmp/edgerund-sim/diag.sock. /tmp is writable by every local user, so that fallback is
used only if the socket and its directory are owned by the caller or root and nobody
else can write the directory (checked with lstat: a symlink is refused, never followed);
otherwise edgerunctl refuses with the reason, so no other user can answer as the daemon
(and, say, name the config file `support-bundle` reads). An explicit path is trusted:
the user chose it.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import stat
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
    if not Path(DEFAULT_SOCKET).exists() and os.path.lexists(SIMULATE_SOCKET):
        return SIMULATE_SOCKET
    return DEFAULT_SOCKET


def untrusted_reason(path: str) -> str | None:
    """Why the socket at `path` may belong to someone other than the caller or root
    (None: it may be used). Nothing is followed: lstat on the socket and its directory."""
    me = os.geteuid()
    for p, kind in ((os.path.dirname(path) or ".", "directory"), (path, "socket")):
        try:
            st = os.lstat(p)
        except OSError as exc:
            return f"cannot inspect {p}: {exc.strerror}"
        want = stat.S_ISDIR if kind == "directory" else stat.S_ISSOCK
        if not want(st.st_mode):
            return f"{p} is not a {kind} (a symlink?)"
        if st.st_uid not in (me, 0):
            return f"{p} is owned by uid {st.st_uid}, not by you (uid {me}) or root"
        if kind == "directory" and st.st_mode & 0o022 and st.st_uid != 0:
            return f"{p} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
        if kind == "directory" and st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            return f"{p} is writable by everyone (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


class Unreachable(EdgerundError):
    """The daemon could not be reached (no socket, refused, permission, timeout)."""


class DiagClient:
    def __init__(self, path: str | None = None, timeout_s: float = 30.0) -> None:
        self.path = path or default_socket()
        # Only the implicit fallback to the simulator's /tmp socket is checked.
        self._check_owner = (
            path is None and not os.environ.get("EDGERUND_SOCKET") and self.path == SIMULATE_SOCKET
        )
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
        if self._check_owner:
            reason = untrusted_reason(self.path)
            if reason is not None:
                raise Unreachable(
                    f"refusing the simulator's socket {self.path}: {reason}, so another "
                    "user may be answering as the daemon. Pass --socket PATH (or set "
                    "EDGERUND_SOCKET) if you trust it"
                )
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
