"""The `gpio` actuator: one output line through libgpiod's Python binding (`gpiod`).

Theory of operation
-------------------
A GPIO output is the simplest actuator: a relay, a contactor coil, a warning lamp. The
line is requested once at `open()` through the kernel's GPIO character device
(/dev/gpiochipN; the sysfs interface is deprecated) with its initial level set to the safe
value, so the line never glitches to the wrong level between request and first write.
`write(value)` drives the line active when `value >= on_at` (default 0.5), inactive
otherwise; `active_low` inverts the electrical level in the kernel so "active" always means
"asserted".

Setting a requested line is one ioctl taking microseconds, so it runs inline on the event
loop (an executor hop would cost ten times more); requesting and releasing the line touch
the filesystem and run in a thread.

Both libgpiod binding generations are supported: v2 (`gpiod.request_lines`, pip `gpiod`
>= 2, Debian trixie) and v1 (`Chip.get_line`, Debian bookworm's python3-libgpiod, i.e.
Raspberry Pi OS). Without the binding, `open()` raises DeviceError saying how to install
it; the daemon's config check stays usable on machines without GPIO.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from drivers.base import ActuatorConfig, DeviceError, Resources
from drivers.registry import ActuatorSpec

INSTALL_HINT = "apt install python3-libgpiod (Raspberry Pi OS) or pip install gpiod"


class GpioConfig(ActuatorConfig, tag="gpio", kw_only=True):
    chip: str = "/dev/gpiochip0"  # path, or name like "gpiochip0"
    line: int  # line offset on the chip (BCM number on a Raspberry Pi's gpiochip0)
    active_low: bool = False
    on_at: float = 0.5  # values >= on_at drive the line active
    consumer: str = "edgerund"

    def target(self) -> str:
        return f"{self.chip}:{self.line}"


def _import_gpiod() -> Any:
    try:
        return importlib.import_module("gpiod")
    except ImportError as exc:
        raise DeviceError(f"gpio actuator needs libgpiod's Python binding: {INSTALL_HINT}") from exc


class GpioActuator:
    def __init__(self, cfg: GpioConfig) -> None:
        self.cfg = cfg
        self.value: float | None = None
        self.writes = 0
        self._gpiod: Any = None
        self._req: Any = None  # v2 LineRequest
        self._line: Any = None  # v1 Line
        self._v2_values: tuple[Any, Any] | None = None

    def _chip_path(self) -> str:
        c = self.cfg.chip
        return c if c.startswith("/") else f"/dev/{c}"

    def _open_sync(self) -> None:
        gpiod = _import_gpiod()
        self._gpiod = gpiod
        initial = self.cfg.safe_value >= self.cfg.on_at
        try:
            if hasattr(gpiod, "request_lines"):  # libgpiod v2
                from_line = importlib.import_module("gpiod.line")
                active, inactive = from_line.Value.ACTIVE, from_line.Value.INACTIVE
                settings = gpiod.LineSettings(
                    direction=from_line.Direction.OUTPUT,
                    output_value=active if initial else inactive,
                    active_low=self.cfg.active_low,
                )
                self._req = gpiod.request_lines(
                    self._chip_path(), consumer=self.cfg.consumer, config={self.cfg.line: settings}
                )
                self._v2_values = (active, inactive)
            else:  # libgpiod v1
                chip = gpiod.Chip(self._chip_path())
                line = chip.get_line(self.cfg.line)
                flags = gpiod.LINE_REQ_FLAG_ACTIVE_LOW if self.cfg.active_low else 0
                line.request(
                    consumer=self.cfg.consumer,
                    type=gpiod.LINE_REQ_DIR_OUT,
                    flags=flags,
                    default_vals=[1 if initial else 0],
                )
                self._line = line
        except (OSError, ValueError) as exc:
            raise DeviceError(
                f"gpio {self._chip_path()} line {self.cfg.line}: cannot request output: {exc}"
            ) from exc

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    async def write(self, value: float) -> None:
        on = value >= self.cfg.on_at
        try:
            if self._req is not None and self._v2_values is not None:
                self._req.set_value(self.cfg.line, self._v2_values[0 if on else 1])
            elif self._line is not None:
                self._line.set_value(1 if on else 0)
            else:
                raise DeviceError(f"gpio line {self.cfg.line} is not open")
        except OSError as exc:
            raise DeviceError(f"gpio {self._chip_path()} line {self.cfg.line}: {exc}") from exc
        self.value = float(value)
        self.writes += 1

    def _close_sync(self) -> None:
        if self._req is not None:
            self._req.release()
            self._req = None
        if self._line is not None:
            self._line.release()
            self._line = None

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)


def _factory(cfg: Any, resources: Resources) -> GpioActuator:
    return GpioActuator(cfg)


ACTUATOR = ActuatorSpec(
    name="gpio",
    config_type=GpioConfig,
    factory=_factory,
    summary="one GPIO output line through libgpiod (v1 or v2 binding)",
)
