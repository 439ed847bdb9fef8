"""The identity through the real daemon process: socket commands, kill -9, refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgerund.backend.verify import verify_result
from edgerund.identity.binding import binding_value
from tests.fixtures.swtpm import SwtpmProcess
from tests.helpers.daemon import DaemonProcess
from tests.identity.pins import pins
from tests.identity.test_tpm import lockout_counter

pytestmark = pytest.mark.needs_swtpm


def tpm_daemon(tmp_path: Path, swtpm: SwtpmProcess) -> DaemonProcess:
    return DaemonProcess(tmp_path, {"identity": {"kind": "tpm", "tcti": swtpm.tcti}})


def attest_ok(d: DaemonProcess) -> dict[str, object]:
    nonce = os.urandom(32)
    result = d.call("attest", {"nonce": nonce.hex()})
    v = verify_result(result, nonce=nonce, **pins(result))
    assert v.ok, v
    return dict(result)


def test_daemon_status_identity_and_attest(tmp_path: Path, swtpm: SwtpmProcess):
    import hashlib

    with tpm_daemon(tmp_path, swtpm) as d:
        d.wait_ready()
        st = d.call("status")["identity"]
        assert st["kind"] == "tpm" and st["insecure"] is False
        assert st["ek_certificate_found"] is True and len(st["key_id"]) == 64
        assert d.call("identity")["ak_name"] == st["ak_name"]
        r = attest_ok(d)
        # the config file the daemon runs is measured into PCR 23
        cfg = hashlib.sha256(d.config_path.read_bytes()).digest()
        assert r["pcrs"]["sha256:23"] == binding_value(cfg, []).hex()  # type: ignore[index]
        assert d.call("status")["identity"]["last_quote_time"] is not None


def test_kill9_daemon_five_times_with_power_cuts(tmp_path: Path, swtpm: SwtpmProcess):
    d = tpm_daemon(tmp_path, swtpm)
    ak_names = set()
    for _ in range(5):
        d.start()
        try:
            d.wait_ready()
            attest_ok(d)  # uses the AK and the telemetry key (certify)
            ak_names.add(d.call("status")["identity"]["ak_name"])
        finally:
            d.kill()  # SIGKILL: no TPM2_Shutdown
            d.stop()
        swtpm.kill()  # ... and the power cut took the TPM too
        swtpm.start()
        assert lockout_counter(swtpm) == 0
    with d:
        d.wait_ready()
        attest_ok(d)  # the TPM still signs with the same identity
        ak_names.add(d.call("status")["identity"]["ak_name"])
    assert len(ak_names) == 1


def test_fallback_none_refuses_to_start(tmp_path: Path):
    d = DaemonProcess(tmp_path, {"identity": {"kind": "tpm", "tcti": "device:/nonexistent/tpmrm0"}})
    with d:
        rc = d.wait(30)
    assert rc == 2
    log = d.log_text
    assert "/nonexistent/tpmrm0" in log and "tss" in log and "fallback" in log


def test_edgerunctl_attest_then_edgerund_attest_verify(tmp_path: Path, swtpm: SwtpmProcess):
    import subprocess
    import sys

    nonce = os.urandom(16).hex()
    with tpm_daemon(tmp_path, swtpm) as d:
        d.wait_ready()
        out = subprocess.run(
            [sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path, "--json",
             "attest", "--nonce", nonce],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "edgerund.ctl", "--socket", d.socket_path, "--json",
             "attest", "--nonce", "nothex"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 1 and "hex" in (bad.stdout + bad.stderr)
    result_file = tmp_path / "quote.json"
    result_file.write_text(out.stdout)
    ak_file = tmp_path / "ak.pem"  # the test made this AK: it pins it (enrol: test_enroll.py)
    ak_file.write_text(json.loads(out.stdout)["ak_pem"])
    nv_name = json.loads(out.stdout)["nv_binding"]["name"]  # pinned likewise

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgerund.cli", "attest", "verify",
             "--result", str(result_file), "--nonce", nonce, "--ak-pem", str(ak_file),
             "--nv-name", nv_name, *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    ok = verify("--expect-config", str(d.config_path))  # the daemon runs no model
    assert ok.returncode == 0 and ok.stdout.startswith("VALID"), ok.stdout + ok.stderr
    other = tmp_path / "other.yaml"
    other.write_text(d.config_path.read_text() + "# changed\n")
    bad = verify("--expect-config", str(other))
    assert bad.returncode == 1 and "binding_mismatch" in bad.stdout
    usage = verify("--expect-model", str(tmp_path / "missing.json"), "--expect-config",
                   str(d.config_path))  # fmt: skip
    assert usage.returncode == 2


def test_running_daemon_binding_survives_pcr_reset_and_follows_sighup(
    tmp_path: Path, swtpm: SwtpmProcess
):
    """#12.7 against the running daemon: another process resets PCR 23; SIGHUP re-binds."""
    import hashlib
    import signal
    import subprocess
    import time

    from edgerund.backend.binding_verify import verify_nv_binding
    from tests.fixtures.binaries import require_binary

    def tool(name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        exe = require_binary(name, "apt-get install tpm2-tools")
        return subprocess.run([exe, "-T", swtpm.tcti, *args], capture_output=True, timeout=30)

    def bound_config(d: DaemonProcess) -> bytes:
        nonce = os.urandom(32)
        r = d.call("attest", {"nonce": nonce.hex()})
        v = verify_nv_binding(r, nonce=nonce, ak_pem=r["ak_pem"],
                              pinned_name=bytes.fromhex(r["nv_binding"]["name"]))  # fmt: skip
        return v.config_sha256

    with tpm_daemon(tmp_path, swtpm) as d:
        d.wait_ready()
        cfg1 = hashlib.sha256(d.config_path.read_bytes()).digest()
        assert bound_config(d) == cfg1
        assert tool("tpm2_pcrreset", "23").returncode == 0  # another local process
        assert tool("tpm2_nvincrement", "0x01500100").returncode != 0  # counter: daemon only
        assert bound_config(d) == cfg1
        d.write_config(dict(d.config, logging={"format": "json", "level": "debug"}))
        cfg2 = hashlib.sha256(d.config_path.read_bytes()).digest()
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while bound_config(d) != cfg2:
            assert time.monotonic() < deadline, "SIGHUP did not re-bind the config"
            time.sleep(1.0)  # within the attest rate limit (1/s, burst 5)


def test_running_daemon_rate_limits_attest_and_keeps_signing(tmp_path: Path, swtpm: SwtpmProcess):
    """#12.5 against the running daemon: an attest flood from one uid is refused at once."""
    from edgerund.errors import CommandError

    d = DaemonProcess(
        tmp_path,
        {"identity": {"kind": "tpm", "tcti": swtpm.tcti, "attest_rate_per_s": 0.2,
                      "attest_burst": 3}},
    )  # fmt: skip
    with d:
        d.wait_ready()
        codes = []
        for i in range(8):
            try:
                d.call("attest", {"nonce": f"{i:02x}" * 16})
                codes.append("ok")
            except CommandError as exc:
                codes.append(exc.code)
        assert codes[:3] == ["ok"] * 3 and set(codes[3:]) == {"rate_limited"}
        st = d.call("status")["identity"]
        assert st["tpm_state"] == "ok" and st["tpm_timeouts"] == 0
