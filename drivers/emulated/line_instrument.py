"""Line instrument emulator: CSV, key=value or JSON lines on a pty.

`values(t)` returns {field name: raw value} (before the driver's scale/offset). The
emulator prints the fields in `fields` order each 1/rate_hz, or, with `poll_command`
(e.g. b"READ?\\r\\n"), one line per received command, as a polled instrument does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from drivers.emulated.serial import Faults, PeriodicSerialDevice

__all__ = ["LineInstrumentEmulator", "format_line"]


def format_line(
    fmt: Literal["csv", "kv", "json"],
    fields: Sequence[str],
    values: Mapping[str, float],
    decimals: int = 3,
    delimiter: str = ",",
) -> bytes:
    if fmt == "csv":
        text = delimiter.join(f"{values[f]:.{decimals}f}" for f in fields)
    elif fmt == "kv":
        text = ",".join(f"{f}={values[f]:.{decimals}f}" for f in fields)
    else:
        text = json.dumps({f: round(values[f], decimals) for f in fields})
    return (text + "\r\n").encode("ascii")


class LineInstrumentEmulator(PeriodicSerialDevice):
    def __init__(
        self,
        link: str | os.PathLike[str],
        *,
        values: Callable[[float], Mapping[str, float]],
        fields: Sequence[str],
        format: Literal["csv", "kv", "json"] = "csv",
        rate_hz: float = 1.0,
        poll_command: bytes | None = None,
        decimals: int = 3,
        column_delimiter: str = ",",
        seed: int = 0,
        faults: Faults | None = None,
        dropout: Callable[[float], bool] | None = None,
    ) -> None:
        super().__init__(
            link,
            rate_hz=rate_hz,
            poll_command=poll_command,
            seed=seed,
            faults=faults,
            dropout=dropout,
        )
        self.values = values
        self.fields = list(fields)
        self.format: Literal["csv", "kv", "json"] = format
        self.decimals = decimals
        self.column_delimiter = column_delimiter

    def frames_at(self, t: float) -> Sequence[bytes]:
        return [
            format_line(
                self.format, self.fields, self.values(t), self.decimals, self.column_delimiter
            )
        ]
