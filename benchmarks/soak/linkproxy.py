"""A TCP proxy between the gateway and mosquitto whose link the soak scheduler controls.

Modes (`set_mode`), applied to existing and new connections:
- `pass`: bytes flow both ways at once.
- `cut`: every connection is reset and new ones are refused (the broker looks down).
- `stall`: connections stay open and accepted, but bytes are HELD in both directions (not
  refused, not dropped): what a dead cellular bearer or a black-holing NAT does. When the
  mode goes back to `pass` (or `throttle`) the held bytes flow on, in order.
- `throttle`: bytes flow at `rate_bps` bytes per second each way (a cellular uplink).

It runs its own asyncio loop in a thread, so the (synchronous) harness can flip modes at
any time; `set_mode` is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

Mode = Literal["pass", "cut", "stall", "throttle"]


class LinkProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.rate_bps = 2000
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flow: asyncio.Event | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        self._flow = asyncio.Event()
        self._flow.set()
        self._server = await asyncio.start_server(self._conn, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_mode(self, mode: Mode, rate_bps: int | None = None) -> None:
        def apply() -> None:
            assert self._flow is not None
            self.mode = mode
            if rate_bps is not None:
                self.rate_bps = rate_bps
            if mode == "stall":
                self._flow.clear()
            else:
                self._flow.set()
            if mode == "cut":
                self._reset_all()

        self._loop.call_soon_threadsafe(apply)

    def _reset_all(self) -> None:
        for cw, bw in list(self._conns):
            for w in (cw, bw):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._conns.clear()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            cw.transport.abort()
            return
        try:
            br, bw = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            cw.transport.abort()
            return
        self.connections += 1
        pair = (cw, bw)
        self._conns.add(pair)
        up = asyncio.create_task(self._pump(cr, bw))
        down = asyncio.create_task(self._pump(br, cw))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        self._conns.discard(pair)
        for w in pair:
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert self._flow is not None
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                chunk = await r.read(4096 if self.mode != "throttle" else 512)
                if not chunk:
                    return
                await self._flow.wait()  # stall: hold what was read, in order
                if self.mode == "throttle":
                    await asyncio.sleep(len(chunk) / max(1, self.rate_bps))
                    await self._flow.wait()
                w.write(chunk)
                await w.drain()
