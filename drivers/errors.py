"""Driver fault types. Defined here so drivers never import the daemon; edgerund.errors
re-exports DeviceError as its device fault domain."""

from __future__ import annotations


class DeviceError(Exception):
    """A hardware or OS-level device fault (NACK, EIO, timeout, missing node, wrong chip)."""


class FrameError(Exception):
    """One frame/line/response from a device was bad (CRC, checksum, syntax). Counted, skipped."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind  # e.g. "crc", "checksum", "syntax", "exception_response"
        super().__init__(f"{kind}: {message}")
