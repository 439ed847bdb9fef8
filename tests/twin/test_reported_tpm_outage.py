"""soak1-4 (CI, 2026-12-06), t=50 s: while swtpm was down (`tpm_restart`), the twin's
reported-state publisher let the identity's TpmError escape, so the supervisor logged
`task_failed_restarting` with a traceback every half second. A reported state the
gateway cannot sign must wait for the TPM (the previous retained document stays) and say
so once, without a traceback; it is published, signed, when the TPM answers again.
A real swtpm stopped and started, a real mosquitto, the daemon process."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.swtpm import SwtpmProcess
from tests.helpers.daemon import simulated
from tests.twin.test_remote import retained

pytestmark = pytest.mark.needs_swtpm


def _twin(d: Any) -> dict[str, Any]:
    return dict(d.call("status")["twin"])


def _until(pred: Any, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_reported_state_waits_for_the_tpm_without_a_traceback(
    tmp_path: Path, mosquitto: Any, swtpm: SwtpmProcess
) -> None:
    d = simulated(
        tmp_path,
        {
            "identity": {"kind": "tpm", "tcti": swtpm.tcti, "fallback": "none"},
            "uplink": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port},
            "twin": {"check_interval_s": 0.3, "heartbeat_s": 1.0},
        },
    )
    with d:
        d.wait_ready(60)
        topic = "twin/v1/sim/sim-gw/reported"
        assert "sig" in json.loads(await retained(mosquitto, topic))
        swtpm.kill()  # a hard TPM outage: the TCTI socket is gone
        try:
            await asyncio.to_thread(
                _until, lambda: _twin(d)["reported_sign_errors"] >= 2, 30, "sign errors"
            )
            published = _twin(d)["reported_published"]
            await asyncio.sleep(1.5)  # heartbeats come and go: nothing unsigned goes out
            assert _twin(d)["reported_published"] == published
        finally:
            swtpm.start()
        await asyncio.to_thread(
            _until, lambda: _twin(d)["reported_published"] > published, 60, "signed again"
        )
        doc = json.loads(await retained(mosquitto, topic))
        assert "sig" in doc and "key_id" in doc
    log = d.log_text
    assert log.count("twin_reported_sign_failed") == 1  # the state change, not every retry
    assert "twin_reported_sign_recovered" in log
    assert "Traceback" not in log
