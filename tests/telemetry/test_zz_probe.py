import asyncio, sys, threading, time, traceback
import pytest
from tests.telemetry.test_uplink import test_broker_outage_loses_nothing as inner

@pytest.mark.parametrize("rep", range(3))
async def test_probe(tmp_path, mosquitto, collector_factory, rep):
    last = [time.monotonic()]
    main = threading.get_ident()
    stop = False
    seen = []
    def watch():
        while not stop:
            time.sleep(0.01)
            lag = time.monotonic() - last[0]
            if lag > 0.05:
                f = sys._current_frames()[main]
                seen.append((round(lag,3), "".join(traceback.format_stack(f)[-8:])))
                time.sleep(0.05)
    th = threading.Thread(target=watch, daemon=True); th.start()
    async def tick():
        while True:
            last[0] = time.monotonic(); await asyncio.sleep(0.005)
    t = asyncio.create_task(tick())
    await inner(tmp_path / "x", mosquitto, collector_factory, None, False)
    stop = True; t.cancel()
    for lag, s in seen: print("=====STALL", lag, "\n", s)
