"""The unit file passes `systemd-analyze verify` and keeps its hardening promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.fixtures.binaries import require_binary

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edgerund.service"


def _unit_lines() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    edgerund = shutil.which("edgerund") or str(Path(sys.executable).parent / "edgerund")
    text = UNIT.read_text().replace("/usr/bin/edgerund", edgerund)
    unit = tmp_path / "edgerund.service"
    unit.write_text(text)
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 0 and not problems, "\n".join(problems)


def test_unit_contract() -> None:
    u = _unit_lines()
    assert u["Type"] == ["notify"]
    assert u["Restart"] == ["on-failure"]
    assert u["RestartPreventExitStatus"] == ["2"], "a bad config must not restart-loop"
    assert u["WatchdogSec"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert u[key] == ["yes"], key
    assert u["ProtectSystem"] == ["strict"]
    assert u["DevicePolicy"] == ["closed"]
    assert u["CapabilityBoundingSet"] == [""]
    assert "@system-service" in u["SystemCallFilter"]
    assert u["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    allowed = " ".join(u["DeviceAllow"])
    for dev in ("char-ttyUSB", "char-i2c", "char-tpmrm", "char-gpiochip"):
        assert dev in allowed
    for key in ("RuntimeDirectory", "StateDirectory"):
        assert u[key] == ["edgerund"]
