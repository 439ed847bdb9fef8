"""A real swtpm (TPM 2.0 simulator) on free loopback ports (the test fixtures wrap it).

Provisioning (`swtpm_setup`: EK key pairs, EK + platform certificates signed by a local CA,
sha256 PCR bank) takes about a second, so it runs ONCE per session into a template state
directory (`swtpm_template`). Each test gets a private copy of that state and its own
`swtpm socket` process (`swtpm` fixture): tests never see each other's keys, NV indices or
dictionary-attack counters.

swtpm_setup's certificate helper (swtpm_localca) keeps its CA in /var/lib/swtpm-localca by
default, which is not writable for a normal user and is shared by concurrent runs; we point
it at a private config and state directory so provisioning works offline and unprivileged.

The returned `SwtpmProcess` exposes `.tcti` (`swtpm:host=127.0.0.1,port=N`), `.port`,
`.stop()` (SIGTERM), `.start()` (restart on the same state: a power cycle; the TPM is
started with TPM2_Startup(CLEAR) by swtpm's `startup-clear` flag) and `.kill()` (SIGKILL, an
unclean power loss). Teardown stops it by PID. In CI a missing swtpm FAILS the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.peers.binaries import find_binary, free_port

SWTPM_HINT = "apt-get install swtpm swtpm-tools"


def swtpm_binaries() -> tuple[str, str]:
    """(swtpm, swtpm_setup), or MissingBinary."""
    return (find_binary("swtpm", SWTPM_HINT), find_binary("swtpm_setup", SWTPM_HINT))


def provision_state(state_dir: Path, work_dir: Path) -> None:
    """Manufacture a TPM 2.0 state in `state_dir` (EKs + certificates), fully offline."""
    swtpm, swtpm_setup = swtpm_binaries()
    localca = shutil.which("swtpm_localca") or "/usr/bin/swtpm_localca"
    ca_dir = work_dir / "localca"
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_conf = work_dir / "swtpm-localca.conf"
    ca_conf.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir}/signkey.pem\n"
        f"issuercert = {ca_dir}/issuercert.pem\n"
        f"certserial = {ca_dir}/certserial\n"
    )
    ca_opts = work_dir / "swtpm-localca.options"
    ca_opts.write_text(
        "--platform-manufacturer edgerund\n--platform-version 1.0\n--platform-model test\n"
    )
    setup_conf = work_dir / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {localca}\n"
        f"create_certs_tool_config = {ca_conf}\n"
        f"create_certs_tool_options = {ca_opts}\n"
        "active_pcr_banks = sha256\n"
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        swtpm_setup, "--tpm2", "--tpm-state", str(state_dir), "--tpm", f"{swtpm} socket",
        "--config", str(setup_conf), "--createek", "--decryption", "--create-ek-cert",
        "--create-platform-cert", "--lock-nvram", "--pcr-banks", "sha256", "--overwrite",
    ]  # fmt: skip
    env = dict(os.environ, XDG_CONFIG_HOME=str(work_dir))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"swtpm_setup failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )


def _two_free_ports() -> int:
    """A port P such that P and P+1 are free (swtpm's TCTI uses P+1 for the control channel)."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free loopback ports found")


class SwtpmProcess:
    """One swtpm server on loopback, restartable on the same state directory."""

    def __init__(self, binary: str, state_dir: Path, log_path: Path) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start (or restart after stop/kill) on the same state: a power-on + Startup(CLEAR)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("swtpm is already running")
        last_error = ""
        for _ in range(5):  # a free port can be taken between free_port() and bind
            if not self.port:
                self.port = _two_free_ports()
            with self.log_path.open("ab") as logf:
                self.proc = subprocess.Popen(
                    [
                        self.binary,
                        "socket",
                        "--tpm2",
                        "--tpmstate",
                        f"dir={self.state_dir}",
                        "--server",
                        f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                        "--ctrl",
                        f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                        "--flags",
                        "not-need-init,startup-clear",
                    ],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_listening(10.0):
                return
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self._terminate(signal.SIGKILL)
            self.port = 0  # take fresh ports on the next attempt
        raise RuntimeError(f"swtpm did not start listening:\n{last_error}")

    def _wait_listening(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.5):
                    pass
                # the control channel accepts once the server socket is bound as well
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: swtpm exits after finishing the current command (NV state is on disk)."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: an unclean power loss (no TPM2_Shutdown)."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()
