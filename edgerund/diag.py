"""The local diagnostics socket: JSON lines over a Unix stream socket.

Protocol (README.md, "Diagnostics socket"): one JSON object per line, one response per
request: `{"id": 1, "cmd": "status", "args": {}}`, response `{"id": 1, "ok": true,
"result": ...}` or `{"id": 1, "ok": false, "error": {"code": "...", "message": "..."}}`.

Robustness rules, each tested: a line longer than `diag.max_request_bytes` gets a
`request_too_large` error and the rest of that line is discarded (the connection stays
usable); malformed JSON, and JSON nested deeper than `MAX_JSON_DEPTH`, gets `bad_request`
(the depth is checked by a linear scan before the JSON parser sees the line, so a line
of 20,000 `[` never reaches the parser's recursion); an unknown command gets
`unknown_command` listing the known ones. A client disconnecting mid-request costs
nothing but its own task.

Admission, so that no local user can lock the technician or root out: at most
`max_clients` connections at once; the last `reserved_privileged` of them are kept for
privileged peers, and no uid other than root holds more than `max_clients_per_uid`. A
refused client gets `busy` and is closed. A client is closed `idle_timeout_s` after its
last *useful* request (one that named a known command): blank lines, garbage and partial
lines do not keep a connection open.

Authorisation: mutating commands (`Command.mutating`) need a privileged peer: root, the
daemon's own uid, or a member of the `diag.group` group. The uid and gid come from
SO_PEERCRED and the supplementary groups from SO_PEERGROUPS, both captured by the kernel
at connect() time; /proc/PID/status is not used because the unit's
`ProtectProc=invisible` hides other users' processes from the daemon.

Handlers run on the event loop; they must be quick or await off-loop work themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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

import msgspec
import structlog

from edgerund.component import Command, CommandError, Peer
from edgerund.errors import ConfigError
from edgerund.jsondepth import too_deep

log = structlog.get_logger("edgerund.diag")

_CRED = struct.Struct("3i")
# SO_PEERGROUPS (Linux >= 4.13) is not exported by every Python's socket module.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("=I")  # gid_t
_NGROUPS_MAX = 65536
MAX_JSON_DEPTH = 64
RESERVED_PRIVILEGED = 4
MAX_CLIENTS_PER_UID = 8


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups as the kernel recorded them at connect()."""
    size = 64 * _GID.size
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            # ERANGE: more groups than the buffer holds (the kernel does not tell
            # Python how many), so retry once with room for NGROUPS_MAX.
            if exc.errno == errno.ERANGE and size < _NGROUPS_MAX * _GID.size:
                size = _NGROUPS_MAX * _GID.size
                continue
            raise
        n = len(raw) // _GID.size
        return tuple(g for (g,) in _GID.iter_unpack(raw[: n * _GID.size]))


def is_privileged(
    uid: int, gid: int, groups: tuple[int, ...], admin_gid: int | None, daemon_uid: int
) -> bool:
    """Root, the daemon's own uid, or a member (primary or supplementary) of the admin group."""
    return (
        uid == 0
        or uid == daemon_uid
        or (admin_gid is not None and (gid == admin_gid or admin_gid in groups))
    )


def peer_credentials(sock: socket.socket, admin_gid: int | None) -> Peer:
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    try:
        groups = peer_groups(sock)
    except OSError:
        groups = ()  # a kernel without SO_PEERGROUPS: primary group only, never /proc
    privileged = is_privileged(uid, gid, groups, admin_gid, os.geteuid())
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups, privileged=privileged)


