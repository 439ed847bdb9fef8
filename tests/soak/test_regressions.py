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


def test_soak1_20261206_an_evicted_loss_record_hands_on_what_it_named(tmp_path: Path) -> None:
    """soak1-20261206 (the 53-min run), from t≈1,500 s on, with the spool at its 0.25 MB
    cap through link outages and `spool_fill`: 1,436 committed batches were neither
    received nor named in a loss record. Loss records are evt rows, evicted in their turn
    when evt rows have to go (1,673 evt evictions in that run); the new loss record named
    the evicted record's own seq but not the batches IT named, so they became a silent gap.
    A real spool (SQLite) under a small cap, nothing but evt rows, nothing delivered."""
    import numpy as np

    from edgerund.telemetry import codec
    from edgerund.telemetry.codec import Cls, LossBlock, SeriesBlock
    from edgerund.telemetry.spool import Spool

    ttl = {Cls.EVT: 1e6, Cls.AGG: 1e6, Cls.RAW: 1e6}
    sp = Spool(tmp_path, max_bytes=256 * 1024, ttl_s=ttl, commit_interval_s=0.01)
    sp.open()
    rng = np.random.default_rng(20261206)
    appended: list[int] = []
    try:
        for chunk in range(30):  # several times the cap: evictions of evictions
            futs = []
            for i in range(chunk * 20, chunk * 20 + 20):
                t = 1_700_000_000_000 + i * 60_000 + np.arange(300, dtype=np.int64) * 100
                block = SeriesBlock(3, t, (rng.integers(-30000, 30000, 300),), (-3,))
                futs.append(sp.append(Cls.EVT, [block], 1))
            appended += [f.result() for f in futs]
        sp.flush().result()
        rows = sp.fetch(Cls.EVT, 0, 100_000).result()
    finally:
        sp.close()
    left = {r.seq for r in rows}
    named = {
        s
        for r in rows
        for b in codec.decode(r.payload).batch.blocks
        if isinstance(b, LossBlock)
        for s in b.seqs
    }
    assert len(left) < len(appended) / 2, "the cap never made the spool evict"
    vanished = sorted(set(appended) - left - named)
    assert vanished == [], f"{len(vanished)} batches neither kept nor named: {vanished[:20]}"
