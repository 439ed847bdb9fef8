"""A real HTTP(S) server (stdlib, own thread) serving one file for the `url` fetch tests."""

from __future__ import annotations

import http.server
import ssl
import threading
from typing import Any


class RangeServer:
    """Serves `data` with Range support that can be switched off (`ranges`), and an optional
    `cut`: the first response stops after that many bytes (the connection drops
    mid-transfer). With `tls` (a server SSLContext) it speaks HTTPS; the handshake runs in
    the handler's thread at its first read, and refused handshakes are not logged (they
    are what some tests are about). `requests`: each GET's Range header, in order."""

    def __init__(self, data: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.data = data
        self.ranges = True
        self.cut: int | None = None
        self.requests: list[str | None] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                return None

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                srv.requests.append(rng)
                start = 0
                if rng and srv.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                body = srv.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(srv.data) - 1}/{len(srv.data)}"
                    )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if srv.cut is not None:
                    body, srv.cut = body[: srv.cut], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                return None

        self.httpd = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/b.bundle"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
