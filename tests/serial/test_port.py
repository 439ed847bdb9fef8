"""AsyncSerialPort against real peers: a kernel pty (emulator base) and a TCP socket."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from drivers.emulated.serial import PtySerialDevice
from drivers.errors import DeviceError
from drivers.serial.port import AsyncSerialPort, SerialPorts, char_time_s, frames_to_rows


class Echo(PtySerialDevice):
    """Answers every chunk with the same bytes upper-cased."""

    def on_receive(self, data: bytes) -> None:
        self.send(data.upper())


async def read_exactly(port: AsyncSerialPort, n: int, timeout_s: float = 5.0) -> bytes:
    buf = b""
    async with asyncio.timeout(timeout_s):
        while len(buf) < n:
            buf += await port.read_some()
    return buf


async def test_pty_round_trip_and_counters(link: Path, loop_guard: object) -> None:
    async with Echo(link) as dev:
        port = AsyncSerialPort(dev.path, baudrate=115200)
        await port.open()
        try:
            await port.write(b"hello\n")
            assert await read_exactly(port, 6) == b"HELLO\n"
            assert port.counters["bytes_tx"] == 6
            assert port.counters["bytes_rx"] == 6
            assert dev.counters["bytes_rx"] == 6
        finally:
            await port.close()
        assert not port.is_open


async def test_read_waits_without_blocking_loop(link: Path, loop_guard: object) -> None:
    async with Echo(link) as dev:
        port = AsyncSerialPort(dev.path)
        await port.open()
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await port.read_some()
        finally:
            await port.close()


async def test_large_write_parks_on_writer(link: Path, loop_guard: object) -> None:
    """A write bigger than the pty buffer completes while the peer drains it slowly."""
    async with PtySerialDevice(link) as dev:
        port = AsyncSerialPort(dev.path)
        await port.open()
        payload = bytes(range(256)) * 1024  # 256 KiB, far above the pty buffer
        got = bytearray()
        done = asyncio.Event()

        def drain() -> None:
            import os

            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(dev._master, 65536))
            if len(got) >= len(payload):
                done.set()

        loop = asyncio.get_running_loop()
        loop.remove_reader(dev._master)
        loop.add_reader(dev._master, drain)
        try:
            await asyncio.wait_for(port.write(payload), 20)
            async with asyncio.timeout(10):
                await done.wait()
            assert bytes(got) == payload
        finally:
            loop.remove_reader(dev._master)
            await port.close()


async def test_missing_node_is_device_error(tmp_path: Path) -> None:
    port = AsyncSerialPort(str(tmp_path / "ttyNOPE"))
    with pytest.raises(DeviceError, match="device node does not exist"):
        await port.open()
    assert port.counters["errors"] == 1


async def test_unplug_raises_and_replug_reopens(link: Path, loop_guard: object) -> None:
    async with Echo(link) as dev:
        port = AsyncSerialPort(dev.path)
        await port.open()
        reader = asyncio.create_task(port.read_some())
        await asyncio.sleep(0.05)
        dev.unplug()
        with pytest.raises(DeviceError, match=r"hang-up|read failed"):
            await asyncio.wait_for(reader, 5)
        assert port.lost and port.counters["losses"] == 1
        with pytest.raises(DeviceError):
            await port.write(b"x")
        # the node is gone: a reopen attempt says so
        with pytest.raises(DeviceError, match="does not exist"):
            await port.reopen()
        dev.replug()
        await port.open()  # open() on a lost port reopens it
        assert port.is_open
        await port.write(b"back\n")
        assert await read_exactly(port, 5) == b"BACK\n"
        assert port.counters["opens"] == 2
        await port.close()
        await port.close()


async def test_shared_port_refcount_and_transaction_lock(link: Path) -> None:
    async with Echo(link) as dev:
        ports = SerialPorts()
        a = ports.get(dev.path, baudrate=19200)
        b = ports.get(dev.path, baudrate=19200)
        assert a is b
        with pytest.raises(ValueError, match="conflicts"):
            ports.get(dev.path, baudrate=9600)
        await a.open()
        await b.open()
        await a.close()
        assert a.is_open  # one user left
        order: list[str] = []

        async def txn(name: str) -> None:
            async with a.transaction():
                order.append(name + "+")
                await asyncio.sleep(0.02)
                order.append(name + "-")

        await asyncio.gather(txn("x"), txn("y"))
        assert order in (["x+", "x-", "y+", "y-"], ["y+", "y-", "x+", "x-"])
        await b.close()
        assert not a.is_open
        await ports.close_all()


async def test_sniff_ring_is_bounded() -> None:
    port = AsyncSerialPort("/dev/null-not-opened", sniff_frames=4)
    for i in range(10):
        port.record_frame(bytes([0x41 + i, 0x00]))
    frames = port.recent_frames(100)
    assert [f[1] for f in frames] == [bytes([0x41 + i, 0]) for i in range(6, 10)]
    assert port.recent_frames(2) == frames[-2:]
    rows = frames_to_rows(frames[-1:])
    assert rows[0]["hex"] == "4a 00" and rows[0]["text"] == "J." and rows[0]["len"] == 2


def test_char_time_and_settings_validation() -> None:
    assert char_time_s(9600) == pytest.approx(10 / 9600)
    assert char_time_s(9600, 8, "E", 1) == pytest.approx(11 / 9600)
    with pytest.raises(ValueError, match="parity"):
        AsyncSerialPort("/dev/x", parity="X")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stopbits"):
        AsyncSerialPort("/dev/x", stopbits=3)


async def test_socket_url_against_tcp_peer(loop_guard: object) -> None:
    """socket://host:port (ser2net): round trip, then the peer closing is a DeviceError."""
    conns: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)
        data = await r.readline()
        w.write(data[::-1].strip() + b"\n")
        await w.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    host, tcp_port = server.sockets[0].getsockname()[:2]
    port = AsyncSerialPort(f"socket://{host}:{tcp_port}")
    try:
        await port.open()
        await port.write(b"abc\n")
        assert await read_exactly(port, 4) == b"cba\n"
        conns[0].close()
        with pytest.raises(DeviceError, match="closed by peer"):
            async with asyncio.timeout(5):
                while True:
                    await port.read_some()
        # peer still listening: open() on the lost port reconnects
        await port.open()
        assert port.is_open and port.counters["opens"] == 2
    finally:
        await port.close()
        await port.close()
        server.close()
        await server.wait_closed()


