"""Pieces shared by the serial drivers: the common config keys, a delimiter framer and
the stream-reading loop.

`DelimitedFramer` is pure: bytes in, complete frames out. A frame longer than its limit is
garbage (a missing delimiter, line noise at the wrong baud rate): the framer drops what it
holds and everything up to the next delimiter, counts one resync, and carries on, so one
bad stretch never costs more than the frame it hit. Work is linear in the input.

`StreamPump` is the thin I/O part used by stream sensors: read what the port has, feed the
framer, record each raw frame in the port's sniff ring, and raise `DeviceError` when no
frame arrived for the stall timeout (a silent instrument is a fault the hub must see).

`FramedStreamSensor` is what the delimited stream sensors (line, NMEA, COBS) share: the
port, framer and pump built from the config, and a pump reset on every (re)open.
`stream_frames` is their frames() loop: each raw frame goes to the driver's pure decode
step, which counts what it rejects and returns None (or nothing) for a frame that gives
no readings; only frames with readings are yielded.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from drivers.base import Reading, Resources, SensorConfig
from drivers.errors import DeviceError

__all__ = [
    "DelimitedFramer",
    "FramedStreamSensor",
    "PortUser",
    "SerialSensorConfig",
    "StreamPump",
    "check_serial_keys",
    "open_port",
    "port_problem",
    "stall_timeout_s",
    "stream_frames",
]


class SerialSensorConfig(SensorConfig, kw_only=True):
    """Keys common to every serial sensor (not a driver itself: no tag of its own)."""

    port: str  # device path (/dev/ttyUSB0, /dev/serial/by-id/...) or socket://host:port
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # N E O M S
    stopbits: float = 1

    def __post_init__(self) -> None:
        check_serial_keys(self)


def check_serial_keys(cfg: Any) -> None:
    """Config-time checks of the line settings (msgspec turns ValueError into an error)."""
    port = cfg.port
    if not isinstance(port, str) or not port:
        raise ValueError("port: expected a device path or socket://host:port, got an empty string")
    if port.startswith("socket://"):
        hostport = port[len("socket://") :]
        host, sep, p = hostport.rpartition(":")
        if not sep or not host or not p.isdigit() or not 0 < int(p) < 65536:
            raise ValueError(f"port: expected socket://HOST:PORT, got {port!r}")
    elif "://" in port:
        scheme = port.split("://", 1)[0]
        # sim://NAME: simulated mode. rfc2217:// and loop:// are not offered: pyserial
        # runs them on threads without a file descriptor the event loop could watch.
        if scheme != "sim":
            raise ValueError(
                f"port: unsupported URL scheme {scheme!r} in {port!r} "
                "(expected a device path or socket://host:port)"
            )
    elif not port.startswith("/"):
        raise ValueError(
            f"port: expected an absolute device path such as /dev/ttyUSB0, got {port!r}"
        )
    if cfg.baudrate not in _BAUDS:
        raise ValueError(f"baudrate: expected one of {sorted(_BAUDS)}, got {cfg.baudrate}")
    if cfg.bytesize not in (5, 6, 7, 8):
        raise ValueError(f"bytesize: expected 5, 6, 7 or 8, got {cfg.bytesize}")
    if cfg.parity not in ("N", "E", "O", "M", "S"):
        raise ValueError(f"parity: expected one of N E O M S, got {cfg.parity!r}")
    if cfg.stopbits not in (1, 1.5, 2):
        raise ValueError(f"stopbits: expected 1, 1.5 or 2, got {cfg.stopbits}")


_BAUDS = {
    300,
    600,
    1200,
    2400,
    4800,
    9600,
    14400,
    19200,
    28800,
    38400,
    57600,
    76800,
    115200,
    230400,
    250000,
    460800,
    500000,
    921600,
    1000000,
    1500000,
    2000000,
}


def open_port(cfg: Any, resources: Resources) -> Any:
    """The shared port for a serial config (same URL -> same object)."""
    return resources.serial_port(
        cfg.port,
        baudrate=cfg.baudrate,
        bytesize=cfg.bytesize,
        parity=cfg.parity,
        stopbits=cfg.stopbits,
    )


def stall_timeout_s(cfg: SensorConfig) -> float:
    """A stream sensor is stalled when no valid frame came for this long:
    read_timeout_ms, but never less than two periods at the configured rate."""
    period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else math.inf
    return max(cfg.read_timeout_ms / 1000.0, 2.0 * period)


class DelimitedFramer:
    """Split a byte stream at a delimiter; bounded memory; resync after garbage."""

    def __init__(self, delimiter: bytes = b"\n", max_frame_bytes: int = 256) -> None:
        if len(delimiter) != 1:
            raise ValueError("delimiter must be one byte")
        self._delim = delimiter
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._skipping = False  # discarding an overlong frame up to the next delimiter
        self.resyncs = 0
        self.dropped_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        start = 0
        n = len(data)
        while start < n:
            i = data.find(self._delim, start)
            end = n if i < 0 else i
            chunk = data[start:end]
            if self._skipping:
                self.dropped_bytes += len(chunk)
            else:
                self._buf += chunk
                if len(self._buf) > self._max:
                    self.dropped_bytes += len(self._buf)
                    self._buf.clear()
                    self._skipping = True
                    self.resyncs += 1
            if i < 0:
                break
            # delimiter reached: emit (unless we were skipping garbage)
            if not self._skipping:
                out.append(bytes(self._buf))
            self._buf.clear()
            self._skipping = False
            start = i + 1
        return out

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False


class StreamPump:
    """Read from a port into a framer; yields raw frames; DeviceError on stall or loss."""

    def __init__(self, port: Any, framer: DelimitedFramer, stall_s: float) -> None:
        self.port = port
        self.framer = framer
        self.stall_s = stall_s
        self._pending: deque[bytes] = deque()

    async def next_frame(self, timeout_s: float | None = None) -> bytes:
        limit = self.stall_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not self._pending:
            left = deadline - loop.time()
            if left <= 0:
                raise DeviceError(
                    f"serial port {self.port.url}: no complete frame for "
                    f"{limit * 1000:.0f} ms (stalled)"
                )
            try:
                async with asyncio.timeout(left):
                    data = await self.port.read_some()
            except TimeoutError:
                continue
            for frame in self.framer.feed(data):
                self._pending.append(frame)
        frame = self._pending.popleft()
        self.port.record_frame(frame)
        return frame

    def reset(self) -> None:
        self._pending.clear()
        self.framer.reset()


class PortUser:
    """open()/close() of a driver on a shared port, safe to repeat.

    The hub may call open() again on a sensor it marked failed without closing it first;
    the port reference is taken once per driver, and a lost port is reopened by
    `AsyncSerialPort.open()`.
    """

    port: Any
    _opened: bool = False

    async def open(self) -> None:
        if self._opened:
            self._opened = False
            await self.port.close()
        await self.port.open()
        self._opened = True
        self.on_open()

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.port.close()

    def on_open(self) -> None:
        """Reset framing state after (re)opening."""


class FramedStreamSensor(PortUser):
    """Base of the stream sensors that read delimited frames from a shared port."""

    mode: Literal["stream"] = "stream"

    def __init__(
        self, cfg: SensorConfig, resources: Resources, delimiter: bytes, max_frame_bytes: int
    ) -> None:
        self.port: Any = open_port(cfg, resources)
        self.framer = DelimitedFramer(delimiter, max_frame_bytes)
        self.pump = StreamPump(self.port, self.framer, stall_timeout_s(cfg))

    def on_open(self) -> None:
        self.pump.reset()


async def stream_frames(
    pump: StreamPump, decode: Callable[[bytes], Sequence[Reading] | None]
) -> AsyncIterator[Sequence[Reading]]:
    """Frames from the pump through `decode`, forever; the readings of every good frame.

    A stall or a lost port raises `DeviceError` out of the pump (the hub's to handle);
    a frame `decode` rejects (None or no readings) is skipped: it has counted it.
    """
    while True:
        readings = decode(await pump.next_frame())
        if readings:
            yield readings


def port_problem(port: str) -> str | None:
    """For a config cross-check: why a device-path port cannot be used right now, or None.

    URLs (socket://, sim://) are not checked. A missing node is reported with a hint; the
    caller decides whether that is fatal (an adapter may be unplugged at boot and is
    reopened when it returns, so a daemon may prefer a warning for /dev/serial/by-id/).
    """
    import os

    if "://" in port:
        return None
    if not os.path.exists(port):
        parent = os.path.dirname(port) or "/"
        where = "" if os.path.isdir(parent) else f" (and {parent} does not exist either)"
        return (
            f"serial port {port} does not exist{where}; expected an existing device "
            "such as /dev/ttyUSB0 or /dev/serial/by-id/..., or socket://host:port"
        )
    if not os.access(port, os.R_OK | os.W_OK):
        return f"serial port {port} exists but is not readable and writable by this user"
    return None