def json_too_deep(line: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `line` nests arrays/objects deeper than `limit`: run before `json.loads`."""
    return too_deep(line, limit)


def _encode_other(obj: Any) -> Any:
    """What JSON has no type for: numpy scalars and arrays as their values, else the repr."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


# Responses are encoded on the event loop: msgspec's encoder takes a fraction of the time
# of the standard library's for a `status` (the largest answer, polled by scripts), and
# writes strict JSON (a NaN is null, never the bare `NaN` token).
_ENCODER = msgspec.json.Encoder(enc_hook=_encode_other)


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
        reserved_privileged: int = RESERVED_PRIVILEGED,
        max_clients_per_uid: int = MAX_CLIENTS_PER_UID,
    ) -> None:
        self.path = path
        self.commands = dict(commands)
        self.mode = mode
        self.group = group
        self.max_request_bytes = max_request_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_clients = max_clients
        self.command_timeout_s = command_timeout_s
        # Never reserve every slot: unprivileged peers keep at least one.
        self.reserved_privileged = max(0, min(reserved_privileged, max_clients - 1))
        self.max_clients_per_uid = max_clients_per_uid
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], Peer] = {}
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._admin_gid: int | None = None
        self._closing = False

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
        self._closing = True
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

    def admission(self, peer: Peer) -> str | None:
        """None if `peer` may connect now, else why not (pure: counts only)."""
        total = len(self._clients)
        if total >= self.max_clients:
            return f"too many clients ({self.max_clients}); retry"
        if not peer.privileged and total >= self.max_clients - self.reserved_privileged:
            return (
                f"too many clients ({total}); the remaining {self.reserved_privileged} "
                "are kept for root and the admin group; retry"
            )
        if peer.uid != 0:
            mine = sum(1 for p in self._clients.values() if p.uid == peer.uid)
            if mine >= self.max_clients_per_uid:
                return (
                    f"uid {peer.uid} already has {mine} connections "
                    f"(at most {self.max_clients_per_uid}); close one and retry"
                )
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            peer = peer_credentials(writer.get_extra_info("socket"), self._admin_gid)
            refusal = self.admission(peer)
            if refusal is not None:
                self.refused += 1
                await self._send(writer, _error(None, "busy", refusal))
                return
            if task is not None:
                self._clients[task] = peer
            await self._conversation(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except OSError as exc:
            log.warning("diag_connection_failed", error=str(exc))
        except asyncio.CancelledError:
            # Our own shutdown (__aexit__) ends the conversation: finish normally. A task
            # of asyncio.start_server that ends *cancelled* makes Python 3.11's stream
            # callback call task.exception(), which raises, and the loop logs "Exception
            # in callback" with a traceback at every stop with a client connected
            # (found by the soak harness: a hung diagnostics client during SIGTERM).
            if not self._closing:
                raise
        finally:
            if task is not None:
                self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        loop = asyncio.get_running_loop()
        # The deadline moves only on a useful request: bytes alone (blank lines, garbage,
        # a line trickled in slowly) do not keep a connection.
        deadline = loop.time() + self.idle_timeout_s
        buf = bytearray()
        discarding = False
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await reader.read(65536)
            except TimeoutError:
                await self._send(
                    writer,
                    _error(
                        None, "idle_timeout", f"no useful request for {self.idle_timeout_s:g} s"
                    ),
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
                response, useful = await self._answer(line, peer)
                if useful:
                    deadline = loop.time() + self.idle_timeout_s
                await self._send(writer, response)

    def _too_large(self) -> dict[str, Any]:
        self.errors += 1
        return _error(
            None, "request_too_large", f"request line over {self.max_request_bytes} bytes"
        )

    async def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        return (await self._answer(line, peer))[0]

    async def _answer(self, line: bytes, peer: Peer) -> tuple[dict[str, Any], bool]:
        """The response to one request line, and whether it named a known command."""
        self.requests += 1
        if json_too_deep(line):
            self.errors += 1
            return _error(None, "bad_request", f"JSON nested deeper than {MAX_JSON_DEPTH}"), False
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            self.errors += 1
            return _error(None, "bad_request", f"malformed JSON: {exc}"), False
        if not isinstance(req, dict):
            self.errors += 1
            return _error(None, "bad_request", "expected a JSON object with 'cmd'"), False
        req_id = req.get("id")
        cmd_name = req.get("cmd")
        args = req.get("args", {})
        if not isinstance(cmd_name, str):
            self.errors += 1
            return _error(req_id, "bad_request", "missing 'cmd' (a string)"), False
        if not isinstance(args, dict):
            self.errors += 1
            return _error(req_id, "bad_request", "'args' must be an object"), False
        cmd = self.commands.get(cmd_name)
        if cmd is None:
            self.errors += 1
            known = ", ".join(sorted(self.commands))
            return _error(
                req_id, "unknown_command", f"unknown command {cmd_name!r}; known: {known}"
            ), False
        return await self._run(cmd_name, cmd, req_id, args, peer), True

    async def _run(
        self, cmd_name: str, cmd: Command, req_id: Any, args: dict[str, Any], peer: Peer
    ) -> dict[str, Any]:
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
        try:
            data = _ENCODER.encode(msg)
        except (msgspec.EncodeError, TypeError, ValueError, RecursionError) as exc:
            # a result that cannot be encoded
            err = _error(msg.get("id"), "internal", f"unencodable result: {exc}")
            data = json.dumps(err).encode()
        writer.write(data + b"\n")
        await writer.drain()
