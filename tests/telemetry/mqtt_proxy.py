"""A loopback TCP proxy between the gateway and mosquitto that reads the MQTT framing in
both directions: it records every QoS 1 PUBLISH (time, topic, size, packet id) from the
client and every PUBACK from the broker, and can delay the broker->client direction to
make a slow link. `max_outstanding` is the largest number of PUBLISHes seen without their
PUBACK: the in-flight count as the network sees it, independent of the client's code."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class Publish:
    t: float
    topic: str
    size: int
    pid: int | None


@dataclass
class MqttProxy:
    upstream_port: int
    delay_s: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    publishes: list[Publish] = field(default_factory=list)
    outstanding: set[int] = field(default_factory=set)
    max_outstanding: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._conn, self.host, port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        self._server = None

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            cw.close()
            return
        up = asyncio.create_task(self._pump(cr, bw, True))
        down = asyncio.create_task(self._pump(br, cw, False))
        self._tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        for w in (cw, bw):
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, from_client: bool
    ) -> None:
        buf = b""
        while True:
            chunk = await r.read(65536)
            if not chunk:
                return
            buf += chunk
            while True:
                pkt = _split(buf)
                if pkt is None:
                    break
                head, body, n = pkt
                buf = buf[n:]
                self._observe(head, body, from_client, n)
            if not from_client and self.delay_s:
                await asyncio.sleep(self.delay_s)
            w.write(chunk)
            await w.drain()

    def _observe(self, head: int, body: bytes, from_client: bool, size: int) -> None:
        kind = head >> 4
        if from_client and kind == 3:
            qos = (head >> 1) & 3
            tlen = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + tlen].decode(errors="replace")
            pid = int.from_bytes(body[2 + tlen : 4 + tlen], "big") if qos else None
            self.publishes.append(Publish(time.monotonic(), topic, size, pid))
            if pid is not None:
                self.outstanding.add(pid)
                self.max_outstanding = max(self.max_outstanding, len(self.outstanding))
        elif not from_client and kind == 4:
            self.outstanding.discard(int.from_bytes(body[:2], "big"))


def _split(buf: bytes) -> tuple[int, bytes, int] | None:
    if len(buf) < 2:
        return None
    mult, length, i = 1, 0, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
    if len(buf) < i + length:
        return None
    return buf[0], buf[i : i + length], i + length
