"""Fault types, at the bottom of the import graph.

`EdgerundError` is the base of every exception the project raises on purpose, the
drivers' included; it is defined here because drivers never import the daemon, and
edgerund.errors re-exports it with the daemon's own fault domains beside DeviceError.
"""

from __future__ import annotations


class EdgerundError(Exception):
    """Base of every error the project raises on purpose (daemon, drivers, tools)."""


class DeviceError(EdgerundError):
    """A hardware or OS-level device fault (NACK, EIO, timeout, missing node, wrong chip)."""


class FrameError(EdgerundError):
    """One frame/line/response from a device was bad (CRC, checksum, syntax). Counted, skipped."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind  # e.g. "crc", "checksum", "syntax", "exception_response"
        super().__init__(f"{kind}: {message}")
