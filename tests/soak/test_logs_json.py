"""Found by the soak harness (every seed with a link cut): in JSON log mode paho/aiomqtt
wrote bare `ERROR mqtt: failed to receive on socket: ...` lines into the JSON stream. A
log shipper parsing JSON lines drops or chokes on them; now they are JSON too."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.daemon import REPO

SCRIPT = """
import logging
from edgerund import logs
logs.configure("info", "json")
logs.configure("info", "json")  # a reload configures again: still one handler
logging.getLogger("mqtt").error("failed to receive on socket: [Errno 104] reset")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("lib").exception("boom")
"""


def test_stdlib_library_logs_are_json_lines_in_json_mode() -> None:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    lines = [json.loads(line) for line in p.stderr.splitlines()]  # each line is JSON
    assert [(r["logger"], r["level"]) for r in lines] == [("mqtt", "error"), ("lib", "error")]
    assert "reset" in lines[0]["event"] and "ZeroDivisionError" in lines[1]["exception"]
