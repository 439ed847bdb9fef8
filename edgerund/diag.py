"""The local diagnostics socket: JSON lines over a Unix stream socket.

Protocol (DESIGN.md §4): one JSON object per line, one response per request:
request `{"id": 1, "cmd": "status", "args": {}}`, response `{"id": 1, "ok": true,
"result": ...}` or `{"id": 1, "ok": false, "error": {"code": "...", "message": "..."}}`.

Robustness rules, each tested: a line longer than `diag.max_request_bytes` gets a
`request_too_large` error and the rest of that line is discarded (the connection stays
usable); malformed JSON gets `bad_request`; an unknown command gets `unknown_command`
listing the known ones; a client idle for `idle_timeout_s` is closed; at most
`max_clients` connections are served at once (the next gets `busy` and is closed).
A client that disconnects mid-request costs nothing but its own task.

Authorisation: mutating commands (`Command.mutating`) need a privileged peer: root, the
daemon's own uid, or a member of the `diag.group` group, from SO_PEERCRED (+ the peer's
supplementary groups from /proc/PID/status).

Handlers run on the event loop; they must be quick or await off-loop work themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from edgerund.component import Command, CommandError, Peer
from edgerund.errors import ConfigError

log = structlog.get_logger("edgerund.diag")

_CRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket, admin_gid: int | None) -> Peer:
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
                break
    privileged = (
        uid == 0
        or uid == os.geteuid()
        or (admin_gid is not None and (gid == admin_gid or admin_gid in groups))
    )
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups, privileged=privileged)


def _error(req_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": {"code": code, "message": message}}


class DiagServer:
    """Serves `commands` (name -> Command) on a Unix socket."""

    name = "diag"

    def __init__(
        self,
        path: str,
        commands: Mapping[str, Command],
        *,
        mode: int = 0o660,
        group: str | None = "edgerund",
        max_request_bytes: int = 65536,
        idle_timeout_s: float = 300.0,
        max_clients: int = 64,
        command_timeout_s: float = 120.0,
    ) -> None:
        self.path = path
        self.commands = dict(commands)
        self.mode = mode
        self.group = group
        self.max_request_bytes = max_request_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_clients = max_clients
        self.command_timeout_s = command_timeout_s
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._admin_gid: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        path = Path(self.path)
        if self._prepare_path(path) and await self._socket_is_live(path):
            raise ConfigError(
                f"{path} is in use by a running edgerund; stop it first or choose "
                "another diag.socket",
                path="diag.socket",
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from a daemon that died
        if self.group:
            with contextlib.suppress(KeyError):
                self._admin_gid = grp.getgrnam(self.group).gr_gid
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=self.max_request_bytes + 1
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {path}: {exc.strerror}", path="diag.socket"
            ) from None
        os.chmod(path, self.mode)
        if self._admin_gid is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(path, -1, self._admin_gid)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._clients):
            t.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @staticmethod
    def _prepare_path(path: Path) -> bool:
        """Create the directory; True if a socket file already exists at `path`."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the socket directory {path.parent}: {exc.strerror}",
                path="diag.socket",
            ) from None
        if not (path.exists() or path.is_symlink()):
            return False
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(
                f"{path} exists and is not a socket; remove it or choose another diag.socket",
                path="diag.socket",
            )
        return True

    @staticmethod
    async def _socket_is_live(path: Path) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "diag": {
                "socket": self.path,
                "clients": len(self._clients),
                "requests": self.requests,
                "errors": self.errors,
                "refused": self.refused,
            }
        }

    # ------------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= self.max_clients:
            self.refused += 1
            await self._send(
                writer, _error(None, "busy", f"too many clients ({self.max_clients}); retry")
            )
            writer.close()
            return
        if task is not None:
            self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_credentials(sock, self._admin_gid)
            await self._conversation(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        buf = bytearray()
        discarding = False
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), self.idle_timeout_s)
            except TimeoutError:
                await self._send(
                    writer,
                    _error(None, "idle_timeout", f"no request for {self.idle_timeout_s:g} s"),
                )
                return
            if not chunk:
                return
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > self.max_request_bytes:
                        if not discarding:
                            await self._send(writer, self._too_large())
                        discarding = True
                        buf.clear()
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if discarding:
                    discarding = False  # end of the oversized line
                    continue
                if len(line) > self.max_request_bytes:
                    await self._send(writer, self._too_large())
                    continue
                if not line.strip():
                    continue
                await self._send(writer, await self.handle_line(line, peer))

    def _too_large(self) -> dict[str, Any]:
        self.errors += 1
        return _error(
            None, "request_too_large", f"request line over {self.max_request_bytes} bytes"
        )

    async def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        self.requests += 1
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self.errors += 1
            return _error(None, "bad_request", f"malformed JSON: {exc}")
        if not isinstance(req, dict):
            self.errors += 1
            return _error(None, "bad_request", "expected a JSON object with 'cmd'")
        req_id = req.get("id")
        cmd_name = req.get("cmd")
        args = req.get("args", {})
        if not isinstance(cmd_name, str):
            self.errors += 1
            return _error(req_id, "bad_request", "missing 'cmd' (a string)")
        if not isinstance(args, dict):
            self.errors += 1
            return _error(req_id, "bad_request", "'args' must be an object")
        cmd = self.commands.get(cmd_name)
        if cmd is None:
            self.errors += 1
            known = ", ".join(sorted(self.commands))
            return _error(
                req_id, "unknown_command", f"unknown command {cmd_name!r}; known: {known}"
            )
        if cmd.mutating and not peer.privileged:
            self.errors += 1
            log.warning("diag_refused", cmd=cmd_name, uid=peer.uid, pid=peer.pid)
            return _error(
                req_id,
                "permission_denied",
                f"{cmd_name!r} changes the gateway; run it as root or as a member "
                f"of the '{self.group}' group (you are uid {peer.uid})",
            )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.command_timeout_s):
                result = await cmd.handler(args, peer)
        except CommandError as exc:
            self.errors += 1
            return _error(req_id, exc.code, exc.message)
        except TimeoutError:
            self.errors += 1
            return _error(
                req_id, "timeout", f"{cmd_name} did not finish in {self.command_timeout_s:g} s"
            )
        except Exception as exc:
            self.errors += 1
            log.exception("diag_command_failed", cmd=cmd_name)
            return _error(req_id, "internal", f"{cmd_name} failed: {exc!r}")
        if cmd.mutating:
            log.info(
                "diag_command",
                cmd=cmd_name,
                uid=peer.uid,
                ms=round((time.monotonic() - started) * 1e3, 1),
            )
        return {"id": req_id, "ok": True, "result": result}

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(json.dumps(msg, separators=(",", ":"), default=repr).encode() + b"\n")
        await writer.drain()
