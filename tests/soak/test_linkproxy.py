"""The soak link proxy does what the fault kinds claim: a stall holds bytes (the
connection stays open, nothing is refused, nothing is lost), a cut resets, a throttle
paces."""

from __future__ import annotations

import socket
import threading
import time

from benchmarks.soak.linkproxy import LinkProxy


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(c: socket.socket) -> None:
    with c:
        while data := c.recv(4096):
            c.sendall(data)


def test_stall_holds_bytes_then_delivers_them_in_order_and_cut_resets() -> None:
    srv, port = _echo_server()
    proxy = LinkProxy(port)
    proxy.start()
    try:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        c.sendall(b"a")
        assert c.recv(10) == b"a"
        proxy.set_mode("stall")
        time.sleep(0.1)
        c.sendall(b"bc")
        c.settimeout(0.5)
        try:
            got = c.recv(10)
        except TimeoutError:
            got = b""
        assert got == b""  # held: not answered, not refused, still connected
        proxy.set_mode("pass")
        c.settimeout(5)
        buf = b""
        while len(buf) < 2:
            buf += c.recv(10)
        assert buf == b"bc"
        proxy.set_mode("throttle", rate_bps=2000)
        time.sleep(0.05)
        t0 = time.monotonic()
        c.sendall(b"x" * 1000)
        buf = b""
        while len(buf) < 1000:
            buf += c.recv(4096)
        assert time.monotonic() - t0 >= 0.4  # ~0.5 s each way at 2000 B/s
        proxy.set_mode("cut")
        time.sleep(0.1)
        try:
            c.sendall(b"y")
            lost = c.recv(10) == b""
        except OSError:
            lost = True
        assert lost
        c.close()
        # while cut, new connections are refused (reset at once)
        c2 = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        c2.settimeout(2)
        try:
            closed = c2.recv(10) == b""
        except OSError:
            closed = True
        assert closed
        c2.close()
    finally:
        proxy.stop()
        srv.close()
