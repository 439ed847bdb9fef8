"""An asynchronous serial port driven by the event loop (no thread per port).

Theory of operation
-------------------
pyserial opens the port (`serial_for_url`, so `/dev/ttyUSB0`, a pty path and
`socket://host:port` for ser2net or a test peer all work) with `timeout=0`. pyserial's own
read/write calls are never used on the loop: the port's file descriptor is registered
with `loop.add_reader`, and the reader callback drains the OS buffer with one `os.read`
(device) or `socket.recv` (socket URL) into an in-memory receive buffer. Coroutines
waiting in `read_some()` are woken from that callback. Writes go straight to the fd; only
when the OS buffer is full does `write()` park on `loop.add_writer` until the fd drains.
Opening (termios set-up, TCP connect with pyserial's blocking connect) runs once per
(re)open in a worker thread; steady-state I/O never leaves the loop.

Loss detection: a USB-serial adapter that is pulled makes its fd readable with EIO/ENXIO
(or EOF), a pty whose master closed reads EIO, a TCP peer that closed reads EOF. The
reader callback records the fault, unregisters the fd and wakes every waiter, which then
raises `DeviceError`. `open()` on a lost port reopens it (the hub calls it when it
re-probes), so a returning adapter is picked up; a missing device node gives a
`DeviceError` naming the path.

Sharing: one `AsyncSerialPort` per URL is shared by every sensor and actuator on it
(`SerialPorts` hands them out). `open()`/`close()` are reference-counted. Masters (Modbus)
take `transaction()`, an exclusive lock, around each request/response so several slave
units can share one RS-485 line without interleaving.

Sample time: a write is a request to the device, so it notes the read's acquisition
time (drivers/base.py `note_acquired`), as the I2C bus does at a transaction's start; a
frame the instrument sends unasked is stamped on arrival by the hub.

Sniffing: drivers call `record_frame()` with each complete raw frame they framed (a
line, a sentence, a Modbus ADU, a COBS packet); the last `sniff_frames` frames are kept in
a bounded ring with their wall-clock time for the `serial-sniff` technician command.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import termios
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

import serial

from drivers.base import note_acquired
from drivers.errors import DeviceError, EdgerundError

__all__ = ["AsyncSerialPort", "SerialPorts", "char_time_s", "frames_to_rows"]

Parity = Literal["N", "E", "O", "M", "S"]

# errnos that mean "the device went away" rather than "try again".
_LOSS_ERRNOS = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.ECONNRESET, errno.EPIPE}
_RETRY_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR}


def char_time_s(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Time one character takes on the wire: start bit + data + parity + stop bits."""
    bits = 1 + bytesize + (0 if parity == "N" else 1) + stopbits
    return bits / float(baudrate)


def frames_to_rows(frames: list[tuple[float, bytes]]) -> list[dict[str, Any]]:
    """Render sniffed frames for `serial-sniff`: time, length, hex and printable text."""
    rows: list[dict[str, Any]] = []
    for t_wall, data in frames:
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in data)
        rows.append(
            {"t_wall": round(t_wall, 3), "len": len(data), "hex": data.hex(" "), "text": text}
        )
    return rows


class _NoNode(EdgerundError):
    pass


class _Refused(EdgerundError):
    """The device refused the line settings (termios.error from tcsetattr)."""


_DEFAULTS: dict[str, Any] = {"baudrate": 9600, "bytesize": 8, "parity": "N", "stopbits": 1}


def _describe(name: str, value: Any) -> str:
    return f"{name} {value!r}" if isinstance(value, str) else f"{name} {value:g}"


