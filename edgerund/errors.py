"""Exceptions by fault domain.

Every error the daemon reports to a person belongs to one of these domains, so that the
CLI can map it to an exit code and a one-line message without a traceback:

- ConfigError: the configuration (file, key, value) is wrong; exit 2 at start-up.
- DeviceError: a bus, port, chip or TPM misbehaved; usually retried, never fatal alone.
- TrustError: a bundle, keyring or quote failed a trust check; carries a reason code.
- RemoteError: a peer (broker, diagnostics client) failed or refused.

Messages say what was expected and what was found.
"""

from __future__ import annotations

from drivers.errors import DeviceError, FrameError

__all__ = ["ConfigError", "DeviceError", "EdgerundError", "FrameError", "RemoteError", "TrustError"]


class EdgerundError(Exception):
    """Base of every error the daemon raises on purpose."""


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


class RemoteError(EdgerundError):
    """A remote peer failed or refused (broker, socket client)."""
