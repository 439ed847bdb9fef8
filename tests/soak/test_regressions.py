"""Regressions found by the soak harness, each with the seed that found it.

The seed itself stays in the CI profile (tests/soak/test_soak.py runs soak1-1, which
found the first of these); the tests here pin each fix in a second.
"""

from __future__ import annotations

import errno
import os
import termios
from pathlib import Path

import pytest

from drivers.base import DeviceError
from drivers.serial.port import AsyncSerialPort


async def test_soak1_1_serial_reopen_line_settings_error_is_a_device_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """soak1-1, 300 s, t=94 s: after a `serial_vanish` of the Modbus meter the re-open's
    tcsetattr failed with termios.error (EINVAL), which is not an OSError, so it escaped
    the port as a driver bug (`driver_exception` with a traceback) instead of a device
    fault. A real pty; the kernel's EINVAL answer to the line settings is the one thing
    stood in for (it depends on the other side's timing), at the termios boundary."""
    master, slave = os.openpty()
    path = os.ttyname(slave)

    def refuse(*_a: object) -> None:
        raise termios.error(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(termios, "tcsetattr", refuse)
    port = AsyncSerialPort(path, baudrate=19200, parity="E")
    try:
        with pytest.raises(DeviceError):
            await port.open()
        assert port.counters["errors"] == 1
    finally:
        os.close(master)
        os.close(slave)


async def test_soak1_20261206_stop_with_a_hung_diag_client_logs_no_traceback(
    tmp_path: Path,
) -> None:
    """soak1-20261206 (the long run), t≈300 s: SIGTERM while `diag_hang` clients were
    connected logged `ERROR asyncio: Exception in callback ... CancelledError` with a
    traceback per client: the diag server cancelled its connection tasks, and Python
    3.11's start_server callback calls task.exception() on a cancelled task. Real
    socket, real clients that connect and say nothing (one half a line)."""
    import asyncio
    import socket

    from edgerund.diag import DiagServer

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    path = str(tmp_path / "diag.sock")
    clients: list[socket.socket] = []
    try:
        async with DiagServer(path, {}, mode=0o600, group=None) as srv:
            for partial in (b"", b'{"id": 1, "cmd": "sta'):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                await loop.sock_connect(c, path)
                if partial:
                    await loop.sock_sendall(c, partial)
                clients.append(c)
            for _ in range(100):
                if len(srv._clients) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(srv._clients) == 2
        for _ in range(5):
            await asyncio.sleep(0.01)  # let the server's done-callbacks run
    finally:
        for c in clients:
            c.close()
        loop.set_exception_handler(None)
    assert errors == [], [str(e.get("message")) for e in errors]


async def test_soak1_20261206_write_interest_on_a_socket_closed_meanwhile_is_dropped() -> None:
    """soak1-20261206 (the long run), t≈541 s, during a 150 s link cut with the uplink
    reconnecting: aiomqtt scheduled `add_writer(fd)` for paho's socket, the socket was
    closed before the loop ran it, and the loop logged "Exception in callback ...
    add_writer ... OSError: [Errno 9] Bad file descriptor" with a traceback (a reused fd
    would have been watched for the wrong socket). A real socket, closed between paho's
    request and the loop's turn."""
    import asyncio
    import socket

    from edgerund.telemetry.uplink import _AckClient

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    client = _AckClient("127.0.0.1", 1)
    a, b = socket.socketpair()
    try:
        client._client._sock = a  # paho's current socket
        client._on_socket_register_write(client._client, None, a)
        a.close()  # the link dropped before the loop's turn
        for _ in range(5):
            await asyncio.sleep(0)
    finally:
        b.close()
        loop.set_exception_handler(None)
    assert errors == [], [str(e.get("message")) for e in errors]