def _close_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        # off the loop: pyserial's socket close() sleeps
        asyncio.get_running_loop().run_in_executor(None, fut.result().close)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncSerialPort:
    """One serial port (device path or `socket://` URL), event-loop driven.

    Implements `drivers.base.AsyncSerialPortLike`.
    """

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: Parity = "N",
        stopbits: float = 1,
        rx_buffer_bytes: int = 65536,
        sniff_frames: int = 64,
    ) -> None:
        if bytesize not in (5, 6, 7, 8):
            raise ValueError(f"bytesize: expected 5..8, got {bytesize}")
        if stopbits not in (1, 1.5, 2):
            raise ValueError(f"stopbits: expected 1, 1.5 or 2, got {stopbits}")
        if parity not in ("N", "E", "O", "M", "S"):
            raise ValueError(f"parity: expected one of N E O M S, got {parity!r}")
        if baudrate <= 0:
            raise ValueError(f"baudrate: expected > 0, got {baudrate}")
        self.url = url
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity: Parity = parity
        self.stopbits = stopbits
        self._ser: Any = None
        self._fd = -1
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rx = bytearray()
        self._rx_max = rx_buffer_bytes
        # every coroutine parked in read_some() (normally one; a stream sensor and an
        # actuator awaiting a reply may share a port) and the one parked in write()
        self._rx_waiters: set[asyncio.Future[None]] = set()
        self._tx_waiter: asyncio.Future[None] | None = None
        self._write_lock = asyncio.Lock()  # frames from two writers never interleave
        self._error: DeviceError | None = None
        self._users = 0
        self._open_lock = asyncio.Lock()
        self._txn_lock = asyncio.Lock()
        self._frames: deque[tuple[float, bytes]] = deque(maxlen=max(1, sniff_frames))
        self.last_rx_mono = 0.0  # loop.time() of the last received byte
        self.last_tx_mono = 0.0  # loop.time() when the last write completed
        self.counters: dict[str, int] = {
            "bytes_rx": 0,
            "bytes_tx": 0,
            "errors": 0,  # OS-level faults (loss, failed open, write error)
            "overruns": 0,  # bytes dropped because nobody read the receive buffer
            "opens": 0,
            "losses": 0,
        }

    # -- properties --------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._ser is not None and self._error is None

    @property
    def lost(self) -> bool:
        return self._error is not None

    @property
    def char_time_s(self) -> float:
        return char_time_s(self.baudrate, self.bytesize, self.parity, self.stopbits)

    def settings(self) -> dict[str, Any]:
        return {
            "baudrate": self.baudrate,
            "bytesize": self.bytesize,
            "parity": self.parity,
            "stopbits": self.stopbits,
        }

    # -- open / close ------------------------------------------------------------------
    async def open(self) -> None:
        """Open (reference-counted). On a port that was lost, reopen it."""
        async with self._open_lock:
            self._users += 1
            if self._ser is not None and self._error is None:
                return
            try:
                await self._reopen_locked()
            except BaseException:
                self._users -= 1
                raise

    async def reopen(self) -> None:
        """Close and open again regardless of the reference count (adapter returned)."""
        async with self._open_lock:
            await self._reopen_locked()

    async def close(self) -> None:
        """Drop one reference; the last one closes the fd."""
        async with self._open_lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._teardown()
                self._error = None

    async def _reopen_locked(self) -> None:
        self._teardown()
        self._error = None
        self._rx.clear()
        self._loop = asyncio.get_running_loop()
        is_socket = self.url.startswith("socket://")
        fut = self._loop.run_in_executor(None, self._open_blocking, is_socket)
        try:
            ser = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # cancelled while the worker opens: close what it opens, do not leak the fd
            fut.add_done_callback(_close_result)
            raise
        except _NoNode:
            self.counters["errors"] += 1
            raise DeviceError(
                f"serial port {self.url}: device node does not exist "
                "(adapter unplugged or wrong path)"
            ) from None
        except _Refused as exc:
            self.counters["errors"] += 1
            raise DeviceError(f"serial port {self.url}: {exc}") from None
        except (serial.SerialException, OSError, ValueError) as exc:
            self.counters["errors"] += 1
            raise DeviceError(f"serial port {self.url}: cannot open: {exc}") from exc
        self._ser = ser
        if is_socket:
            self._sock = ser._socket
            self._fd = ser.fileno()
        else:
            self._sock = None
            self._fd = ser.fd
        self.counters["opens"] += 1
        self._loop.add_reader(self._fd, self._on_readable)

    def _open_blocking(self, is_socket: bool) -> Any:
        if not is_socket and "://" not in self.url and not os.path.exists(self.url):
            raise _NoNode
        kwargs: dict[str, Any] = {
            "baudrate": self.baudrate,
            "bytesize": self.bytesize,
            "parity": self.parity,
            "stopbits": self.stopbits,
            "timeout": 0,
            "write_timeout": 0,
            "do_not_open": True,
        }
        ser = serial.serial_for_url(self.url, **kwargs)
        if not is_socket and hasattr(ser, "exclusive"):
            # flock: a second process opening the same adapter would steal bytes.
            ser.exclusive = True
        try:
            ser.open()
        except termios.error as exc:
            # tcsetattr refused (a parity or stop bits a USB adapter cannot do, a baud
            # rate it cannot reach). pyserial lets termios.error through unwrapped; it is
            # the device saying no, not a bug, so say which setting it refused.
            raise _Refused(self._refusal(kwargs, exc)) from None
        return ser

    def _refusal(self, kwargs: dict[str, Any], exc: termios.error) -> str:
        """Which of the configured settings the device refuses: try each alone."""
        code = exc.args[0] if exc.args else "?"
        text = exc.args[1] if len(exc.args) > 1 else str(exc)
        culprits: list[str] = []
        for name, default in _DEFAULTS.items():
            if kwargs[name] == default:
                continue
            probe = serial.serial_for_url(self.url, **{**kwargs, **_DEFAULTS, name: kwargs[name]})
            try:
                probe.open()
            except termios.error:
                culprits.append(_describe(name, kwargs[name]))
            except (serial.SerialException, OSError, ValueError):
                pass
            else:
                probe.close()
        line = f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits:g}"
        what = (
            f"refuses {' and '.join(culprits)}" if culprits else f"refuses the combination {line}"
        )
        return (
            f"the device {what} (settings {line}; tcsetattr: [errno {code}] {text}); "
            "the adapter or its kernel driver cannot do this: change the setting or the adapter"
        )

    def _teardown(self) -> None:
        ser, self._ser = self._ser, None
        if self._loop is not None and self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._fd = -1
        sock, self._sock = self._sock, None
        if sock is not None and ser is not None:
            # pyserial's socket close() sleeps 0.3 s ("give the server some time"), which
            # would block the loop: close the socket ourselves and mark the port closed.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            ser._socket = None
            ser.is_open = False
        elif ser is not None:
            with contextlib.suppress(Exception):
                ser.close()
        self._wake_all()

    # -- loss ----------------------------------------------------------------------------
    def _fail(self, why: str) -> None:
        if self._error is None:
            self._error = DeviceError(f"serial port {self.url}: {why}")
            self.counters["errors"] += 1
            self.counters["losses"] += 1
        if self._loop is not None and self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._wake_all()

    def _wake_all(self) -> None:
        for fut in (*self._rx_waiters, self._tx_waiter):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._ser is None:
            raise DeviceError(f"serial port {self.url}: not open")

    # -- receive -----------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            if self._sock is not None:
                data = self._sock.recv(65536)
            else:
                data = os.read(self._fd, 65536)
        except OSError as exc:
            if exc.errno in _RETRY_ERRNOS:
                return
            self._fail(f"read failed: {errno.errorcode.get(exc.errno or 0, '?')} ({exc.strerror})")
            return
        if not data:
            # EOF: TCP peer closed, or a tty hung up.
            self._fail("closed by peer (EOF)" if self._sock is not None else "hang-up (EOF)")
            return
        self.counters["bytes_rx"] += len(data)
        assert self._loop is not None
        self.last_rx_mono = self._loop.time()
        self._rx += data
        if len(self._rx) > self._rx_max:
            drop = len(self._rx) - self._rx_max
            del self._rx[:drop]
            self.counters["overruns"] += drop
        for fut in self._rx_waiters:
            if not fut.done():
                fut.set_result(None)

    async def read_some(self, max_bytes: int = 4096) -> bytes:
        """Return 1..max_bytes received bytes, waiting for at least one. DeviceError on loss."""
        while not self._rx:
            self._check()
            assert self._loop is not None
            fut = self._loop.create_future()
            self._rx_waiters.add(fut)
            try:
                await fut
            finally:
                self._rx_waiters.discard(fut)
        out = bytes(self._rx[:max_bytes])
        del self._rx[:max_bytes]
        return out

    def in_waiting(self) -> int:
        return len(self._rx)

    def discard_input(self) -> int:
        """Drop everything received so far (a master does this before a request)."""
        n = len(self._rx)
        self._rx.clear()
        return n

    # -- transmit ----------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Write all of `data`; parks on add_writer only while the OS buffer is full.

        A write is a request to the device (a Modbus query, a poll command): its start is
        when the device is sampled, so it is noted as the read's acquisition time
        (drivers/base.py; only the first transaction of a read counts)."""
        async with self._write_lock:
            note_acquired(time.monotonic())
            await self._write_locked(data)

    async def _write_locked(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check()
            try:
                n = self._sock.send(view) if self._sock is not None else os.write(self._fd, view)
            except OSError as exc:
                if exc.errno in _RETRY_ERRNOS or exc.errno == errno.ENOBUFS:
                    n = 0
                else:
                    self._fail(
                        f"write failed: {errno.errorcode.get(exc.errno or 0, '?')} ({exc.strerror})"
                    )
                    self._check()
                    return
            self.counters["bytes_tx"] += n
            view = view[n:]
            if view:
                assert self._loop is not None
                fut = self._loop.create_future()
                self._tx_waiter = fut
                self._loop.add_writer(self._fd, _resolve, fut)
                try:
                    await fut
                finally:
                    self._tx_waiter = None
                    if self._fd >= 0:
                        with contextlib.suppress(Exception):
                            self._loop.remove_writer(self._fd)
        if self._loop is not None:
            self.last_tx_mono = self._loop.time()

    # -- sharing -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSerialPort]:
        """Exclusive use of the line for one request/response (Modbus master)."""
        async with self._txn_lock:
            yield self

    # -- sniffing ------------------------------------------------------------------------
    def record_frame(self, data: bytes) -> None:
        self._frames.append((time.time(), bytes(data)))

    def recent_frames(self, n: int = 20) -> list[tuple[float, bytes]]:
        if n <= 0:
            return []
        return list(self._frames)[-n:]

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            **self.settings(),
            "open": self.is_open,
            "lost": self.lost,
            "users": self._users,
            **self.counters,
        }


class SerialPorts:
    """One shared `AsyncSerialPort` per URL (what `Resources.serial_port` returns).

    Asking for a URL again with different line settings is a configuration conflict
    (two sensors cannot share a wire at two baud rates) and raises ValueError.
    """

    def __init__(self) -> None:
        self._ports: dict[str, AsyncSerialPort] = {}

    def get(self, url: str, **settings: Any) -> AsyncSerialPort:
        port = self._ports.get(url)
        if port is None:
            port = AsyncSerialPort(url, **settings)
            self._ports[url] = port
            return port
        have = port.settings()
        for key, want in settings.items():
            if key in have and have[key] != want:
                raise ValueError(
                    f"serial port {url}: {key} {want!r} conflicts with "
                    f"{have[key]!r} already configured for this port"
                )
        return port

    def find(self, url: str) -> AsyncSerialPort | None:
        return self._ports.get(url)

    def all(self) -> list[AsyncSerialPort]:
        return list(self._ports.values())

    async def close_all(self) -> None:
        for port in self._ports.values():
            port._teardown()
        self._ports.clear()
