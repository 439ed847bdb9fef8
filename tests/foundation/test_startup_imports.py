"""`edgerund run` does not load what only other commands, or other configs, need.

Start-up time and memory (README "Start-up", issue #18) depend on what the daemon imports:
these modules are imported lazily, where they are used (the twin's MQTT session and remote
support bundle, a TPM's EK certificate, the uplink, the console renderer on a terminal),
and the simulated daemon (no uplink, software identity, JSON logs to a file) must run
without ever loading them. Checked on the running daemon with Python's own import trace
(`PYTHONPROFILEIMPORTTIME`, the `-X importtime` of the environment), up to READY and a
second after it. The trace lists every import attempted, failed ones too.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml

from edgerund.config.loader import simulate_config_path
from tests.helpers.daemon import DaemonProcess

# module -> why `edgerund run --simulate` never needs it
LAZY = {
    # `rich` itself is in the trace as a failed attempt (cli._without_rich marks it absent
    # and structlog tries it); what rich loads when it really imports is not
    "rich.console": "structlog's console renderer on a TTY only (cli._without_rich)",
    "pygments": "rich's",
    "aiomqtt": "twin and uplink sessions, imported when an uplink is configured",
    "paho": "aiomqtt's",
    "urllib.request": "paho's",
    "http.client": "paho's",
    "email": "paho's and cryptography.x509's",
    "cryptography.x509": "a TPM's EK certificate, read on demand",
    "tarfile": "the remote support bundle, built on request",
    "importlib.metadata": "the support bundle's versions",
    "edgerund.toolkit.support_bundle": "the remote support bundle, built on request",
    "edgerund.toolkit.check": "edgerunctl's checks",
    "edgerund.ctl": "the technician client",
    "edgerund.publisher": "publisher tools (tests/test_architecture.py)",
    "edgerund.backend": "backend tools (tests/test_architecture.py)",
}


def _imported(log: str) -> set[str]:
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", log, re.M))


def _simulated_config(tmp_path: Path) -> dict[str, object]:
    cfg = yaml.safe_load(simulate_config_path().read_text())
    cfg["paths"] = {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")}
    cfg["diag"] = {"socket": str(tmp_path / "diag.sock"), "mode": 0o666}
    cfg["logging"] = {"format": "json", "level": "info"}
    return cfg


def test_simulated_run_does_not_import_the_lazy_modules(tmp_path: Path) -> None:
    d = DaemonProcess(
        tmp_path,
        simulate=True,
        config_text=yaml.safe_dump(_simulated_config(tmp_path)),
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    with d:
        d.wait_ready(60)
        time.sleep(1.0)  # whatever a first tick or first status would import, too
        assert d.stop() == 0, d.log_text[-3000:]
    imported = _imported(d.log_text)
    # the trace is there: the daemon's own and the model's modules are in it
    assert {"edgerund.daemon", "onnxruntime", "drivers.emulated.mpu6050"} <= imported
    loaded = sorted(
        f"{m} ({why})"
        for prefix, why in LAZY.items()
        for m in imported
        if m == prefix or m.startswith(prefix + ".")
    )
    assert loaded == []
