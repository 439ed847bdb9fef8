"""The technician's toolkit against a real simulated daemon: top in a pseudo-terminal,
check (healthy, missing port, daemon down), support bundle contents, metrics format."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import tarfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pyte
import pytest
import yaml

from edgerund.toolkit.support_bundle import redact
from tests.helpers.daemon import DaemonProcess, simulated

CTL = [sys.executable, "-m", "edgerund.ctl"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = simulated(tmp_path_factory.mktemp("sim"))
    with d:
        d.wait_ready(60)
        time.sleep(3.0)  # let every sensor deliver a few samples
        yield d


def ctl(
    d: DaemonProcess, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "--socket", d.socket_path, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_metrics_parse_with_prometheus_parser(sim: DaemonProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    r = ctl(sim, "metrics")
    assert r.returncode == 0, r.stderr
    families = {f.name: f for f in text_string_to_metric_families(r.stdout)}
    assert "edgerund_up" in families
    assert "edgerund_sensor_read_errors" in families
    assert families["edgerund_sensor_read_errors"].type == "counter"
    sensors = {s.labels.get("sensor") for s in families["edgerund_sensor_read_errors"].samples}
    assert "motor_vib" in sensors
    assert any(f.type == "summary" for f in families.values())


def test_metrics_textfile_written(tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "edgerund.prom"
    with DaemonProcess(tmp_path, {"metrics": {"textfile": str(prom), "interval_s": 1}}) as d:
        d.wait_ready()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not prom.exists():
            time.sleep(0.1)
        assert prom.exists()
        assert "edgerund_up 1" in prom.read_text()
        assert not list(prom.parent.glob(".*tmp")), "no half-written files left behind"
        assert d.stop() == 0


def test_check_healthy_simulated_daemon(sim: DaemonProcess) -> None:
    r = ctl(sim, "--json", "check")
    results = {x["check"]: x for x in json.loads(r.stdout)}
    assert {
        "daemon",
        "config",
        "devices",
        "sensors",
        "loops",
        "models",
        "tpm",
        "clock",
        "disk",
        "broker",
        "backlog",
        "realtime",
    } <= results.keys()
    not_ok = {k: v for k, v in results.items() if v["result"] != "OK"}
    # This machine's kernel clock is not NTP-disciplined (a VM): the clock check says so
    # honestly. Every other check must be OK on a healthy simulated daemon.
    clock = not_ok.pop("clock", None)
    if clock is not None:
        assert clock["result"] == "WARN" and "synchronised" in clock["message"]
    assert not not_ok, not_ok
    assert r.returncode in (0, 1)


def test_check_missing_serial_port_fails_with_its_name(tmp_path: Path) -> None:
    cfg = tmp_path / "edgerund.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "gateway": {"id": "gw"},
                "paths": {"state_dir": str(tmp_path / "state")},
                "sensors": [{"id": "gps", "driver": "nmea", "port": "/dev/ttyNOPE7"}],
            }
        )
    )
    r = subprocess.run(
        [*CTL, "--socket", str(tmp_path / "none.sock"), "check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = {
        ln.split()[1]: ln for ln in r.stdout.splitlines() if ln[:4] in ("OK  ", "WARN", "FAIL")
    }
    assert lines["devices"].startswith("FAIL") and "/dev/ttyNOPE7" in lines["devices"]
    assert lines["daemon"].startswith("FAIL")
    assert lines["config"].startswith("OK")
    assert "Traceback" not in r.stderr


def test_check_daemon_down_does_what_it_can(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *CTL,
            "--socket",
            str(tmp_path / "none.sock"),
            "check",
            "-c",
            str(tmp_path / "missing.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "not reachable" in r.stdout and "no such file" in r.stdout
    assert "disk" in r.stdout and "clock" in r.stdout  # ran without the daemon
    assert "Traceback" not in r.stderr + r.stdout


def test_support_bundle_contents_and_no_key_material(sim: DaemonProcess, tmp_path: Path) -> None:
    out = tmp_path / "support.tar.gz"
    r = ctl(sim, "support-bundle", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        names = {Path(m.name).name: m for m in tf.getmembers()}
        for want in (
            "versions.json",
            "status.json",
            "log.json",
            "check.json",
            "config.redacted.yaml",
            "models.json",
            "telemetry.json",
            "metrics.prom",
        ):
            assert want in names, sorted(names)
        blob = b"".join(
            tf.extractfile(m).read()
            for m in tf.getmembers()  # type: ignore[union-attr]
            if m.isfile()
        )
    assert out.stat().st_mode & 0o077 == 0, "bundle readable only by its owner"
    # Key material on disk (the software identity key, any PEM under the state dir)
    # never ends up in the bundle.
    assert b"PRIVATE KEY" not in blob
    state = Path(sim.config["paths"]["state_dir"])
    key_files = [p for p in state.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert key_files, "the simulated daemon keeps a software key on disk"
    for p in key_files:
        body_line = p.read_bytes().split(b"\n")[1]  # first base64 line of the PEM body
        assert len(body_line) > 20 and body_line not in blob


def test_redaction() -> None:
    cfg = {
        "uplink": {"password": "hunter2", "ca_file": "/etc/ca.pem", "username": "gw"},
        "identity": {"owner_auth": "s3cret", "owner_auth_file": "/etc/edgerund/owner"},
        "token": "abc",
        "nested": [{"api_secret": "x"}],
    }
    red = redact(cfg)
    assert red["uplink"]["password"] == "<redacted>"
    assert red["uplink"]["ca_file"] == "/etc/ca.pem" and red["uplink"]["username"] == "gw"
    assert red["identity"]["owner_auth"] == "<redacted>"
    assert red["identity"]["owner_auth_file"] == "/etc/edgerund/owner"
    assert red["token"] == "<redacted>" and red["nested"][0]["api_secret"] == "<redacted>"


# ----------------------------------------------------------------------------- top


def _spawn_in_pty(
    args: list[str], cols: int, rows: int, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
        start_new_session=True,
    )
    os.close(slave)
    return proc, master


def _read_screen(master: int, seconds: float, cols: int, rows: int) -> pyte.Screen:
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            stream.feed(data)
    return screen


def _missed(d: DaemonProcess) -> tuple[int, int]:
    loops = d.call("status")["loops"]
    return sum(lp["missed"] for lp in loops), sum(lp["ticks"] for lp in loops)


def test_top_in_80x24_pty_shows_sensors_and_loops_without_disturbing_them(
    sim: DaemonProcess,
) -> None:
    loop_ids = [lp["id"] for lp in sim.call("status")["loops"]]
    assert loop_ids, "the simulated config runs control loops"
    # Baseline: the loops' misses over the same length of time without top.
    m0, t0 = _missed(sim)
    time.sleep(4.0)
    m1, t1 = _missed(sim)
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    proc, master = _spawn_in_pty(
        [*CTL, "--socket", sim.socket_path, "top", "--interval", "0.25"], 80, 24, env
    )
    try:
        screen = _read_screen(master, 4.0, 80, 24)
        m2, t2 = _missed(sim)
        text = "\n".join(screen.display)
        assert "motor_vib" in text and "cabinet" in text, text
        assert "sensor" in text and "loop" in text
        for lid in loop_ids:
            assert lid in text, text
        os.write(master, b"q")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)
    # top polls a few times a second; the loops must not miss more ticks while it runs
    # than they did in the same time without it (plus one tick of slack per second for
    # this shared machine's noise).
    baseline, during = m1 - m0, m2 - m1
    assert during <= baseline + 4, f"{during} misses with top vs {baseline} without"
    assert t2 - t1 > 0.8 * (t1 - t0), "the loops kept ticking while top ran"


def test_top_dumb_terminal_falls_back_to_plain_table(sim: DaemonProcess) -> None:
    env = {**os.environ, "TERM": "dumb"}
    r = ctl(sim, "top", "--iterations", "2", "--interval", "0.1", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("edgerund") >= 2 and "sensor motor_vib" in r.stdout
    assert "\x1b[" not in r.stdout, "no escape codes in a dumb terminal"


def test_top_too_small_terminal(sim: DaemonProcess) -> None:
    env = {**os.environ, "TERM": "xterm"}
    proc, master = _spawn_in_pty([*CTL, "--socket", sim.socket_path, "top"], 40, 10, env)
    try:
        screen = _read_screen(master, 3.0, 40, 10)
        assert proc.wait(10) == 2
        assert "needs at least" in "".join(screen.display)
    finally:
        os.close(master)


def test_top_daemon_down(tmp_path: Path) -> None:
    r = subprocess.run(
        [*CTL, "--socket", str(tmp_path / "none.sock"), "top", "--plain", "--iterations", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "no daemon socket" in r.stderr
    assert "Traceback" not in r.stderr