async def test_socket_url_refused_is_device_error() -> None:
    from tests.fixtures.binaries import free_port

    port = AsyncSerialPort(f"socket://127.0.0.1:{free_port()}")
    with pytest.raises(DeviceError, match="cannot open"):
        await port.open()


def test_port_problem_for_config_checks(tmp_path: Path) -> None:
    from drivers.serial.common import port_problem

    assert port_problem("socket://127.0.0.1:1") is None
    assert port_problem("/dev/null") is None
    msg = port_problem(str(tmp_path / "ttyUSB9"))
    assert msg is not None and "does not exist" in msg and "either" not in msg
    msg = port_problem("/dev/serial/by-id/nothing-here/x")
    assert msg is not None and "does not exist either" in msg


class Recorder(PtySerialDevice):
    def __init__(self, link: Path) -> None:
        super().__init__(link)
        self.data = bytearray()
        self.want = 0
        self.done = asyncio.Event()

    def on_receive(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want:
            self.done.set()


async def test_two_readers_both_served(link: Path) -> None:
    """A stream sensor and an actuator awaiting a reply may wait on one port at once."""
    async with Echo(link) as dev:
        port = AsyncSerialPort(dev.path)
        await port.open()
        readers = [asyncio.create_task(port.read_some()) for _ in range(2)]
        await asyncio.sleep(0.02)
        await port.write(b"x")
        await asyncio.sleep(0.05)
        await port.write(b"y")
        async with asyncio.timeout(5):
            got = await asyncio.gather(*readers)
        assert sorted(got) == [b"X", b"Y"]
        await port.close()


async def test_concurrent_writes_do_not_interleave(link: Path, loop_guard: object) -> None:
    async with Recorder(link) as dev:
        port = AsyncSerialPort(dev.path)
        await port.open()
        a, b = b"a" * 200_000, b"b" * 200_000
        dev.want = len(a) + len(b)
        await asyncio.wait_for(asyncio.gather(port.write(a), port.write(b)), 20)
        async with asyncio.timeout(10):
            await dev.done.wait()
        assert bytes(dev.data) in (a + b, b + a)
        await port.close()


async def test_a_request_notes_the_acquisition_time(link: Path, loop_guard: object) -> None:
    """A write is a request to the device: its start is the read's instant in the driver
    contract (drivers/base.py), like an I2C transaction's start; the reply, however late,
    does not move it, and neither does a second request of the same read."""
    import time

    from drivers.base import acquired_at, begin_acquisition

    async with Echo(link) as dev:
        port = AsyncSerialPort(dev.path, baudrate=115200)
        await port.open()
        try:

            async def one_read() -> float | None:
                begin_acquisition()
                t0 = time.monotonic()
                await port.write(b"q1\n")
                await read_exactly(port, 3)
                await asyncio.sleep(0.05)
                await port.write(b"q2\n")
                await read_exactly(port, 3)
                t = acquired_at()
                assert t is not None and t0 <= t <= t0 + 0.02
                return t

            assert await asyncio.create_task(one_read()) is not None
            assert acquired_at() is None  # the note stayed in the reading task
        finally:
            await port.close()


async def test_refused_line_setting_is_a_device_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel pty accepts every termios setting (checked first), so nothing here can
    make a real device refuse one. The refusal is injected at the kernel boundary instead:
    `termios.tcsetattr` (what pyserial calls) fails with EINVAL whenever the requested
    c_cflag asks for mark/space parity (CMSPAR), as the driver of a USB adapter that
    cannot do it does. pyserial itself runs unmodified."""
    import errno
    import os
    import termios

    import serial

    cmspar = 0o10000000000  # CMSPAR, not exported by the termios module
    real = termios.tcsetattr
    refused: list[int] = []

    def tcsetattr(fd: int, when: int, attrs: list) -> None:  # type: ignore[type-arg]
        if attrs[2] & cmspar:
            refused.append(fd)
            raise termios.error(errno.EINVAL, "Invalid argument")
        real(fd, when, attrs)

    m, s = os.openpty()
    path = os.ttyname(s)
    try:
        serial.Serial(path, parity="M").close()  # the pty itself takes mark parity
        serial.Serial(path).close()  # (and back to no parity)
        monkeypatch.setattr(termios, "tcsetattr", tcsetattr)
        port = AsyncSerialPort(path, baudrate=19200, parity="M")
        with pytest.raises(DeviceError) as info:
            await port.open()
        msg = str(info.value)
        assert path in msg and "refuses parity 'M'" in msg and "19200 8M1" in msg
        assert "baudrate" not in msg.split("(settings")[0]  # 19200 alone was accepted
        assert refused and port.counters["errors"] == 1
        port2 = AsyncSerialPort(path, baudrate=19200)  # a setting it takes
        await port2.open()
        await port2.close()
    finally:
        os.close(m)
        os.close(s)
