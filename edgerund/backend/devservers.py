"""Throw-away PostgreSQL and mosquitto servers for tests, benchmarks and local trials.

`PostgresServer` runs `initdb` on a fresh cluster in a temporary directory and starts
`postgres` on a free loopback port with its unix socket in that directory, so nothing of
the machine's own PostgreSQL (if any) is touched. PostgreSQL refuses to run as root: when
we are root, the cluster directory is handed to the `postgres` system user (the Debian
package creates it) and the server runs as that user (`subprocess.Popen(user=...)`, so
the PID we hold is the postmaster's own and a stop by PID reaches it). Authentication is
`trust` on loopback only. `durable=False` turns fsync off, which is what tests want;
benchmarks keep the default durability.

`MosquittoServer` is the same for mosquitto (persistence in the temp dir, so sessions and
queued messages survive a restart). Both stop by PID (SIGINT/SIGTERM, then SIGKILL),
never by name. The binaries are looked up in PATH and in Debian's versioned PostgreSQL
directory (`/usr/lib/postgresql/*/bin`); `find_postgres_bin` returns None when missing so
callers decide between skipping and failing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_postgres_bin() -> Path | None:
    """The directory holding initdb and postgres, or None."""
    found = shutil.which("initdb")
    if found and os.access(Path(found).resolve().parent / "postgres", os.X_OK):
        return Path(found).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return Path(d)
    return None


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, t: float) -> None:
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {t} s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class PostgresServer:
    """A private PostgreSQL cluster: `start()`, `dsn(dbname)`, `create_database()`, `stop()`,
    and `start()` again on the same port and data (an outage). A given `workdir` must be
    reachable by the `postgres` user when we are root (pytest's tmp dirs are not)."""

    def __init__(self, bindir: Path, *, durable: bool = False, workdir: Path | None = None):
        self.bindir = bindir
        self.durable = durable
        self.host = "127.0.0.1"
        self.port = free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edgerund-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError(
                    "running as root and there is no `postgres` user to run the server as "
                    "(apt-get install postgresql creates it)"
                ) from exc
            self._user = "postgres"

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            argv, user=self._user, group=self._user, capture_output=True, timeout=120, check=False
        )

    def start(self, timeout_s: float = 30.0) -> None:
        data = self.workdir / "data"
        sock = self.workdir / "sock"
        if not data.exists():
            sock.mkdir(parents=True, exist_ok=True)
            if self._user is not None:
                pw = pwd.getpwnam(self._user)
                for p in (self.workdir, sock):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            r = self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
            if r.returncode != 0:
                raise RuntimeError(f"initdb failed: {r.stderr.decode(errors='replace')}")
        opts = [
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"unix_socket_directories={sock}",
            "-c",
            "max_connections=50",
            "-c",
            "shared_buffers=64MB",
        ]
        if not self.durable:
            opts += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        log = open(self.log_path, "ab")  # the child inherits it; closed below
        try:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port), *opts],
                user=self._user,
                group=self._user,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        try:
            _wait_port(self.host, self.port, self.proc, "postgres", timeout_s)
            self._wait_ready(timeout_s)
        except RuntimeError as exc:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{exc}\n{tail}") from exc

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError("postgres does not accept connections") from None
                time.sleep(0.1)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT is PostgreSQL's fast shutdown: abort sessions, checkpoint, exit."""
        _stop(self.proc, signal.SIGINT, timeout_s)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class MosquittoServer:
    """A private mosquitto on a free loopback port, persistence in its work dir."""

    def __init__(self, binary: str, workdir: Path | None = None) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edgerund-mqtt-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        persist = self.workdir / "persist"
        persist.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {persist}/",
                    "max_queued_messages 1000000",
                    "max_inflight_messages 0",
                    f"log_dest file {self.workdir / 'mosquitto.log'}",
                ]
            )
            + "\n"
        )
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.host, self.port, self.proc, "mosquitto", timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop(self.proc, signal.SIGTERM, timeout_s)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
