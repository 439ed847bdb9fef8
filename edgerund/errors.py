"""Exceptions by fault domain.

Every error the daemon reports to a person belongs to one of these domains, so that the
CLI can map it to an exit code and a one-line message without a traceback:

- ConfigError: the configuration (file, key, value) is wrong; exit 2 at start-up.
- DeviceError: a bus, port, chip or TPM misbehaved; usually retried, never fatal alone.
- TrustError: a bundle, keyring or quote failed a trust check; carries a reason code.
- CommandError: a command (diagnostics socket, remote MQTT `cmd/`, or the daemon's answer
  as the client sees it) was refused: a stable `code` and a message.

Messages say what was expected and what was found.
"""

from __future__ import annotations

from drivers.errors import DeviceError, EdgerundError, FrameError

__all__ = [
    "CommandError",
    "ConfigError",
    "DeviceError",
    "EdgerundError",
    "FrameError",
    "TrustError",
]


class ConfigError(EdgerundError):
    """A configuration problem. `str()` is the full `FILE:LINE: key.path: message` text."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        path: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.path = path
        self.detail = message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        key = f"{path}: " if path else ""
        super().__init__(f"{where}{key}{message}")


class TrustError(EdgerundError):
    """A trust check failed. `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


class CommandError(EdgerundError):
    """A refused command: `{"ok": false, "error": {code, message}}` on the diagnostics
    socket, the error reply of a remote `cmd/` request, and what the client raises when the
    daemon answered so. `code` is stable and machine-readable; `message` says expected vs
    got."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
