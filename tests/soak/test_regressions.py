"""Regressions found by the soak harness, each with the seed that found it.

The seed itself stays in the CI profile (tests/soak/test_soak.py runs soak1-1, which
found the first of these); the tests here pin each fix in a second.
"""

from __future__ import annotations

import errno
import os
import termios

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
        with pytest.raises(DeviceError, match="cannot open"):
            await port.open()
        assert port.counters["errors"] == 1
    finally:
        os.close(master)
        os.close(slave)
