"""Run the telemetry component in its own process (for kill -9 tests).

usage: python -m tests.telemetry.component_proc CONFIG.json
Emits `env.temp` at 20 Hz through a hub stand-in until SIGTERM (clean exit) or SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import msgspec

from edgerund.config.schema import Config
from edgerund.context import Context, Supervisor
from edgerund.telemetry.component import TelemetryComponent
from tests.telemetry.conftest import HubStandIn


async def main(cfg_path: str) -> None:
    cfg = msgspec.convert(json.loads(Path(cfg_path).read_text()), Config)
    ctx = Context(config=cfg, config_path=Path(cfg_path), supervisor=Supervisor(lambda e: None))
    hub = HubStandIn([("env", "temp", "degC")])
    ctx.components["hub"] = hub
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with TelemetryComponent(ctx):
        print("ready", flush=True)
        n = 0
        while not stop.is_set():
            hub.emit("env", "temp", round(20 + 0.01 * (n % 50), 2), time.time())
            n += 1
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
