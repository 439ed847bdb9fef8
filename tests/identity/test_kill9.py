"""Unclean ends: kill -9 of a key user never breaks the TPM identity.

The kill -9 + power-cut test through the real daemon is in test_daemon.py; here a small
key-using process (tests/identity/keyuser.py) is killed while the TPM stays up (the slots
it held are reclaimed at the next start), and a control shows the DA mechanism is live.

An unorderly TPM shutdown after a DA-protected object was used adds one to the TPM's
failedTries (TPM 2.0 Part 1, 19.8.6); swtpm's default is 3 tries, so three power cuts
would lock a gateway out of its keys if they were not noDA. The control test shows the
mechanism is live in this swtpm (a key WITHOUT noDA does increment the counter), so the
main test can fail.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgerund.backend.verify import verify_result
from edgerund.identity.tpm import TpmIdentity
from tests.fixtures.swtpm import SwtpmProcess
from tests.identity.conftest import tpm_config
from tests.identity.pins import pins
from tests.identity.test_tpm import esapi, lockout_counter, use_da_protected_key

pytestmark = pytest.mark.needs_swtpm
REPO = Path(__file__).resolve().parents[2]


def run_and_kill(tcti: str, state: Path, extra_s: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.identity.keyuser", tcti, str(state)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        for _ in range(20):  # log lines (e.g. tpm_flushed_stale_handles) may come first
            if line.strip() == "READY" or not line:
                break
            line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"key user did not start: {line!r} {err[-2000:]}")
        time.sleep(extra_s)  # die in the middle of using the keys
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


async def still_signs(swtpm: SwtpmProcess, state: Path) -> None:
    ident = TpmIdentity(tpm_config(swtpm.tcti), state)
    await ident.open()
    try:
        assert not ident.enrolled_now and ident.restored == []
        await ident.sign_digest(hashlib.sha256(b"after the kills").digest())
        r = await ident.attest(b"\x42" * 20)
        assert verify_result(r, nonce=b"\x42" * 20, **pins(r)).ok
        assert ident.status()["da_lockout_counter"] == 0
    finally:
        await ident.close()


async def test_kill9_five_times_tpm_alive_leaked_slots_recovered(
    swtpm: SwtpmProcess, tmp_path: Path
):
    state = tmp_path / "state"
    for i in range(5):
        run_and_kill(swtpm.tcti, state, 0.03 * i)
    await still_signs(swtpm, state)


def test_control_a_key_without_noda_does_count(swtpm: SwtpmProcess):
    with esapi(swtpm) as e:
        use_da_protected_key(e)
    swtpm.kill()
    swtpm.start()
    assert lockout_counter(swtpm) == 1
