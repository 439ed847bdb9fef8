"""edgerunctl's fallback to the simulator's /tmp socket trusts only the caller or root.

A local user who plants a socket where the fallback looks could otherwise answer as the
daemon (and name the config file `support-bundle` reads). The planted socket here is a
real fake daemon that answers `status`, so a test passing means it was not asked.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerund.ctl import cli
from edgerund.ctl import client as ctl_client


class FakeDaemon:
    """Answers every request with version 'impostor'; counts connections."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.connections = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                req = json.loads(conn.makefile("rb").readline())
                resp = {"id": req["id"], "ok": True, "result": {"version": "impostor"}}
                conn.sendall(json.dumps(resp).encode() + b"\n")

    def close(self) -> None:
        self.srv.close()


@pytest.fixture
def fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemon]:
    sim_dir = tmp_path / "edgerund-sim"
    sim_dir.mkdir(mode=0o700)
    monkeypatch.delenv("EDGERUND_SOCKET", raising=False)
    monkeypatch.setattr(ctl_client, "DEFAULT_SOCKET", str(tmp_path / "absent" / "diag.sock"))
    monkeypatch.setattr(ctl_client, "SIMULATE_SOCKET", str(sim_dir / "diag.sock"))
    fake = FakeDaemon(sim_dir / "diag.sock")
    yield fake
    fake.close()


def test_fallback_socket_owned_by_the_caller_is_used(
    fallback: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "impostor"
    assert fallback.connections == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
def test_fallback_socket_planted_by_another_uid_is_refused(
    fallback: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chown(fallback.path, 65534, 65534)
    assert cli.main(["--json", "status"]) == 2
    err = capsys.readouterr().err
    assert "refusing the simulator's socket" in err
    assert "owned by uid 65534" in err
    assert fallback.connections == 0, "the impostor was never asked"
    # An explicit --socket is the user's choice and is used.
    assert cli.main(["--socket", str(fallback.path), "--json", "status"]) == 0
    assert fallback.connections == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
def test_fallback_in_a_directory_of_another_uid_is_refused(
    fallback: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chown(fallback.path.parent, 65534, 65534)
    assert cli.main(["--json", "status"]) == 2
    assert "owned by uid 65534" in capsys.readouterr().err
    assert fallback.connections == 0


def test_fallback_through_a_symlink_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    fake = FakeDaemon(real / "diag.sock")
    link_dir = tmp_path / "link"
    link_dir.mkdir(mode=0o700)
    (link_dir / "diag.sock").symlink_to(real / "diag.sock")
    monkeypatch.delenv("EDGERUND_SOCKET", raising=False)
    monkeypatch.setattr(ctl_client, "DEFAULT_SOCKET", str(tmp_path / "absent" / "diag.sock"))
    monkeypatch.setattr(ctl_client, "SIMULATE_SOCKET", str(link_dir / "diag.sock"))
    try:
        assert cli.main(["status"]) == 2
        assert "not a socket" in capsys.readouterr().err
        assert fake.connections == 0
    finally:
        fake.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
def test_simulator_refuses_a_run_dir_another_uid_created(tmp_path: Path) -> None:
    from tests.helpers.daemon import simulated

    planted = tmp_path / "run"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)
    d = simulated(tmp_path, {"paths": {"run_dir": str(planted)}})
    with d:
        assert d.wait(30) == 2
    assert "owned by uid 65534" in d.log_text


def test_simulator_creates_its_dirs_private(tmp_path: Path) -> None:
    from tests.helpers.daemon import simulated

    base = tmp_path / "sim"
    base.mkdir()
    base.chmod(0o755)
    over = {
        "paths": {"run_dir": str(base / "run"), "state_dir": str(base / "run" / "state")},
        "diag": {"socket": str(base / "run" / "diag.sock")},
    }
    with simulated(tmp_path, over) as d:
        d.socket_path = str(base / "run" / "diag.sock")
        d.wait_ready(60)
        for p in (base / "run", base / "run" / "state"):
            assert p.stat().st_mode & 0o777 == 0o700, oct(p.stat().st_mode)
        assert d.stop() == 0


def test_private_dir_rules(tmp_path: Path) -> None:
    from edgerund.errors import ConfigError
    from edgerund.private_dirs import ensure_private_dir

    fresh = tmp_path / "a" / "run"
    ensure_private_dir(fresh, "paths.run_dir")
    assert fresh.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError, match="writable by other users"):
        ensure_private_dir(shared, "paths.run_dir")
    assert shared.stat().st_mode & 0o7777 == 0o1777, "an existing directory is never chmod-ed"
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_private_dir(link, "paths.run_dir")
