"""The daemon as a subprocess: READY, the status contract, SIGHUP, SIGTERM, the watchdog."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgerund.ctl.client import DiagClient
from edgerund.errors import CommandError
from tests.helpers.daemon import DaemonProcess, simulated

STATUS_KEYS = {
    "version",
    "uptime_s",
    "loop_lag_ms",
    "identity",
    "sensors",
    "loops",
    "models",
    "telemetry",
}


def test_ready_status_and_clean_sigterm(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path) as d:
        ready_s = d.wait_ready()
        assert ready_s < 30
        st = d.call("status")
        assert STATUS_KEYS <= st.keys()
        assert {"kind", "key_id"} <= st["identity"].keys()
        assert {"connected", "backlog_batches", "sent_batches", "lost_samples"} <= st[
            "telemetry"
        ].keys()
        assert isinstance(st["loop_lag_ms"], float)
        assert st["uptime_s"] >= 0
        # The CLI with --json gives the same contract.
        out = subprocess.run(
            [sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path, "--json", "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert '"loop_lag_ms"' in out.stdout
        human = subprocess.run(
            [sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path, "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert human.returncode == 0 and "gateway test-gw" in human.stdout
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(5) == 0
        assert time.monotonic() - t0 < 5
        assert not Path(d.socket_path).exists(), "socket removed on orderly exit"
        assert d.notify is not None and d.notify.has("STOPPING", "1")


def test_ready_carries_a_status_line_for_systemctl(tmp_path: Path) -> None:
    # `systemctl status` shows the STATUS= of the READY datagram: its counts are status's
    with simulated(tmp_path) as d:
        d.wait_ready()
        st = d.call("status")
        assert d.notify is not None
        line = next(m["STATUS"] for _, m in d.notify.messages if m.get("READY") == "1")
        m = re.match(r"(\d+)/(\d+) sensors ok, (\d+) loops, (\d+) models, uplink ", line)
        assert m, line
        assert 0 < int(m[1]) <= int(m[2]) == len(st["sensors"])
        assert int(m[3]) == len(st["loops"]) > 0 and int(m[4]) == len(st["models"]) > 0


def test_sighup_with_bad_file_keeps_running(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path) as d:
        d.wait_ready()
        good = d.config_path.read_text()
        d.write_config(good + "logging:\n  level: loud\n")  # duplicate key + bad value
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if d.call("status")["reloads"]["failed"] >= 1:
                break
            time.sleep(0.1)
        st = d.call("status")
        assert st["reloads"]["failed"] == 1 and d.proc is not None and d.proc.poll() is None
        events = d.call("log", {"n": 50})
        failed = [e for e in events if e.get("event") == "config_reload_failed"]
        assert failed and str(d.config_path) in failed[0]["reason"]
        # A good file with a new log level is applied live.
        d.write_config(good.replace("level: info", "level: debug"))
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and d.call("status")["reloads"]["ok"] < 1:
            time.sleep(0.1)
        assert d.call("status")["reloads"]["ok"] == 1
        assert d.stop() == 0


def test_watchdog_pings_stop_while_loop_blocked(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, env={"EDGERUND_TEST_HOOKS": "1"}, watchdog_usec=1_000_000) as d:
        d.wait_ready()
        assert d.notify is not None
        time.sleep(2.0)
        before = len(d.notify.times("WATCHDOG"))
        assert before >= 2, "watchdog pings flow while the loop is healthy"
        t_block = time.monotonic()
        d.call("test-block-loop", {"seconds": 3.0})
        t_unblock = time.monotonic()
        time.sleep(1.5)
        pings = d.notify.times("WATCHDOG")
        during = [t for t in pings if t_block + 0.2 < t < t_unblock - 0.1]
        after = [t for t in pings if t > t_unblock]
        assert during == [], f"pings while blocked at {during}"
        assert after, "pings resume once the loop is healthy again"
        assert d.stop() == 0


def test_socket_bad_input(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, {"diag": {"max_request_bytes": 2048}}) as d:
        d.wait_ready()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(d.socket_path)
        f = s.makefile("rwb")

        def ask(raw: bytes) -> dict:
            import json

            f.write(raw)
            f.flush()
            return json.loads(f.readline())

        r = ask(b"{not json\n")
        assert r["ok"] is False and r["error"]["code"] == "bad_request"
        r = ask(b'{"id": 7, "cmd": "frobnicate"}\n')
        assert r["id"] == 7 and r["error"]["code"] == "unknown_command"
        assert "status" in r["error"]["message"]
        r = ask(b"[1, 2]\n")
        assert r["error"]["code"] == "bad_request"
        r = ask(b'{"id": 8, "cmd": "log", "args": {"n": -1}}\n')
        assert r["error"]["code"] == "bad_args"
        r = ask(b'{"id": 1, "cmd": "status", "pad": "' + b"x" * 5000 + b'"}\n')
        assert r["error"]["code"] == "request_too_large"
        # The same connection still works after every error.
        r = ask(b'{"id": 2, "cmd": "ping"}\n')
        assert r["ok"] is True and r["id"] == 2
        s.close()
        # A client that disconnects mid-request does not disturb the daemon.
        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s2.connect(d.socket_path)
        s2.sendall(b'{"id": 3, "cmd": "sta')
        s2.close()
        # Many concurrent clients are all answered.
        clients = [DiagClient(d.socket_path) for _ in range(20)]
        try:
            assert all(c.call("ping")["pong"] for c in clients)
        finally:
            for c in clients:
                c.close()
        assert d.call("status")["version"]
        assert d.stop() == 0


def _call_as(uid: int, path: str, cmd: str) -> tuple[bool, str]:
    """Fork, drop to `uid`, send one command; return (ok, error code)."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no Python imports after this point that need /root
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            s.sendall(json.dumps({"id": 1, "cmd": cmd, "args": {"model": "x"}}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            os.write(w, data)
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    resp = json.loads(out)
    return resp["ok"], (resp.get("error") or {}).get("code", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_mutating_command_refused_for_unprivileged_peer(tmp_path: Path) -> None:
    import tempfile

    # The peer must be able to reach the socket: a world-traversable directory.
    sock_dir = Path(tempfile.mkdtemp(prefix="edgerund-peer-"))
    sock_dir.chmod(0o755)
    sock = str(sock_dir / "diag.sock")
    with DaemonProcess(
        tmp_path, {"diag": {"group": "edgerund-test-nonexistent", "socket": sock}}
    ) as d:
        d.socket_path = sock
        d.wait_ready()
        ok, code = _call_as(65534, d.socket_path, "reload")
        assert not ok and code == "permission_denied"
        ok, code = _call_as(65534, d.socket_path, "status")
        assert ok, "read-only commands are open to anyone who can reach the socket"
        assert d.call("reload")["reloaded"] is True  # root may
        assert d.stop() == 0


def test_socket_in_use_refused_and_stale_replaced(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path) as d:
        d.wait_ready()
        second = (
            DaemonProcess(tmp_path / "second", {"diag": {"socket": d.socket_path}})
            if (tmp_path / "second").mkdir() is None
            else None
        )
        assert second is not None
        second.start()
        rc = second.wait(20)
        assert rc == 2
        assert "in use by a running edgerund" in second.log_text
        assert d.call("ping")["pong"]
        d.kill()  # leaves a stale socket behind
    assert Path(d.socket_path).exists()
    with DaemonProcess(tmp_path) as d2:
        d2.wait_ready()
        assert d2.call("ping")["pong"]
        assert d2.stop() == 0


def test_unwritable_state_dir_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with DaemonProcess(tmp_path, {"paths": {"state_dir": str(blocker / "state")}}) as d:
        rc = d.wait(20)
        assert rc == 2
        assert "paths.state_dir" in d.log_text and "not writable" in d.log_text
        assert "Traceback" not in d.log_text


def test_invalid_config_exit_2_one_line(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, config_text="gateway:\n  id: gw\n  bogus: 1\n") as d:
        assert d.wait(20) == 2
        assert "bogus" in d.log_text and "Traceback" not in d.log_text


def test_ctl_exit_codes(tmp_path: Path) -> None:
    ctl = [sys.executable, "-m", "edgerund.ctl", "--socket", str(tmp_path / "none.sock")]
    r = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no daemon socket" in r.stderr and "Traceback" not in r.stderr
    with DaemonProcess(tmp_path) as d:
        d.wait_ready()
        ctl[4] = d.socket_path
        r = subprocess.run([*ctl, "call", "nope"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "unknown_command" in r.stderr
        with pytest.raises(CommandError):
            d.call("nope")
        # `tasks`: every task with the chain of awaits it is suspended in
        rows = d.call("tasks")
        waiting = [
            r for r in rows if r["awaits"] and r["awaits"][-1].startswith(("future", "task"))
        ]
        assert waiting and all(r["state"] == "pending" for r in waiting)
        assert any(any("/edgerund/" in hop for hop in r["awaits"]) for r in waiting)
        r = subprocess.run([*ctl, "tasks"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "[pending]" in r.stdout, r.stderr
        assert "    future (pending)" in r.stdout or "    task " in r.stdout
        assert d.stop() == 0


def test_heap_census_hook_only_with_test_hooks(tmp_path: Path) -> None:
    env = {"EDGERUND_TEST_HOOKS": "1", "PYTHONTRACEMALLOC": "1"}
    (tmp_path / "hooks").mkdir()
    (tmp_path / "plain").mkdir()
    with DaemonProcess(tmp_path / "hooks", env=env) as d:
        d.wait_ready()
        first = d.call("test-heap", {"top": 5})
        assert first["tracing"] is True and "grown_since_first" not in first
        # objects since gc.freeze() at start-up: the running daemon's coroutines, futures...
        assert len(first["by_type"]) == 5 and first["by_type"].get("coroutine", 0) > 0
        time.sleep(1.0)
        second = d.call("test-heap", {"top": 5})
        grown = second["grown_since_first"]
        assert len(grown) == 5 and all(":" in g["where"] for g in grown)
        assert d.stop() == 0
    with DaemonProcess(tmp_path / "plain") as d:
        d.wait_ready()
        with pytest.raises(CommandError) as err:
            d.call("test-heap")
        assert err.value.code == "unknown_command"
        assert d.stop() == 0
