"""Finding the external programs the peers run (mosquitto, swtpm, swtpm_setup)."""

from __future__ import annotations

import os
import shutil
import socket


class MissingBinary(RuntimeError):
    """An external program is not installed (the message says how to install it)."""


def find_binary(name: str, install_hint: str) -> str:
    """The path of `name`, or MissingBinary saying how to install it."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MissingBinary(f"{name} not found; install it with: {install_hint}")


def free_port() -> int:
    """A free TCP port on loopback (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
